// The simulator backend as Python sees it (aimdo.sim composes it with the adaptors), and
// replay on a simulator: the glue that hands replay the stack aimdo.sim built.
#include <nanobind/stl/map.h>
#include <nanobind/stl/shared_ptr.h>
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
#include "failing_driver.hpp"
#include "recording_driver.hpp"
#include "replay.hpp"
#include "sim_driver.hpp"

namespace aimdo::bindings {
namespace {

using SpecTuple = std::tuple<std::string, std::int64_t, std::int64_t, bool, double>;
// One peer link: (bytes per second, 0 for none; latency in ns; performance rank).
using LinkTuple = std::tuple<double, std::int64_t, int>;
// (peer link matrix, empty for none; host link of each device, empty for each its own;
// host latency in ns).
using TopologyTuple =
    std::tuple<std::vector<std::vector<LinkTuple>>, std::vector<int>, std::int64_t>;

sim::SimTopology topology_of(const TopologyTuple& topology) {
  const auto& [peers, host_links, host_latency_ns] = topology;
  sim::SimTopology out;
  for (const auto& row : peers) {
    std::vector<sim::SimPeerLink> links;
    for (const auto& [bytes_per_s, latency_ns, rank] : row) {
      links.push_back(sim::SimPeerLink{bytes_per_s, latency_ns, rank});
    }
    out.peers.push_back(std::move(links));
  }
  out.host_links = host_links;
  out.host_latency_ns = host_latency_ns;
  return out;
}

void construct(sim::SimDriver* self, const std::vector<SpecTuple>& specs,
               std::int64_t free_delay_ns, bool real_bytes,
               const std::map<std::string, std::int64_t>& costs_ns,
               std::shared_ptr<EventLog> events, const TopologyTuple& topology) {
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
  options.real_bytes = real_bytes;
  options.topology = topology_of(topology);
  for (const auto& [name, ns] : costs_ns) options.costs.set(name, ns);
  new (self) sim::SimDriver(std::move(devices), options, std::move(events));
}

// Replays `log` on the stack aimdo.sim built: `recorder` over `failures` over `sim`.
std::tuple<std::vector<std::string>, std::vector<std::string>> replay_on(
    const std::string& log, adaptors::RecordingDriver& recorder, adaptors::FailingDriver& failures,
    sim::SimDriver& sim) {
  adaptors::ReplayStack stack;
  stack.recorder = &recorder;
  stack.context = &sim;
  stack.event_handlers = {[&](LogLine& line) { return failures.replay_event(line); },
                          [&](LogLine& line) { return sim.replay_event(line); }};
  adaptors::ReplayReport report = adaptors::replay(log, stack);
  return {std::move(report.differences), std::move(report.notes)};
}

// The simulator's clocks and engines (see "Time" in sim_driver.hpp).
void bind_time(nb::class_<sim::SimDriver, Driver>& cls) {
  using namespace nb::literals;
  using sim::SimDriver;
  cls.def(
         "copy_to_device",
         [](SimDriver& s, IntArg device, IntArg n) {
           s.copy_to_device(to_device(device), to_size(n, "nbytes"));
         },
         "device"_a, "nbytes"_a, release_gil())
      .def(
          "compute",
          [](SimDriver& s, IntArg device, IntArg ns) {
            s.compute(to_device(device), to_ns(ns, "ns"));
          },
          "device"_a, "ns"_a, release_gil())
      .def(
          "copy_async",
          [](SimDriver& s, IntArg device, IntArg n, IntArg after) {
            return s.copy_async(to_device(device), to_size(n, "nbytes"), to_ns(after, "after_ns"));
          },
          "device"_a, "nbytes"_a, "after_ns"_a, release_gil())
      .def(
          "peer_copy_async",
          [](SimDriver& s, IntArg device, IntArg peer, IntArg n, IntArg after) {
            return s.peer_copy_async(to_device(device), to_device(peer), to_size(n, "nbytes"),
                                     to_ns(after, "after_ns"));
          },
          "device"_a, "peer"_a, "nbytes"_a, "after_ns"_a, release_gil())
      .def(
          "compute_async",
          [](SimDriver& s, IntArg device, IntArg ns, IntArg after) {
            return s.compute_async(to_device(device), to_ns(ns, "ns"), to_ns(after, "after_ns"));
          },
          "device"_a, "ns"_a, "after_ns"_a, release_gil())
      .def(
          "copy_engine_now_ns",
          [](SimDriver& s, IntArg device) { return s.copy_engine_now_ns(to_device(device)); },
          "device"_a, release_gil())
      .def("host_now_ns", &SimDriver::host_now_ns)
      .def("now_ns", &SimDriver::now_ns, "device"_a, release_gil())
      .def(
          "advance",
          [](SimDriver& s, IntArg device, IntArg ns) {
            s.advance(to_device(device), to_ns(ns, "ns"));
          },
          "device"_a, "ns"_a, release_gil());
}

}  // namespace

void bind_sim(nb::module_& m) {
  using namespace nb::literals;
  using sim::SimDriver;
  m.def("replay_on_simulator", &replay_on, "log"_a, "recorder"_a, "failures"_a, "simulator"_a,
        release_gil(),
        "Replay `log` on a fresh stack (recorder over failures over simulator): "
        "(differences, notes). ValueError naming a line that cannot be replayed.");

  nb::class_<SimDriver, Driver> cls(m, "SimDriver", "The simulator backend (see aimdo.sim).");
  bind_time(cls);
  cls.def("__init__", &construct, "devices"_a, "free_delay_ns"_a, "real_bytes"_a, "costs_ns"_a,
          "events"_a.none(), "topology"_a)
      .def("address_naming", &SimDriver::address_naming)
      .def_prop_ro("real_bytes", &SimDriver::real_bytes)
      .def("violations", &SimDriver::violations, release_gil())
      .def_prop_ro("in_creating_process", &SimDriver::in_creating_process)
      .def("require_creating_process", &SimDriver::require_creating_process, "operation"_a)
      .def("detach_from_parent", &SimDriver::detach_from_parent)
      .def(
          "add_external_usage",
          [](SimDriver& s, IntArg device, IntArg n) {
            s.add_external_usage(to_device(device), to_size(n, "nbytes"));
          },
          "device"_a, "nbytes"_a, release_gil())
      .def(
          "remove_external_usage",
          [](SimDriver& s, IntArg device, IntArg n) {
            s.remove_external_usage(to_device(device), to_size(n, "nbytes"));
          },
          "device"_a, "nbytes"_a, release_gil())
      .def("external_usage", &SimDriver::external_usage, "device"_a, release_gil())
      .def("physical_bytes", &SimDriver::physical_bytes, "device"_a, release_gil())
      .def("used_bytes", &SimDriver::used_bytes, "device"_a, release_gil())
      .def("pending_free_bytes", &SimDriver::pending_free_bytes, "device"_a, release_gil())
      .def(
          "is_accessible",
          [](const SimDriver& s, std::uint64_t address, std::int64_t n, int from) {
            return s.is_accessible(address, to_size(n, "nbytes"), from);
          },
          "address"_a, "nbytes"_a, "from_device"_a = -1, release_gil())
      .def(
          "adopt",
          [](SimDriver& s, IntArg device, std::uintptr_t ptr, IntArg n) {
            s.adopt(to_device(device), ptr, to_size(n, "nbytes"));
          },
          "device"_a, "ptr"_a, "nbytes"_a, release_gil())
      .def(
          "disown",
          [](SimDriver& s, IntArg device, std::uintptr_t ptr) { s.disown(to_device(device), ptr); },
          "device"_a, "ptr"_a, release_gil())
      .def("leaks", &SimDriver::leaks, release_gil())
      .def("hold", &SimDriver::hold, "operation"_a, "device"_a, release_gil())
      .def("wait_held", &SimDriver::wait_held, "hold_id"_a, "timeout_ns"_a, release_gil())
      .def("release_hold", &SimDriver::release_hold, "hold_id"_a, release_gil());
}

}  // namespace aimdo::bindings
