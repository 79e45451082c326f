// The exception types of aimdo._core and the translator from the core's C++ errors.
#include <nanobind/stl/string.h>

#include <exception>
#include <utility>

#include "aimdo/errors.hpp"
#include "common.hpp"

namespace aimdo::bindings {
namespace {

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
    raise_python(types->out_of_memory, e.what(), std::make_pair("device", nb::cast(e.device())),
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

}  // namespace

void bind_errors(nb::module_& m) {
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
    types->driver =
        new_exception("aimdo.DriverError", "The GPU driver answered an error aimdo cannot handle.",
                      runtime_bases.ptr());
    nb::object lookup_bases =
        nb::make_tuple(nb::handle(types->base), nb::handle(PyExc_LookupError));
    types->device_not_initialized = new_exception(
        "aimdo.DeviceNotInitializedError",
        "A device was used that the Manager was not told to initialize.", lookup_bases.ptr());
    types->invalid_state =
        new_exception("aimdo.InvalidStateError",
                      "The object's state forbids the call (closed, or unpin without a fault).",
                      runtime_bases.ptr());
  }
  m.attr("AimdoError") = nb::borrow(types->base);
  m.attr("OutOfMemoryError") = nb::borrow(types->out_of_memory);
  m.attr("DriverError") = nb::borrow(types->driver);
  m.attr("DeviceNotInitializedError") = nb::borrow(types->device_not_initialized);
  m.attr("InvalidStateError") = nb::borrow(types->invalid_state);
  nb::register_exception_translator(&translate, types);
}

}  // namespace aimdo::bindings
