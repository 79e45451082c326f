// DeviceOptions and Manager.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "aimdo/manager.hpp"
#include "aimdo/options.hpp"
#include "common.hpp"

namespace aimdo::bindings {
namespace {

nb::dict stats_dict(const DeviceStatsSnapshot& s) {
  nb::dict d;
#define AIMDO_STATS_ENTRY(name, what) d[#name] = s.name;
  AIMDO_DEVICE_STATS(AIMDO_STATS_ENTRY)
#undef AIMDO_STATS_ENTRY
  return d;
}

void bind_device_options(nb::module_& m) {
  // The options struct of the core, field by field (units in the names); each setter
  // converts and range-checks like every other argument. Its defaults are the library's:
  // aimdo.Manager reads them from a new DeviceOptions() instead of writing them again.
  nb::class_<DeviceOptions>(m, "DeviceOptions", "Per-device options (options.hpp).")
      .def(nb::init<>())
      .def_prop_rw(
          "vram_limit_bytes", [](const DeviceOptions& o) { return o.vram_limit_bytes; },
          [](DeviceOptions& o, std::optional<IntArg> v) {
            o.vram_limit_bytes.reset();
            if (v) o.vram_limit_bytes = to_size(*v, "vram_limit");
          },
          nb::arg("value").none(), "None: the device's total memory.")
      .def_prop_rw(
          "headroom_bytes", [](const DeviceOptions& o) { return o.headroom_bytes; },
          [](DeviceOptions& o, IntArg v) { o.headroom_bytes = to_size(v, "headroom"); })
      .def_prop_rw(
          "extra_headroom_bytes", [](const DeviceOptions& o) { return o.extra_headroom_bytes; },
          [](DeviceOptions& o, IntArg v) { o.extra_headroom_bytes = to_size(v, "extra_headroom"); })
      .def_prop_rw(
          "page_size_bytes", [](const DeviceOptions& o) { return o.page_size_bytes; },
          [](DeviceOptions& o, IntArg v) { o.page_size_bytes = to_size(v, "page_size"); })
      .def_prop_rw(
          "poll_interval_ns", [](const DeviceOptions& o) { return o.poll_interval_ns; },
          [](DeviceOptions& o, IntArg v) { o.poll_interval_ns = to_ns(v, "poll_interval"); })
      .def_prop_rw(
          "allocator_headroom_bytes",
          [](const DeviceOptions& o) { return o.allocator_headroom_bytes; },
          [](DeviceOptions& o, IntArg v) {
            o.allocator_headroom_bytes = to_size(v, "allocator_headroom");
          })
      .def_rw("recycle_pages", &DeviceOptions::recycle_pages)
      .def_rw("transient_retries", &DeviceOptions::transient_retries);
}

// Construction, devices, VBARs, reclaim, floors and close.
void add_manager_lifecycle(nb::class_<Manager>& manager) {
  manager.def(nb::init<std::shared_ptr<Driver>>(), "driver"_a)
      .def_prop_ro("driver", [](const Manager& mgr) { return mgr.driver_ptr(); })
      .def(
          "add_devices",
          [](Manager& mgr, const std::vector<std::pair<IntArg, DeviceOptions>>& entries) {
            // All or nothing: the core validates every entry before it applies any.
            std::vector<std::pair<int, DeviceOptions>> wanted;
            for (const auto& [device, options] : entries) {
              wanted.emplace_back(to_device(device), options);
            }
            nb::gil_scoped_release release;
            mgr.add_devices(wanted);
          },
          "entries"_a, "Initialize devices, or update their options: (device, DeviceOptions).")
      .def_prop_ro("devices",
                   [](const Manager& mgr) {
                     nb::gil_scoped_release release;
                     return mgr.devices();
                   })
      .def(
          "create_vbar",
          [](Manager& mgr, IntArg device, IntArg size) {
            return mgr.create_vbar(to_device(device), to_size(size, "size"));
          },
          "device"_a, "size"_a, release_gil())
      .def(
          "reclaim",
          [](Manager& mgr, IntArg device, IntArg n) {
            return mgr.reclaim(to_device(device), to_size(n, "nbytes"));
          },
          "device"_a, "nbytes"_a, release_gil())
      .def(
          "reset_floors",
          [](Manager& mgr, std::optional<IntArg> device) {
            std::optional<int> ordinal;
            if (device) ordinal = to_device(*device);
            nb::gil_scoped_release release;
            mgr.reset_floors(ordinal);
          },
          "device"_a.none())
      .def("close", &Manager::close, release_gil())
      .def_prop_ro("closed", [](const Manager& mgr) {
        nb::gil_scoped_release release;
        return mgr.closed();
      });
}

// Per-device figures, external allocations, statistics and options.
void add_manager_figures(nb::class_<Manager>& manager) {
  manager
      .def(
          "resident_bytes",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->resident_bytes(); },
          "device"_a, release_gil())
      .def(
          "usage_bytes",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->usage_bytes(); },
          "device"_a, release_gil())
      .def(
          "budget_bytes",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->budget_bytes(); },
          "device"_a, release_gil())
      .def(
          "limit_bytes",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->limit_bytes(); },
          "device"_a, release_gil())
      .def(
          "deficit_bytes",
          [](Manager& mgr, IntArg d, IntArg n) {
            return mgr.device(to_device(d))->deficit_bytes(to_size(n, "nbytes"));
          },
          "device"_a, "nbytes"_a, release_gil())
      .def(
          "poll",
          [](Manager& mgr, IntArg d, bool fresh) {
            Device::PollRecord record;
            {
              nb::gil_scoped_release release;
              record = mgr.device(to_device(d))->poll(fresh);
            }
            nb::dict out;
            out["time"] = static_cast<double>(record.time_ns) / 1e9;
            out["free_bytes"] = record.free_bytes;
            out["usage_bytes"] = record.usage_bytes;
            return out;
          },
          "device"_a, "fresh"_a = false)
      .def(
          "memory_info",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->memory_info(); },
          "device"_a, release_gil());
}

