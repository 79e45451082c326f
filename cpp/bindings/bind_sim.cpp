// The simulator backend as Python sees it (aimdo.sim wraps it).
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "aimdo/errors.hpp"
#include "common.hpp"
#include "sim_driver.hpp"

namespace aimdo::bindings {

void bind_sim(nb::module_& m) {
  using namespace nb::literals;
  using SpecTuple = std::tuple<std::string, std::int64_t, std::int64_t, bool, double>;
  nb::class_<sim::SimDriver, Driver>(m, "SimDriver", "The simulator backend (see aimdo.sim).")
      .def("__init__",
           [](sim::SimDriver* self, const std::vector<SpecTuple>& specs, std::uint64_t seed,
              std::int64_t free_delay_ns, bool record, bool real_bytes,
              const std::map<std::string, std::int64_t>& costs_ns) {
             std::vector<sim::SimDeviceSpec> devices;
             for (const auto& [name, total, granularity, integrated, bandwidth] : specs) {
               sim::SimDeviceSpec spec;
               spec.name = name;
               spec.total_bytes = to_size(total, "capacity");
               spec.granularity_bytes = to_size(granularity, "granularity");
               spec.integrated = integrated;
               spec.host_to_device_bytes_per_s = bandwidth;
               devices.push_back(spec);
             }
             sim::SimOptions options;
             options.free_delay_ns = free_delay_ns;
             options.record = record;
             options.real_bytes = real_bytes;
             sim::SimCosts& c = options.costs;
             const std::map<std::string, std::int64_t*> fields = {
                 {"cuMemCreate", &c.create_physical_ns}, {"cuMemMap", &c.map_ns},
                 {"cuMemSetAccess", &c.set_access_ns},   {"cuMemUnmap", &c.unmap_ns},
                 {"cuMemRelease", &c.release_physical_ns}, {"cuMemGetInfo", &c.memory_info_ns},
                 {"cuCtxSynchronize", &c.synchronize_ns}, {"cuMemAddressReserve", &c.reserve_ns},
                 {"cuMemAddressFree", &c.free_range_ns},  {"cuMemAllocAsync", &c.stream_alloc_ns},
                 {"cuMemFreeAsync", &c.stream_free_ns}};
             for (const auto& [name, ns] : costs_ns) {
               const auto field = fields.find(name);
               if (field == fields.end()) throw InvalidArgumentError("no simulated cost named " + name);
               if (ns < 0) throw InvalidArgumentError("the cost of " + name + " must not be negative");
               *field->second = ns;
             }
             new (self) sim::SimDriver(std::move(devices), seed, options);
           },
           "devices"_a, "seed"_a, "free_delay_ns"_a, "record"_a, "real_bytes"_a, "costs_ns"_a)
      .def_prop_ro("real_bytes", &sim::SimDriver::real_bytes)
      .def("violations", &sim::SimDriver::violations, release_gil())
      .def_prop_ro("in_creating_process", &sim::SimDriver::in_creating_process)
      .def("require_creating_process", &sim::SimDriver::require_creating_process,
           "operation"_a)
      .def("detach_from_parent", &sim::SimDriver::detach_from_parent)
      .def_prop_ro("seed", &sim::SimDriver::seed)
      .def("add_external_usage",
           [](sim::SimDriver& s, IntArg device, IntArg n) {
             s.add_external_usage(to_device(device), to_size(n, "nbytes"));
           },
           "device"_a, "nbytes"_a, release_gil())
      .def("remove_external_usage",
           [](sim::SimDriver& s, IntArg device, IntArg n) {
             s.remove_external_usage(to_device(device), to_size(n, "nbytes"));
           },
           "device"_a, "nbytes"_a, release_gil())
      .def("external_usage", &sim::SimDriver::external_usage, "device"_a, release_gil())
      .def("physical_bytes", &sim::SimDriver::physical_bytes, "device"_a, release_gil())
      .def("used_bytes", &sim::SimDriver::used_bytes, "device"_a, release_gil())
      .def("is_accessible",
           [](const sim::SimDriver& s, std::uint64_t address, std::int64_t n) {
             return s.is_accessible(address, to_size(n, "nbytes"));
           },
           "address"_a, "nbytes"_a, release_gil())
      .def("fail",
           [](sim::SimDriver& s, const std::string& op, int device, int code, std::int64_t skip,
              std::int64_t count) {
             s.fail(op, device, code, to_size(skip, "skip"), to_size(count, "count"));
           },
           "operation"_a, "device"_a, "code"_a, "skip"_a, "count"_a, release_gil())
      .def("fail_rate", &sim::SimDriver::fail_rate, "operation"_a, "device"_a, "code"_a,
           "probability"_a, release_gil())
      .def("clear_failures", &sim::SimDriver::clear_failures, release_gil())
      .def("copy_to_device",
           [](sim::SimDriver& s, IntArg device, IntArg n) {
             s.copy_to_device(to_device(device), to_size(n, "nbytes"));
           },
           "device"_a, "nbytes"_a, release_gil())
      .def("compute",
           [](sim::SimDriver& s, IntArg device, IntArg ns) {
             s.compute(to_device(device), static_cast<std::int64_t>(to_size(ns, "ns")));
           },
           "device"_a, "ns"_a, release_gil())
      .def("copy_async",
           [](sim::SimDriver& s, IntArg device, IntArg n, IntArg after) {
             return s.copy_async(to_device(device), to_size(n, "nbytes"),
                                 static_cast<std::int64_t>(to_size(after, "after_ns")));
           },
           "device"_a, "nbytes"_a, "after_ns"_a, release_gil())
      .def("compute_async",
           [](sim::SimDriver& s, IntArg device, IntArg ns, IntArg after) {
             return s.compute_async(to_device(device), static_cast<std::int64_t>(to_size(ns, "ns")),
                                    static_cast<std::int64_t>(to_size(after, "after_ns")));
           },
           "device"_a, "ns"_a, "after_ns"_a, release_gil())
      .def("copy_engine_now_ns",
           [](sim::SimDriver& s, IntArg device) { return s.copy_engine_now_ns(to_device(device)); },
           "device"_a, release_gil())
      .def("host_now_ns", &sim::SimDriver::host_now_ns)
      .def("pending_free_bytes", &sim::SimDriver::pending_free_bytes, "device"_a, release_gil())
      .def("set_recording", &sim::SimDriver::set_recording, "on"_a, release_gil())
      .def("log", &sim::SimDriver::log, release_gil())
      .def("replay", &sim::SimDriver::replay, "log"_a, release_gil())
      .def("call_count", &sim::SimDriver::call_count, "operation"_a, "device"_a, release_gil())
      .def("hold", &sim::SimDriver::hold, "operation"_a, "device"_a, release_gil())
      .def("wait_held", &sim::SimDriver::wait_held, "hold_id"_a, "timeout_ns"_a, release_gil())
      .def("release_hold", &sim::SimDriver::release_hold, "hold_id"_a, release_gil())
      .def("now_ns", &sim::SimDriver::now_ns, "device"_a, release_gil())
      .def("advance",
           [](sim::SimDriver& s, IntArg device, IntArg ns) {
             s.advance(to_device(device), static_cast<std::int64_t>(to_size(ns, "ns")));
           },
           "device"_a, "ns"_a, release_gil())
      .def("leaks", &sim::SimDriver::leaks, release_gil())
      .def_static("operation_names", &sim::SimDriver::operation_names);

}

}  // namespace aimdo::bindings
