// aimdo._core: thin nanobind bindings. Type conversion, GIL release and exception
// translation only; every decision lives in the core.
//
// Every call that can reach the driver or wait on a device lock releases the GIL, so
// Python threads driving different devices run in parallel.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "aimdo/cuda_driver.hpp"
#include "aimdo/errors.hpp"
#include "aimdo/manager.hpp"
#include "aimdo/process.hpp"
#include "sim_driver.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace aimdo {
// An integer argument from Python: any int but a bool (anything else is a TypeError);
// its range is checked where it is used, as a ValueError.
struct IntArg {
  long long value = 0;
  int overflow = 0;  // +1: above the range of long long, -1: below
};
}  // namespace aimdo

namespace nanobind::detail {
template <>
struct type_caster<aimdo::IntArg> {
  NB_TYPE_CASTER(aimdo::IntArg, const_name("int"))

  bool from_python(handle src, uint8_t, cleanup_list*) noexcept {
    PyObject* object = src.ptr();
    if (PyBool_Check(object) || !PyLong_Check(object)) return false;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(object, &overflow);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    value.value = v;
    value.overflow = overflow;
    return true;
  }

  static handle from_cpp(const aimdo::IntArg& v, rv_policy, cleanup_list*) noexcept {
    return PyLong_FromLongLong(v.value);
  }
};
}  // namespace nanobind::detail

namespace aimdo {
namespace {

using release_gil = nb::call_guard<nb::gil_scoped_release>;

// Python exception classes, created once at import; owned by the module.
struct ExceptionTypes {
  PyObject* base = nullptr;
  PyObject* out_of_memory = nullptr;
  PyObject* driver = nullptr;
  PyObject* device_not_initialized = nullptr;
  PyObject* invalid_state = nullptr;
};

PyObject* new_exception(const char* name, const char* doc, PyObject* bases) {
  PyObject* type = PyErr_NewExceptionWithDoc(name, doc, bases, nullptr);
  if (type == nullptr) throw nb::python_error();
  return type;
}

template <class... Attributes>
void raise_python(PyObject* type, const char* message, Attributes&&... attributes) {
  PyObject* instance = PyObject_CallFunction(type, "s", message);
  if (instance == nullptr) return;  // the failure to build it is the error raised
  bool ok = true;
  const auto set = [&](const char* name, nb::object value) {
    if (ok && PyObject_SetAttrString(instance, name, value.ptr()) != 0) ok = false;
  };
  (set(attributes.first, std::move(attributes.second)), ...);
  if (ok) PyErr_SetObject(type, instance);
  Py_DECREF(instance);
}

void translate(const std::exception_ptr& failure, void* payload) {
  const auto* types = static_cast<const ExceptionTypes*>(payload);
  try {
    std::rethrow_exception(failure);
  } catch (const OutOfMemoryError& e) {
    raise_python(types->out_of_memory, e.what(),
                 std::make_pair("device", nb::cast(e.device())),
                 std::make_pair("requested_bytes", nb::cast(e.requested_bytes())),
                 std::make_pair("injected", nb::cast(e.injected())));
  } catch (const DriverError& e) {
    raise_python(types->driver, e.what(), std::make_pair("device", nb::cast(e.device())),
                 std::make_pair("operation", nb::cast(e.operation())),
                 std::make_pair("code", nb::cast(e.code())),
                 std::make_pair("error_name", nb::cast(e.error_name())),
                 std::make_pair("injected", nb::cast(e.injected())));
  } catch (const DeviceNotInitializedError& e) {
    raise_python(types->device_not_initialized, e.what(),
                 std::make_pair("device", nb::cast(e.device())));
  } catch (const InvalidStateError& e) {
    raise_python(types->invalid_state, e.what());
  } catch (const InvalidArgumentError& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const Error& e) {
    raise_python(types->base, e.what());
  }
}

// Sizes arrive as Python ints; a negative one is a ValueError, not a wrapped-around size.
std::size_t to_size(std::int64_t value, const char* what) {
  if (value < 0) {
    throw InvalidArgumentError(std::string(what) + " must not be negative, got " +
                               std::to_string(value));
  }
  return static_cast<std::size_t>(value);
}

std::size_t to_size(const IntArg& arg, const char* what) {
  if (arg.overflow > 0) throw InvalidArgumentError(std::string(what) + " is too large");
  if (arg.overflow < 0) throw InvalidArgumentError(std::string(what) + " must not be negative");
  return to_size(static_cast<std::int64_t>(arg.value), what);
}

int to_device(const IntArg& arg) {
  if (arg.overflow != 0 || arg.value < -1 || arg.value > 1 << 20) {
    throw InvalidArgumentError("device ordinal out of range");
  }
  return static_cast<int>(arg.value);
}

nb::dict stats_dict(const DeviceStatsSnapshot& s) {
  nb::dict d;
  d["faults"] = s.faults;
  d["hits"] = s.hits;
  d["offloaded"] = s.offloaded;
  d["pages_mapped"] = s.pages_mapped;
  d["pages_released"] = s.pages_released;
  d["evictions"] = s.evictions;
  d["evicted_bytes"] = s.evicted_bytes;
  d["synchronizes"] = s.synchronizes;
  d["polls"] = s.polls;
  d["transient_retries"] = s.transient_retries;
  d["oom_retries"] = s.oom_retries;
  d["pages_recycled"] = s.pages_recycled;
  return d;
}

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

// The Manager that PyTorch's pluggable allocator reaches (aimdo.torch.use_allocator).
// PyTorch takes plain C functions with no user data, so this is the one piece of
// process-wide mutable state in aimdo: set once by use_allocator, read by every
// allocation. A shared_ptr keeps the Manager alive while a call is in flight.
std::mutex g_allocator_mutex;
std::shared_ptr<Manager> g_allocator_manager;

std::shared_ptr<Manager> allocator_manager() {
  std::lock_guard<std::mutex> lock(g_allocator_mutex);
  return g_allocator_manager;
}

}  // namespace
}  // namespace aimdo