// External allocations, statistics and the options in use.
void add_manager_external(nb::class_<Manager>& manager) {
  manager
      .def(
          "external_alloc",
          [](Manager& mgr, IntArg d, IntArg n, std::uintptr_t stream) {
            const int device = to_device(d);
            const std::size_t bytes = to_size(n, "nbytes");
            nb::gil_scoped_release release;
            return mgr.external_alloc(device, bytes, stream);
          },
          "device"_a, "nbytes"_a, "stream"_a)
      .def("external_free", &Manager::external_free, "ptr"_a, "stream"_a, release_gil())
      .def(
          "external_bytes",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->external_bytes(); },
          "device"_a, release_gil())
      .def(
          "vbar_count",
          [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->vbar_count(); }, "device"_a,
          release_gil())
      .def(
          "vbars", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->vbars(); },
          "device"_a, release_gil(), "The device's live VBARs, most important first.")
      .def(
          "stats",
          [](Manager& mgr, IntArg d) {
            DeviceStatsSnapshot snapshot;
            {
              nb::gil_scoped_release release;
              snapshot = mgr.device(to_device(d))->stats();
            }
            return stats_dict(snapshot);
          },
          "device"_a)
      .def(
          "device_info",
          [](Manager& mgr, IntArg d) {
            std::shared_ptr<Device> device;
            DeviceOptions options;
            {
              nb::gil_scoped_release release;
              device = mgr.device(to_device(d));
              options = device->options();
            }
            const DeviceProperties& p = device->properties();
            nb::dict out;
            out["device"] = to_device(d);
            out["name"] = p.name;
            out["total_bytes"] = p.total_bytes;
            out["granularity_bytes"] = p.granularity_bytes;
            out["integrated"] = p.integrated;
            out["vram_limit"] =
                options.vram_limit_bytes ? nb::cast(*options.vram_limit_bytes) : nb::none();
            out["headroom"] = options.headroom_bytes;
            out["extra_headroom"] = options.extra_headroom_bytes;
            out["page_size"] = options.page_size_bytes;
            out["poll_interval"] = static_cast<double>(options.poll_interval_ns) / 1e9;
            out["allocator_headroom"] = options.allocator_headroom_bytes;
            out["recycle_pages"] = options.recycle_pages;
            return out;
          },
          "device"_a);
}

}  // namespace

void bind_manager(nb::module_& m) {
  bind_device_options(m);
  nb::class_<Manager> manager(m, "Manager",
                              "Owns a backend and per-device state. Use aimdo.Manager.");
  add_manager_lifecycle(manager);
  add_manager_figures(manager);
  add_manager_external(manager);
}

}  // namespace aimdo::bindings
