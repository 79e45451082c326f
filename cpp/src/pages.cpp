// One page at a time: mapping it (each step owned until the page table takes it, undone
// in reverse on failure), releasing it, and the memory a fault recycles.
#include <algorithm>
#include <exception>
#include <optional>
#include <string>

#include "aimdo/device.hpp"
#include "aimdo/errors.hpp"
#include "aimdo/vbar.hpp"
#include "check.hpp"
#include "device_internal.hpp"
#include "first_failure.hpp"

namespace aimdo {

// What one page has been given so far on its way to residency: physical memory, then the
// mapping of it. Owned until commit() hands it to the page table; otherwise undo() (or
// the destructor) gives it back in reverse order. What the driver refuses to give back is
// kept in the device's leftovers, counted as usage and retried by later releases and
// closes: nothing is forgotten while the driver still holds it.
class Device::PageInProgress {
 public:
  PageInProgress(Device& device, const Vbar& vbar, DeviceAddress va)
      : device_(device), vbar_base_(vbar.base_), va_(va), bytes_(vbar.page_size_bytes_) {}
  ~PageInProgress() { undo(); }
  PageInProgress(const PageInProgress&) = delete;
  PageInProgress& operator=(const PageInProgress&) = delete;

  void own(PhysicalHandle handle) noexcept { handle_ = handle; }
  void own_mapping() noexcept { mapped_ = true; }
  PhysicalHandle commit() noexcept {
    const PhysicalHandle handle = handle_;
    handle_ = 0;
    mapped_ = false;
    return handle;
  }

  // Gives back what is owned; returns the first refusal, success when all went back.
  DriverStatus undo() noexcept {
    DriverStatus status = DriverStatus::success();
    if (mapped_) {
      status = device_.retrying_twice([&] { return device_.driver_->unmap(va_, bytes_); });
      mapped_ = false;
      if (!status.ok()) {
        keep(true);
        return status;
      }
    }
    if (handle_ != 0) {
      status = device_.retrying_twice([&] { return device_.driver_->release_physical(handle_); });
      if (!status.ok()) keep(false);
      handle_ = 0;
    }
    return status;
  }

 private:
  void keep(bool mapped) noexcept {
    try {
      device_.keep_leftover_locked(Leftover{vbar_base_, va_, bytes_, handle_, mapped, false});
    } catch (...) {
      // Out of host memory for the list: the driver keeps the page; the leak report of
      // the simulator shows it. Nothing else can be done from here.
    }
    handle_ = 0;
  }

