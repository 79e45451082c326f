// The operations table, the event log and the Driver adaptors as Python sees them
// (aimdo.sim composes them). An adaptor is transparent to Python too: an attribute it
// lacks is its upstream driver's (so SimBackend.driver, a recorder over a failure
// injector over the simulator, still answers the simulator's powers).
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.hpp"
#include "failing_driver.hpp"
#include "operations.hpp"
#include "recording_driver.hpp"

namespace aimdo::bindings {
namespace {

using adaptors::FailingDriver;
using adaptors::RecordingDriver;

// The upstream driver's attribute `name`; AttributeError for a dunder name (never
// forwarded) or before the adaptor is constructed.
template <class Adaptor>
nb::object upstream_attribute(nb::handle self, const std::string& name) {
  if (name.rfind("__", 0) == 0 || !nb::inst_ready(self)) throw nb::attribute_error(name.c_str());
  const Adaptor& adaptor = nb::cast<const Adaptor&>(self);
  return nb::getattr(nb::cast(adaptor.upstream_ptr()), name.c_str());
}

std::vector<std::string> keys(const FieldList& fields) {
  std::vector<std::string> out;
  for (const Field field : fields) out.emplace_back(field_key(field));
  return out;
}

// (cuda_name, method, default_cost_ns or None, argument keys, output keys) per operation.
using OperationRow = std::tuple<std::string, std::string, std::optional<std::int64_t>,
                                std::vector<std::string>, std::vector<std::string>>;

std::vector<OperationRow> operation_rows() {
  std::vector<OperationRow> rows;
  for (const OperationInfo& row : kOperations) {
    std::optional<std::int64_t> cost;
    if (row.default_cost_ns != kNoCost) cost = row.default_cost_ns;
    rows.emplace_back(row.cuda_name, row.method, cost, keys(row.arguments), keys(row.outputs));
  }
  return rows;
}

// (backend or None, [(total, granularity, integrated)], line number, line) of a header.
using HeaderTuple =
    std::tuple<std::optional<std::string>, std::vector<std::tuple<std::size_t, std::size_t, bool>>,
               std::size_t, std::string>;

HeaderTuple header_of(const std::string& log) {
  const adaptors::LogHeader header = adaptors::read_header(log);
  std::vector<std::tuple<std::size_t, std::size_t, bool>> devices;
  for (const DeviceProperties& device : header.devices) {
    devices.emplace_back(device.total_bytes, device.granularity_bytes, device.integrated);
  }
  std::optional<std::string> backend;
  if (!header.backend.empty()) backend = header.backend;
  return {backend, devices, header.line_number, header.line};
}

}  // namespace

void bind_adaptors(nb::module_& m) {
  using namespace nb::literals;
  m.def("operations", &operation_rows,
        "The Driver's operations, one tuple each: (CUDA name, Driver method, the "
        "simulator's default cost in ns or None, log argument keys, log output keys).");
  m.def("read_log_header", &header_of, "log"_a, release_gil(),
        "What an event log's header says: (backend or None, [(total bytes, granularity "
        "bytes, integrated)], its line number, its text). ValueError naming a bad line.");

  nb::class_<EventLog>(m, "EventLog", "An event log: lines, and whether it records.")
      .def(nb::init<>())
      .def_prop_ro("recording", &EventLog::recording)
      .def("set_recording", &EventLog::set_recording, "on"_a)
      .def("text", &EventLog::text, release_gil());

  nb::class_<AddressNaming>(m, "AddressNaming", "How a log writes a backend's addresses.");

  nb::class_<RecordingDriver, Driver>(m, "RecordingDriver",
                                      "Writes the driver calls it sees to an event log.")
      .def(nb::init<std::shared_ptr<Driver>, std::shared_ptr<EventLog>, AddressNaming>(),
           "upstream"_a, "log"_a, "naming"_a)
      .def(
          "__init__",
          [](RecordingDriver* self, std::shared_ptr<Driver> upstream,
             std::shared_ptr<EventLog> log) {
            new (self) RecordingDriver(std::move(upstream), std::move(log));
          },
          "upstream"_a, "log"_a)
      .def("start", &RecordingDriver::start, release_gil())
      .def("stop", &RecordingDriver::stop)
      .def_prop_ro("log", &RecordingDriver::log)
      .def_prop_ro("upstream", &RecordingDriver::upstream_ptr)
      .def("__getattr__", &upstream_attribute<RecordingDriver>, "name"_a);

  nb::class_<FailingDriver, Driver>(m, "FailingDriver",
                                    "Fails chosen driver calls and counts every call.")
      .def(nb::init<std::shared_ptr<Driver>, std::uint64_t, std::shared_ptr<EventLog>>(),
           "upstream"_a, "seed"_a, "events"_a.none())
      .def(
          "fail",
          [](FailingDriver& f, const std::string& op, int device, int code, std::int64_t skip,
             std::int64_t count) {
            f.fail(op, device, code, to_size(skip, "skip"), to_size(count, "count"));
          },
          "operation"_a, "device"_a, "code"_a, "skip"_a, "count"_a, release_gil())
      .def("fail_rate", &FailingDriver::fail_rate, "operation"_a, "device"_a, "code"_a,
           "probability"_a, release_gil())
      .def("clear_failures", &FailingDriver::clear_failures, release_gil())
      .def("call_count", &FailingDriver::call_count, "operation"_a, "device"_a, release_gil())
      .def_prop_ro("upstream", &FailingDriver::upstream_ptr)
      .def("__getattr__", &upstream_attribute<FailingDriver>, "name"_a);
}

}  // namespace aimdo::bindings
