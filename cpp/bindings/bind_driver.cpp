// The Driver seam as Python sees it: the backend object, loading the CUDA backend, and the
// raw driver operations the driver-contract tests use.
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>

#include "aimdo/driver.hpp"
#include "aimdo/errors.hpp"
#include "common.hpp"
#include "cuda_driver.hpp"
#include "log_line.hpp"

namespace aimdo::bindings {
namespace {

std::tuple<int, std::string> status_tuple(const DriverStatus& s) {
  return std::make_tuple(s.code, std::string(s.name));
}

std::shared_ptr<Driver> load_cuda() {
  CudaDriverLoad load = load_cuda_driver();
  if (!load.driver) {
    throw DriverError(load.message, -1, "load libcuda", load.status);
  }
  return load.driver;
}

// DriverError "<what> failed with <name>" for a call of the CUDA function `operation`
// that answered `status`, unless it succeeded.
void check(const DriverStatus& status, const std::string& what, int device, const char* operation) {
  if (status.ok()) return;
  throw DriverError(what + " failed with " + status.name, device, operation, status);
}

// `call()` with `device` made current on the calling thread and the GIL released: what it
// answers, or what making the device current answered.
template <typename Call>
DriverStatus on_device(Driver& d, int device, Call call) {
  nb::gil_scoped_release release;
  ScopedDevice guard(d, device);
  return guard.status().ok() ? call() : guard.status();
}

// A binding of `operation`, a call on one event that needs no current device: the GIL
// released, and DriverError naming the CUDA function `name` when the driver refuses.
auto on_event(DriverStatus (Driver::*operation)(EventHandle), const char* name) {
  return [operation, name](Driver& d, EventHandle event) {
    DriverStatus status;
    {
      nb::gil_scoped_release release;
      status = (d.*operation)(event);
    }
    check(status, std::string(name) + " of event " + hex(event), -1, name);
  };
}

// Host-to-device copies and events (Driver::copy_from_host_async, event_*): each makes
// `device` current for a context-dependent call, releases the GIL, and raises DriverError
// naming the CUDA function when the driver refuses.
void add_event_operations(nb::class_<Driver>& driver) {
  using namespace nb::literals;
  driver
      .def(
          "copy_from_host",
          [](Driver& d, int device, std::uint64_t dst, std::uintptr_t src, std::int64_t size,
             std::uintptr_t stream) {
            const std::size_t bytes = to_size(size, "size");
            const DriverStatus status = on_device(
                d, device, [&] { return d.copy_from_host_async(device, dst, src, bytes, stream); });
            check(status,
                  "cuMemcpyHtoDAsync of " + std::to_string(bytes) + " bytes on device " +
                      std::to_string(device),
                  device, "cuMemcpyHtoDAsync");
          },
          "device"_a, "dst"_a, "src"_a, "size"_a, "stream"_a = 0,
          "Queue a copy of `size` bytes from host memory at `src` (pinned, for the copy to "
          "be asynchronous) to device memory at `dst` on `stream` of `device` (made current "
          "for the call). `src` must stay alive and unchanged until the copy is done (an "
          "event recorded after it). DriverError when the driver refuses it.")
      .def(
          "event_create",
          [](Driver& d, int device) {
            EventHandle event = 0;
            const DriverStatus status =
                on_device(d, device, [&] { return d.event_create(device, &event); });
            check(status, "cuEventCreate on device " + std::to_string(device), device,
                  "cuEventCreate");
            return event;
          },
          "device"_a,
          "Make an event of `device` (made current for the call) that times nothing; its "
          "handle. Give it back with event_destroy. DriverError when the driver refuses.")
      .def("event_destroy", on_event(&Driver::event_destroy, "cuEventDestroy"), "event"_a,
           "Destroy an event made by event_create. DriverError for a handle that names no "
           "event.")
      .def(
          "event_record",
          [](Driver& d, int device, EventHandle event, std::uintptr_t stream) {
            const DriverStatus status =
                on_device(d, device, [&] { return d.event_record(device, event, stream); });
            check(status,
                  "cuEventRecord of event " + hex(event) + " on device " + std::to_string(device),
                  device, "cuEventRecord");
          },
          "device"_a, "event"_a, "stream"_a = 0,
          "Record `event` at the end of the work queued on `stream` of `device` (made current "
          "for the call) so far. DriverError when the driver refuses.")
      .def("event_synchronize", on_event(&Driver::event_synchronize, "cuEventSynchronize"),
           "event"_a,
           "Wait, without the GIL, until the work `event` last recorded is done (at once if it "
           "was never recorded). DriverError when the driver refuses.")
      .def(
          "stream_wait_event",
          [](Driver& d, int device, std::uintptr_t stream, EventHandle event) {
            const DriverStatus status =
                on_device(d, device, [&] { return d.stream_wait_event(device, stream, event); });
            check(
                status,
                "cuStreamWaitEvent on event " + hex(event) + " on device " + std::to_string(device),
                device, "cuStreamWaitEvent");
          },
          "device"_a, "stream"_a, "event"_a,
          "Make the work queued on `stream` of `device` (made current for the call) from now "
          "on wait for the work `event` last recorded; the host does not wait. DriverError "
          "when the driver refuses.");
}

// Raw driver operations, for the driver-contract tests that hold both backends to the same
// rules. Each returns (code, error name[, value]); 0 is success. They bypass aimdo's
// accounting: not for use next to a Manager's VBARs.

// Address ranges, physical memory and mappings (and making a device current).
void add_raw_memory_operations(nb::class_<Driver>& driver) {
  using namespace nb::literals;
  driver
      .def(
          "raw_make_current",
          [](Driver& d, int device) {
            // Leaves `device` current on this thread (no restore): for contract tests.
            ContextToken previous;
            return status_tuple(d.make_current(device, &previous));
          },
          release_gil())
      .def(
          "raw_reserve",
          [](Driver& d, int device, std::int64_t size, std::int64_t alignment) {
            DeviceAddress va = 0;
            const DriverStatus s = d.reserve_address_range(device, to_size(size, "size"),
                                                           to_size(alignment, "alignment"), &va);
            return std::make_tuple(s.code, std::string(s.name), va);
          },
          release_gil())
      .def(
          "raw_free_range",
          [](Driver& d, std::uint64_t va, std::int64_t size) {
            return status_tuple(d.free_address_range(va, to_size(size, "size")));
          },
          release_gil())
      .def(
          "raw_create",
          [](Driver& d, int device, std::int64_t size) {
            PhysicalHandle handle = 0;
            const DriverStatus s = d.create_physical(device, to_size(size, "size"), &handle);
            return std::make_tuple(s.code, std::string(s.name), handle);
          },
          release_gil())
      .def(
          "raw_release",
          [](Driver& d, std::uint64_t handle) { return status_tuple(d.release_physical(handle)); },
          release_gil())
      .def(
          "raw_map",
          [](Driver& d, std::uint64_t va, std::int64_t size, std::uint64_t handle) {
            return status_tuple(d.map(va, to_size(size, "size"), handle));
          },
          release_gil())
      .def(
          "raw_unmap",
          [](Driver& d, std::uint64_t va, std::int64_t size) {
            return status_tuple(d.unmap(va, to_size(size, "size")));
          },
          release_gil())
      .def(
          "raw_set_access",
          [](Driver& d, std::uint64_t va, std::int64_t size, int device) {
            return status_tuple(d.set_access(va, to_size(size, "size"), device));
          },
          release_gil())
      .def(
          "raw_copy",
          [](Driver& d, int device, std::uint64_t dst, std::uint64_t src, std::int64_t size,
             std::uintptr_t stream) {
            return status_tuple(d.copy_async(device, dst, src, to_size(size, "size"), stream));
          },
          "device"_a, "dst"_a, "src"_a, "size"_a, "stream"_a = 0, release_gil());
}

// Host-to-device copies and the events' context-dependent calls, without a guard: the
// calling thread's current device is what the test made it.
void add_raw_event_operations(nb::class_<Driver>& driver) {
  using namespace nb::literals;
  driver
      .def(
          "raw_copy_from_host",
          [](Driver& d, int device, std::uint64_t dst, std::uintptr_t src, std::int64_t size,
             std::uintptr_t stream) {
            return status_tuple(
                d.copy_from_host_async(device, dst, src, to_size(size, "size"), stream));
          },
          "device"_a, "dst"_a, "src"_a, "size"_a, "stream"_a = 0, release_gil())
      .def(
          "raw_event_create",
          [](Driver& d, int device) {
            EventHandle event = 0;
            const DriverStatus s = d.event_create(device, &event);
            return std::make_tuple(s.code, std::string(s.name), event);
          },
          release_gil())
      .def(
          "raw_event_record",
          [](Driver& d, int device, EventHandle event, std::uintptr_t stream) {
            return status_tuple(d.event_record(device, event, stream));
          },
          "device"_a, "event"_a, "stream"_a = 0, release_gil())
      .def(
          "raw_stream_wait_event",
          [](Driver& d, int device, std::uintptr_t stream, EventHandle event) {
            return status_tuple(d.stream_wait_event(device, stream, event));
          },
          release_gil());
}

// Contexts and queries.
void add_raw_context_operations(nb::class_<Driver>& driver) {
  driver
      .def(
          "raw_memory_info",
          [](Driver& d, int device) {
            std::size_t free_bytes = 0, total_bytes = 0;
            const DriverStatus s = d.memory_info(device, &free_bytes, &total_bytes);
            return std::make_tuple(s.code, std::string(s.name), free_bytes, total_bytes);
          },
          release_gil())
      .def(
          "raw_synchronize",
          [](Driver& d, int device) { return status_tuple(d.synchronize(device)); }, release_gil())
      .def(
          "raw_memory_info_on",
          [](Driver& d, int device) {
            // The same query under a guard that makes `device` current, then restores.
            ScopedDevice guard(d, device);
            if (!guard.status().ok()) {
              return std::make_tuple(guard.status().code, std::string(guard.status().name),
                                     std::size_t{0}, std::size_t{0});
            }
            std::size_t free_bytes = 0, total_bytes = 0;
            const DriverStatus s = d.memory_info(device, &free_bytes, &total_bytes);
            return std::make_tuple(s.code, std::string(s.name), free_bytes, total_bytes);
          },
          release_gil());
}

}  // namespace

void bind_driver(nb::module_& m) {
  using namespace nb::literals;
  m.def("load_cuda_driver", &load_cuda, release_gil(),
        "Load libcuda.so.1 and return the CUDA backend. Raises DriverError when it cannot.");
  nb::class_<Driver> driver(m, "Driver", "A GPU backend (the CUDA driver or the simulator).");
  driver.def_prop_ro("backend_name", [](const Driver& d) { return std::string(d.backend_name()); })
      .def("device_count",
           [](Driver& d) {
             int count = 0;
             DriverStatus status;
             {
               nb::gil_scoped_release release;
               status = d.device_count(&count);
             }
             if (!status.ok()) {
               throw DriverError(std::string("cuDeviceGetCount failed with ") + status.name, -1,
                                 "cuDeviceGetCount", status);
             }
             return count;
           })
      .def(
          "peer_link",
          [](Driver& d, int device, int peer) {
            PeerLink link;
            DriverStatus status;
            {
              nb::gil_scoped_release release;
              status = d.peer_link(device, peer, &link);
            }
            if (!status.ok()) {
              throw DriverError("peer_link(" + std::to_string(device) + ", " +
                                    std::to_string(peer) + ") failed with " + status.name,
                                device, "cuDeviceCanAccessPeer", status);
            }
            return std::make_tuple(link.access, link.performance_rank, link.native_atomics);
          },
          "device"_a, "peer"_a,
          "How `device` reaches `peer`'s memory: (access, performance rank, native atomics). "
          "DriverError for a device the backend lacks or a device asked about itself.")
      .def(
          "copy",
          [](Driver& d, int device, std::uint64_t dst, std::uint64_t src, std::int64_t size,
             std::uintptr_t stream) {
            const std::size_t bytes = to_size(size, "size");
            const DriverStatus status =
                on_device(d, device, [&] { return d.copy_async(device, dst, src, bytes, stream); });
            check(status,
                  "cuMemcpyDtoDAsync of " + std::to_string(bytes) + " bytes on device " +
                      std::to_string(device),
                  device, "cuMemcpyDtoDAsync");
          },
          "device"_a, "dst"_a, "src"_a, "size"_a, "stream"_a = 0,
          "Queue a device-to-device copy on `stream` of `device` (made current for the call). "
          "DriverError when the driver refuses it.")
      .def("current_device", &Driver::current_device, release_gil(),
           "The device whose context is current on the calling thread, or -1.");
  add_event_operations(driver);
  add_raw_memory_operations(driver);
  add_raw_event_operations(driver);
  add_raw_context_operations(driver);
}

}  // namespace aimdo::bindings