// PyTorch's CUDAPluggableAllocator entry points (looked up by name in this library).
// PyTorch does not check the pointer an allocator returns, so a failure must not be a
// null pointer: aimdo_torch_alloc throws std::runtime_error with aimdo's message, which
// PyTorch's C++ passes up to Python as a RuntimeError. A zero-byte request gets null.
extern "C" __attribute__((visibility("default"))) void* aimdo_torch_alloc(
    std::size_t size, int device, void* stream) {
  if (size == 0) return nullptr;
  auto manager = aimdo::allocator_manager();
  if (!manager) {
    throw std::runtime_error(
        "aimdo: no Manager behind PyTorch's allocator (call aimdo.torch.use_allocator)");
  }
  try {
    return reinterpret_cast<void*>(
        manager->external_alloc(device, size, reinterpret_cast<aimdo::StreamHandle>(stream)));
  } catch (const std::exception& error) {
    throw std::runtime_error(std::string("aimdo: ") + error.what());
  }
}

extern "C" __attribute__((visibility("default"))) void aimdo_torch_free(
    void* ptr, std::size_t, int, void* stream) noexcept {
  try {
    auto manager = aimdo::allocator_manager();
    if (manager && ptr != nullptr) {
      manager->external_free(reinterpret_cast<aimdo::DeviceAddress>(ptr),
                             reinterpret_cast<aimdo::StreamHandle>(stream));
    }
  } catch (...) {
    // Nothing to report to: PyTorch's free returns void. The pointer stays accounted.
  }
}

