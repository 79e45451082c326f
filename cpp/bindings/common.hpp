// Shared by the binding files of aimdo._core: the integer argument type, the size and
// device conversions, and one bind_* function per concern. Bindings hold no policy: type
// conversion, GIL release and exception translation only.
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>
#include <cstdint>

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

namespace aimdo::bindings {

namespace nb = nanobind;
using namespace nb::literals;  // "name"_a in every binding file
using release_gil = nb::call_guard<nb::gil_scoped_release>;

// Sizes arrive as Python ints; a negative or oversized one is a ValueError (the core's
// InvalidArgumentError), never a wrapped-around size. Ranges beyond this are the core's.
std::size_t to_size(std::int64_t value, const char* what);
std::size_t to_size(const IntArg& arg, const char* what);
// A device ordinal (or -1, "none"), else a ValueError.
int to_device(const IntArg& arg);
// A signed count of nanoseconds that must not be negative.
std::int64_t to_ns(const IntArg& arg, const char* what);

void bind_errors(nb::module_& m);      // the exception types and their translator
void bind_process(nb::module_& m);     // process-exit flag, PyTorch's allocator routing
void bind_driver(nb::module_& m);      // Driver, the raw operations, loading the CUDA backend
void bind_adaptors(nb::module_& m);    // operations table, EventLog, Recording/FailingDriver
void bind_sim(nb::module_& m);         // SimDriver, replay on it
void bind_vbar(nb::module_& m);        // Signature, Allocation, Vbar
void bind_manager(nb::module_& m);     // DeviceOptions, Manager
void bind_file_reads(nb::module_& m);  // FileReads: checkpoint reads without the GIL
void bind_file_pump(nb::module_& m);   // FilePump: reads and copies to a device, no GIL

}  // namespace aimdo::bindings
