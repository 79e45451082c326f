// Process-wide state of aimdo._core: the interpreter-exit flag and the Manager behind
// PyTorch's pluggable allocator, with the allocator's C entry points.
#include <nanobind/stl/shared_ptr.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "aimdo/manager.hpp"
#include "aimdo/process.hpp"
#include "common.hpp"

namespace aimdo::bindings {
namespace {

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
}  // namespace aimdo::bindings

// PyTorch's CUDAPluggableAllocator entry points (looked up by name in this library).
// PyTorch does not check the pointer an allocator returns, so a failure must not be a
// null pointer: aimdo_torch_alloc throws std::runtime_error with aimdo's message, which
// PyTorch's C++ passes up to Python as a RuntimeError. A zero-byte request gets null.
extern "C" __attribute__((visibility("default"))) void* aimdo_torch_alloc(std::size_t size,
                                                                          int device,
                                                                          void* stream) {
  if (size == 0) return nullptr;
  auto manager = aimdo::bindings::allocator_manager();
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

extern "C" __attribute__((visibility("default"))) void aimdo_torch_free(void* ptr, std::size_t, int,
                                                                        void* stream) noexcept {
  try {
    auto manager = aimdo::bindings::allocator_manager();
    if (manager && ptr != nullptr) {
      manager->external_free(reinterpret_cast<aimdo::DeviceAddress>(ptr),
                             reinterpret_cast<aimdo::StreamHandle>(stream));
    }
  } catch (...) {
    // Nothing to report to: PyTorch's free returns void. The pointer stays accounted.
  }
}

namespace aimdo::bindings {

void bind_process(nb::module_& m) {
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
      [](const Manager& manager) { return allocator_manager().get() == &manager; }, "manager"_a,
      "Whether PyTorch's allocator currently allocates through `manager`.");
}

}  // namespace aimdo::bindings