NB_MODULE(_core, m) {
  using namespace aimdo;
  m.doc() = "aimdo's native core. Import `aimdo`, not this module.";
  // Objects still alive when the interpreter exits are normal for a Python library (a
  // global Manager, a module-level model); nanobind's report of them would read as a bug.
  nb::set_leak_warnings(false);

  auto* types = new ExceptionTypes();  // lives as long as the process: translators need it
  types->base = new_exception("aimdo.AimdoError", "Base of every error aimdo raises.", nullptr);
  {
    nb::object oom_bases = nb::make_tuple(nb::handle(types->base), nb::handle(PyExc_MemoryError));
    types->out_of_memory = new_exception(
        "aimdo.OutOfMemoryError",
        "A device, or the budget aimdo was given on it, cannot supply the memory asked for.",
        oom_bases.ptr());
    nb::object runtime_bases =
        nb::make_tuple(nb::handle(types->base), nb::handle(PyExc_RuntimeError));
    types->driver = new_exception(
        "aimdo.DriverError", "The GPU driver answered an error aimdo cannot handle.",
        runtime_bases.ptr());
    nb::object lookup_bases =
        nb::make_tuple(nb::handle(types->base), nb::handle(PyExc_LookupError));
    types->device_not_initialized = new_exception(
        "aimdo.DeviceNotInitializedError",
        "A device was used that the Manager was not told to initialize.", lookup_bases.ptr());
    types->invalid_state = new_exception(
        "aimdo.InvalidStateError",
        "The object's state forbids the call (closed, or unpin without a fault).",
        runtime_bases.ptr());
  }
  m.attr("AimdoError") = nb::borrow(types->base);
  m.attr("OutOfMemoryError") = nb::borrow(types->out_of_memory);
  m.attr("DriverError") = nb::borrow(types->driver);
  m.attr("DeviceNotInitializedError") = nb::borrow(types->device_not_initialized);
  m.attr("InvalidStateError") = nb::borrow(types->invalid_state);
  nb::register_exception_translator(&translate, types);
  // Where Vbar.alloc starts each allocation: its offset is a multiple of this many bytes,
  // so n allocations of s bytes need (n - 1) * round_up(s, this) + s bytes of a VBAR.
  m.attr("ALLOCATION_ALIGNMENT_BYTES") = Vbar::kAllocationAlignment;

  m.def("noop", [](const Allocation&) {},
        "Does nothing with an Allocation: the baseline of benchmarks.fault_path.");
  m.def("set_process_exiting", &set_process_exiting,
        "Tell the core the interpreter is exiting: destructors stop calling the driver.");
  m.def(
      "set_allocator_manager",
      [](std::shared_ptr<Manager> manager) {
        std::shared_ptr<Manager> previous;
        {
          std::lock_guard<std::mutex> lock(g_allocator_mutex);
          previous = std::move(g_allocator_manager);
          g_allocator_manager = std::move(manager);
        }
      },
      "manager"_a.none(),
      "Route aimdo_torch_alloc/aimdo_torch_free (PyTorch's pluggable allocator) to a Manager.");
  m.def(
      "serves_allocator",
      [](const Manager& manager) { return allocator_manager().get() == &manager; },
      "manager"_a, "Whether PyTorch's allocator currently allocates through `manager`.");
  m.def("load_cuda_driver", &load_cuda, release_gil(),
        "Load libcuda.so.1 and return the CUDA backend. Raises DriverError when it cannot.");

  nb::class_<Driver>(m, "Driver", "A GPU backend (the CUDA driver or the simulator).")
      .def_prop_ro("backend_name", [](const Driver& d) { return std::string(d.backend_name()); })
      .def("device_count", [](Driver& d) {
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
      .def("current_device", &Driver::current_device, release_gil(),
           "The device whose context is current on the calling thread, or -1.")
      // Raw driver operations, for the driver-contract tests that hold both backends to
      // the same rules. Each returns (code, error name[, value]); 0 is success. They
      // bypass aimdo's accounting: not for use next to a Manager's VBARs.
      .def("raw_make_current",
           [](Driver& d, int device) {
             // Leaves `device` current on this thread (no restore): for contract tests.
             ContextToken previous;
             return status_tuple(d.make_current(device, &previous));
           },
           release_gil())
      .def("raw_reserve",
           [](Driver& d, int device, std::int64_t size, std::int64_t alignment) {
             DeviceAddress va = 0;
             const DriverStatus s = d.reserve_address_range(device, to_size(size, "size"),
                                                            to_size(alignment, "alignment"), &va);
             return std::make_tuple(s.code, std::string(s.name), va);
           },
           release_gil())
      .def("raw_free_range",
           [](Driver& d, std::uint64_t va, std::int64_t size) {
             return status_tuple(d.free_address_range(va, to_size(size, "size")));
           },
           release_gil())
      .def("raw_create",
           [](Driver& d, int device, std::int64_t size) {
             PhysicalHandle handle = 0;
             const DriverStatus s = d.create_physical(device, to_size(size, "size"), &handle);
             return std::make_tuple(s.code, std::string(s.name), handle);
           },
           release_gil())
      .def("raw_release",
           [](Driver& d, std::uint64_t handle) { return status_tuple(d.release_physical(handle)); },
           release_gil())
      .def("raw_map",
           [](Driver& d, std::uint64_t va, std::int64_t size, std::uint64_t handle) {
             return status_tuple(d.map(va, to_size(size, "size"), handle));
           },
           release_gil())
      .def("raw_unmap",
           [](Driver& d, std::uint64_t va, std::int64_t size) {
             return status_tuple(d.unmap(va, to_size(size, "size")));
           },
           release_gil())
      .def("raw_set_access",
           [](Driver& d, std::uint64_t va, std::int64_t size, int device) {
             return status_tuple(d.set_access(va, to_size(size, "size"), device));
           },
           release_gil())
      .def("raw_memory_info",
           [](Driver& d, int device) {
             std::size_t free_bytes = 0, total_bytes = 0;
             const DriverStatus s = d.memory_info(device, &free_bytes, &total_bytes);
             return std::make_tuple(s.code, std::string(s.name), free_bytes, total_bytes);
           },
           release_gil())
      .def("raw_synchronize",
           [](Driver& d, int device) { return status_tuple(d.synchronize(device)); },
           release_gil())
      .def("raw_memory_info_on",
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

  nb::class_<Signature>(m, "Signature",
                        "Per-page serial numbers from a fault. Equal to an earlier signature "
                        "of the same allocation exactly when no page under it was re-mapped.")
      .def_prop_ro("serials", [](const Signature& s) {
        nb::list out;
        for (auto serial : s.serials) out.append(serial);
        return nb::tuple(out);
      })
      .def("__eq__", [](const Signature& a, const Signature& b) { return a == b; }, nb::is_operator())
      .def("__eq__", [](const Signature&, nb::handle) { return false; }, nb::is_operator())
      .def("__ne__", [](const Signature& a, const Signature& b) { return a != b; }, nb::is_operator())
      .def("__ne__", [](const Signature&, nb::handle) { return true; }, nb::is_operator())
      .def("__hash__", [](const Signature& s) {
        std::uint64_t h = 1469598103934665603ULL;
        for (auto serial : s.serials) h = (h ^ serial) * 1099511628211ULL;
        return static_cast<Py_hash_t>(h >> 1);
      })
      .def("__len__", [](const Signature& s) { return s.serials.size(); })
      .def("__repr__", [](const Signature& s) {
        std::string out = "Signature(";
        for (std::size_t i = 0; i < s.serials.size(); ++i) {
          out += (i ? ", " : "") + std::to_string(s.serials[i]);
        }
        return out + ")";
      });

  nb::class_<Allocation>(m, "Allocation", "A byte range of a VBAR handed to one tensor.")
      .def_prop_ro("offset", [](const Allocation& a) { return a.offset_bytes; },
                   "Bytes from the VBAR's base (512-byte aligned).")
      .def_prop_ro("size", [](const Allocation& a) { return a.size_bytes; }, "Bytes.")
      .def_prop_ro("address", &Allocation::address, "Device virtual address of the first byte.")
      .def_prop_ro("vbar", [](const Allocation& a) { return a.vbar; })
      .def_prop_ro("device", [](const Allocation& a) { return a.vbar->device(); })
      .def("__repr__", [](const Allocation& a) {
        return "Allocation(device=" + std::to_string(a.vbar->device()) +
               ", offset=" + std::to_string(a.offset_bytes) + ", size=" +
               std::to_string(a.size_bytes) + ")";
      });

  nb::class_<Vbar>(m, "Vbar", "One model's reserved address range on one device (DESIGN §1).")
      .def_prop_ro("device", &Vbar::device)
      .def_prop_ro("driver", &Vbar::driver, "The backend its memory belongs to.")
      .def_prop_ro("size", &Vbar::size_bytes, "Bytes asked for at creation.")
      .def_prop_ro("page_size", &Vbar::page_size_bytes)
      .def_prop_ro("page_count", &Vbar::page_count)
      .def_prop_ro("address", &Vbar::base_address, "Device virtual address of the range.")
      .def("alloc", [](Vbar& v, IntArg n) { return v.alloc(to_size(n, "nbytes")); },
           "nbytes"_a, release_gil(),
           "Hand out the next `nbytes` of the range (512-byte aligned, in call order).")
      .def(
          "fault",
          [](Vbar& v, const Allocation& a) {
            // A hit needs neither the driver nor a wait: done with the GIL held. Anything
            // else runs with the GIL released.
            std::optional<Signature> out;
            if (v.try_fault(a, &out)) return out;
            nb::gil_scoped_release release;
            return v.fault(a);
          },
          "allocation"_a,
          "Make the allocation resident and pin it: its Signature, or None if offloaded.")
      .def(
          "unpin",
          [](Vbar& v, const Allocation& a) {
            if (v.try_unpin(a)) return;
            nb::gil_scoped_release release;
            v.unpin(a);
          },
          "allocation"_a, "Drop the pin taken by one successful fault.")
      .def("prioritize", &Vbar::prioritize, release_gil(),
           "Move to the top of the device's priority list; reset the watermark to all pages.")
      .def("deprioritize", &Vbar::deprioritize, release_gil(),
           "Move to the bottom of the device's priority list.")
      .def_prop_ro("watermark_bytes", [](const Vbar& v) {
        nb::gil_scoped_release release;
        return v.watermark_bytes();
      })
      .def("set_watermark",
           [](Vbar& v, IntArg n) { v.set_watermark(to_size(n, "nbytes")); }, "nbytes"_a,
           release_gil(),
           "Offload pages starting at or above `nbytes` (rounded up to a page), releasing "
           "unpinned ones; may also raise the watermark.")
      .def_prop_rw(
          "floor_bytes",
          [](const Vbar& v) {
            nb::gil_scoped_release release;
            return v.floor_bytes();
          },
          [](Vbar& v, IntArg n) {
            const std::size_t bytes = to_size(n, "floor_bytes");
            nb::gil_scoped_release release;
            v.set_floor(bytes);
          },
          "Eviction never lowers the watermark below this (rounded up to a page).")
      .def("free_memory",
           [](Vbar& v, IntArg n) { return v.free_memory(to_size(n, "nbytes")); },
           "nbytes"_a, release_gil(), "Evict from this VBAR alone; returns bytes freed.")
      .def_prop_ro("loaded_bytes", [](const Vbar& v) {
        nb::gil_scoped_release release;
        return v.loaded_bytes();
      })
      .def_prop_ro("allocated_bytes", [](const Vbar& v) {
        nb::gil_scoped_release release;
        return v.allocated_bytes();
      })
      .def("residency",
           [](const Vbar& v) {
             std::vector<PageResidency> pages;
             {
               nb::gil_scoped_release release;
               pages = v.residency();
             }
             nb::list out;
             for (const auto& p : pages) out.append(nb::make_tuple(p.resident, p.pinned));
             return out;
           },
           "Per page: (resident, pinned).")
      .def("close", &Vbar::close, release_gil(),
           "Release every page (pinned ones too) and the address range. Idempotent.")
      .def_prop_ro("closed", [](const Vbar& v) {
        nb::gil_scoped_release release;
        return v.closed();
      });

  nb::class_<Manager>(m, "Manager", "Owns a backend and per-device state. Use aimdo.Manager.")
      .def(nb::init<std::shared_ptr<Driver>>(), "driver"_a)
      .def_prop_ro("driver", [](const Manager& mgr) { return mgr.driver_ptr(); })
      .def(
          "add_devices",
          [](Manager& mgr, const std::vector<std::tuple<IntArg, std::optional<IntArg>, IntArg,
                                                        IntArg, IntArg, IntArg, int, IntArg,
                                                        bool>>& entries) {
            // (device, vram_limit or None, headroom, extra_headroom, page_size,
            //  poll_interval_ns, transient_retries, allocator_headroom, recycle_pages), all or
            //  nothing.
            std::vector<std::pair<int, DeviceOptions>> wanted;
            for (const auto& [device, limit, headroom, extra, page, poll, retries, allocator,
                              recycle] : entries) {
              DeviceOptions options;
              if (limit) options.vram_limit_bytes = to_size(*limit, "vram_limit");
              options.headroom_bytes = to_size(headroom, "headroom");
              options.extra_headroom_bytes = to_size(extra, "extra_headroom");
              options.page_size_bytes = to_size(page, "page_size");
              options.poll_interval_ns = static_cast<std::int64_t>(to_size(poll, "poll_interval"));
              options.transient_retries = retries;
              options.allocator_headroom_bytes = to_size(allocator, "allocator_headroom");
              options.recycle_pages = recycle;
              wanted.emplace_back(to_device(device), options);
            }
            nb::gil_scoped_release release;
            mgr.add_devices(wanted);
          },
          "entries"_a)
      .def_prop_ro("devices", [](const Manager& mgr) {
        nb::gil_scoped_release release;
        return mgr.devices();
      })
      .def("create_vbar",
           [](Manager& mgr, IntArg device, IntArg size) {
             return mgr.create_vbar(to_device(device), to_size(size, "size"));
           },
           "device"_a, "size"_a, release_gil())
      .def("reclaim",
           [](Manager& mgr, IntArg device, IntArg n) {
             return mgr.reclaim(to_device(device), to_size(n, "nbytes"));
           },
           "device"_a, "nbytes"_a, release_gil())
      .def("reset_floors",
           [](Manager& mgr, std::optional<IntArg> device) {
             std::optional<int> ordinal;
             if (device) ordinal = to_device(*device);
             nb::gil_scoped_release release;
             mgr.reset_floors(ordinal);
           },
           "device"_a.none())
      .def("resident_bytes", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->resident_bytes(); },
           "device"_a, release_gil())
      .def("usage_bytes", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->usage_bytes(); },
           "device"_a, release_gil())
      .def("budget_bytes", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->budget_bytes(); },
           "device"_a, release_gil())
      .def("limit_bytes", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->limit_bytes(); },
           "device"_a, release_gil())
      .def("deficit_bytes",
           [](Manager& mgr, IntArg d, IntArg n) {
             return mgr.device(to_device(d))->deficit_bytes(to_size(n, "nbytes"));
           },
           "device"_a, "nbytes"_a, release_gil())
      .def("poll",
           [](Manager& mgr, IntArg d) {
             Device::PollRecord record;
             {
               nb::gil_scoped_release release;
               record = mgr.device(to_device(d))->poll();
             }
             nb::dict out;
             out["time"] = static_cast<double>(record.time_ns) / 1e9;
             out["free_bytes"] = record.free_bytes;
             out["usage_bytes"] = record.usage_bytes;
             return out;
           },
           "device"_a)
      .def("memory_info",
           [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->memory_info(); }, "device"_a,
           release_gil())
      .def("external_alloc",
           [](Manager& mgr, IntArg d, IntArg n, std::uintptr_t stream) {
             const int device = to_device(d);
             const std::size_t bytes = to_size(n, "nbytes");
             nb::gil_scoped_release release;
             return mgr.external_alloc(device, bytes, stream);
           },
           "device"_a, "nbytes"_a, "stream"_a)
      .def("external_free", &Manager::external_free, "ptr"_a, "stream"_a, release_gil())
      .def("external_bytes", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->external_bytes(); },
           "device"_a, release_gil())
      .def("vbar_count", [](Manager& mgr, IntArg d) { return mgr.device(to_device(d))->vbar_count(); },
           "device"_a, release_gil())
      .def("stats",
           [](Manager& mgr, IntArg d) {
             DeviceStatsSnapshot snapshot;
             {
               nb::gil_scoped_release release;
               snapshot = mgr.device(to_device(d))->stats();
             }
             return stats_dict(snapshot);
           },
           "device"_a)
      .def("device_info",
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
             out["vram_limit"] = options.vram_limit_bytes ? nb::cast(*options.vram_limit_bytes)
                                                          : nb::none();
             out["headroom"] = options.headroom_bytes;
             out["extra_headroom"] = options.extra_headroom_bytes;
             out["page_size"] = options.page_size_bytes;
             out["poll_interval"] = static_cast<double>(options.poll_interval_ns) / 1e9;
             out["allocator_headroom"] = options.allocator_headroom_bytes;
             out["recycle_pages"] = options.recycle_pages;
             return out;
           },
           "device"_a)
      .def("close", &Manager::close, release_gil())
      .def_prop_ro("closed", [](const Manager& mgr) {
        nb::gil_scoped_release release;
        return mgr.closed();
      });
}