  Device& device_;
  const DeviceAddress vbar_base_;
  const DeviceAddress va_;
  const std::size_t bytes_;
  PhysicalHandle handle_ = 0;
  bool mapped_ = false;
};

void Device::synchronize_locked() {
  std::optional<ScopedDevice> guard;
  activate(guard);
  const DriverStatus status = retrying([&] { return driver_->synchronize(ordinal_); });
  if (!status.ok()) raise(status, "cuCtxSynchronize", 0);
  stats_.add(&DeviceStats::synchronizes);
}

void Device::keep_leftover_locked(const Leftover& item) {
  leftovers_.push_back(item);
  if (item.handle != 0) resident_bytes_ += item.bytes;
}

void Device::release_page_locked(Vbar& vbar, std::size_t page, bool& synced, Recycled* recycle) {
  // Kernels queued before this point may still read the page.
  if (!synced) {
    synchronize_locked();
    synced = true;
  }
  std::optional<ScopedDevice> guard;
  activate(guard);
  Vbar::Page& state = vbar.pages_[page];
  const std::size_t page_size = vbar.page_size_bytes_;
  const DeviceAddress va = vbar.base_ + page * page_size;
  // Releasing is retried once even after a hard error: a page lost to the driver costs
  // more than one more call. A failed unmap leaves the page resident and accounted.
  DriverStatus status = retrying_twice([&] { return driver_->unmap(va, page_size); });
  if (!status.ok()) raise(status, "cuMemUnmap", page_size);
  const PhysicalHandle handle = state.handle;
  state.handle = 0;
  AIMDO_ASSERT(vbar.resident_pages_ > 0 && resident_bytes_ >= page_size);
  --vbar.resident_pages_;
  stats_.add(&DeviceStats::pages_released);
  if (recycle != nullptr && options_.recycle_pages && recycle->page_bytes == page_size) {
    recycle->handles.push_back(handle);  // still usage: the fault maps it again at once
    return;
  }
  resident_bytes_ -= page_size;
  status = retrying_twice([&] { return driver_->release_physical(handle); });
  if (!status.ok()) {
    // Unmapped, but the driver still holds the memory: kept (and counted) for a retry.
    keep_leftover_locked(Leftover{vbar.base_, va, page_size, handle, false, false});
    raise(status, "cuMemRelease", page_size);
  }
}

void Device::release_recycled_locked(Recycled& recycle) {
  detail::FirstFailure failure;
  while (!recycle.handles.empty()) {
    const PhysicalHandle handle = recycle.handles.back();
    recycle.handles.pop_back();
    AIMDO_ASSERT(resident_bytes_ >= recycle.page_bytes);
    resident_bytes_ -= recycle.page_bytes;
    const DriverStatus status = retrying_twice([&] { return driver_->release_physical(handle); });
    if (status.ok()) continue;
    keep_leftover_locked(Leftover{0, 0, recycle.page_bytes, handle, false, false});
    failure.run([&] { raise(status, "cuMemRelease", recycle.page_bytes); });
  }
  failure.rethrow();
}

DriverStatus Device::make_page_locked(Vbar& vbar, std::size_t page, Recycled* recycle,
                                      const char** operation) {
  const std::size_t page_size = vbar.page_size_bytes_;
  const DeviceAddress va = vbar.base_ + page * page_size;
  PageInProgress making(*this, vbar, va);
  PhysicalHandle handle = 0;
  *operation = "cuMemCreate";
  DriverStatus status = DriverStatus::success();
  if (recycle != nullptr && !recycle->handles.empty()) {
    // Recycled memory is counted in resident_bytes_ already (release_page_locked).
    handle = recycle->handles.back();
    recycle->handles.pop_back();
    AIMDO_ASSERT(resident_bytes_ >= page_size);
    resident_bytes_ -= page_size;
    stats_.add(&DeviceStats::pages_recycled);
  } else {
    status = retrying([&] { return driver_->create_physical(ordinal_, page_size, &handle); });
    if (!status.ok()) return status;
  }
  making.own(handle);
  *operation = "cuMemMap";
  status = retrying([&] { return driver_->map(va, page_size, handle); });
  if (!status.ok()) return status;
  making.own_mapping();
  *operation = "cuMemSetAccess";
  status = retrying([&] { return driver_->set_access(va, page_size, ordinal_); });
  for (std::size_t i = 0; status.ok() && i < vbar.readers_.size(); ++i) {
    const int reader = vbar.readers_[i];
    status = retrying([&] { return driver_->set_access(va, page_size, reader); });
  }
  if (!status.ok()) {
    const DriverStatus undone = making.undo();
    if (!undone.ok()) {
      raise(status, *operation, page_size,
            std::string("; giving the page back failed too (") + undone.name +
                "): the driver keeps it, and aimdo counts it until a later release succeeds");
    }
    return status;
  }
  Vbar::Page& state = vbar.pages_[page];
  state.handle = making.commit();
  state.serial = next_serial_++;
  ++vbar.resident_pages_;
  resident_bytes_ += page_size;
  stats_.add(&DeviceStats::pages_mapped);
  return status;
}

void Device::map_page_locked(Vbar& vbar, std::size_t page, std::size_t last_page,
                             Recycled* recycle) {
  const std::size_t page_size = vbar.page_size_bytes_;
  std::optional<ScopedDevice> guard;
  activate(guard);
  // A page whose earlier mapping could not be undone is still mapped in the driver: give
  // it back first (or report that the driver still refuses).
  const DeviceAddress va = vbar.base_ + page * page_size;
  if (std::any_of(leftovers_.begin(), leftovers_.end(),
                  [&](const Leftover& item) { return item.mapped && item.address == va; })) {
    release_leftovers_locked(vbar.base_, va);
  }
  for (int attempt = 0;; ++attempt) {
    const char* operation = nullptr;
    const DriverStatus status = make_page_locked(vbar, page, recycle, &operation);
    if (status.ok()) return;
    if (status.kind() == DriverErrorKind::out_of_memory && attempt == 0) {
      // The driver knows better than our figures: make one more page of room, under the
      // fault's rule (nothing more important than the fault's own pages), and retry once.
      stats_.add(&DeviceStats::oom_retries);
      evict_for_fault_locked(page_size, vbar, last_page, nullptr);
      continue;
    }
    raise(status, operation, page_size);
  }
}

}  // namespace aimdo
