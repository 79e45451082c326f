#include "aimdo/vbar.hpp"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>

#include "aimdo/device.hpp"
#include "aimdo/errors.hpp"
#include "aimdo/process.hpp"
#include "check.hpp"
#include "format.hpp"
#include "limits.hpp"

namespace aimdo {
namespace {

std::size_t pages_for(std::size_t bytes, std::size_t page_size) {
  return (bytes + page_size - 1) / page_size;
}

}  // namespace

DeviceAddress Allocation::address() const noexcept {
  return vbar ? vbar->base_address() + offset_bytes : 0;
}

Vbar::Vbar(std::shared_ptr<Device> device, DeviceAddress base, std::size_t size_bytes,
           std::size_t page_size_bytes)
    : device_(std::move(device)),
      base_(base),
      size_bytes_(size_bytes),
      page_size_bytes_(page_size_bytes),
      pages_(pages_for(size_bytes, page_size_bytes)),
      watermark_pages_(pages_.size()) {}

Vbar::~Vbar() {
  try {
    std::lock_guard<std::mutex> lock(device_->mutex());
    if (process_exiting()) {
      // The driver may be gone (the OS reclaims everything), but the device's priority
      // list must not keep a pointer to this object: a thread still running may walk it.
      device_->forget_vbar_locked(*this);
      return;
    }
    device_->close_vbar_locked(*this);
  } catch (...) {
    // A destructor cannot report. What the driver kept stays in the device's leftovers,
    // retried by the next close of the device (or Manager).
  }
}

int Vbar::device() const noexcept {
  return device_->ordinal();
}

std::shared_ptr<Driver> Vbar::driver() const noexcept {
  return device_->driver_ptr();
}

void Vbar::check_open_locked() const {
  if (closed_) {
    throw InvalidStateError("this VBAR (device " + std::to_string(device()) +
                            ") is closed; create a new one with Manager.create_vbar");
  }
}

void Vbar::check_owned(const Allocation& allocation) const {
  if (allocation.vbar.get() != this) {
    throw InvalidArgumentError(
        "the allocation belongs to another VBAR (device " +
        (allocation.vbar ? std::to_string(allocation.vbar->device()) : std::string("none")) +
        "), not to this one (device " + std::to_string(device()) + ")");
  }
}

Allocation Vbar::alloc(std::size_t size_bytes) {
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  const std::size_t offset =
      (next_offset_bytes_ + kAllocationAlignment - 1) / kAllocationAlignment * kAllocationAlignment;
  if (size_bytes == 0 || size_bytes > detail::kMaxSizeBytes || offset > size_bytes_ ||
      size_bytes > size_bytes_ - offset) {
    throw InvalidArgumentError(
        "cannot allocate " + detail::format_bytes(size_bytes) +
        " in this VBAR: size must be "
        "positive and fit in the " +
        detail::format_bytes(offset <= size_bytes_ ? size_bytes_ - offset : 0) + " left of its " +
        detail::format_bytes(size_bytes_));
  }
  if (allocations_.size() >= UINT32_MAX) {
    throw InvalidArgumentError("this VBAR already holds the maximum number of allocations");
  }
  allocations_.push_back(AllocationRecord{offset, size_bytes, 0});
  next_offset_bytes_ = offset + size_bytes;
  Allocation out;
  out.vbar = shared_from_this();
  out.index = static_cast<std::uint32_t>(allocations_.size() - 1);
  out.offset_bytes = offset;
  out.size_bytes = size_bytes;
  return out;
}

std::optional<Signature> Vbar::fault(const Allocation& allocation) {
  check_owned(allocation);
  std::unique_lock<std::mutex> lock(device_->mutex());
  std::optional<Signature> out;
  fault_locked(allocation, true, &out);
  device_->check_invariants_locked();
  return out;
}

bool Vbar::try_fault(const Allocation& allocation, std::optional<Signature>* out) {
  check_owned(allocation);
  std::unique_lock<std::mutex> lock(device_->mutex(), std::try_to_lock);
  if (!lock.owns_lock() || !fault_locked(allocation, false, out)) return false;
  device_->check_invariants_locked();
  return true;
}

bool Vbar::fault_locked(const Allocation& allocation, bool may_block,
                        std::optional<Signature>* out) {
  Device& device = *device_;
  check_open_locked();
  // Without the driver, only a hit or an offloaded answer can be given, and only when
  // the budget's figures are current.
  if (!may_block && device.poll_due_locked()) return false;
  AllocationRecord& record = allocations_[allocation.index];
  const std::size_t first = record.offset_bytes / page_size_bytes_;
  const std::size_t last = (record.offset_bytes + record.size_bytes - 1) / page_size_bytes_;

  const std::int64_t standing_deficit = device.deficit_locked(0);
  if (standing_deficit > 0) {
    if (!may_block) return false;
    device.evict_locked(static_cast<std::size_t>(standing_deficit), nullptr);
  }

  const auto offloaded = [&]() {
    device.stats_.add(&DeviceStats::faults);
    device.stats_.add(&DeviceStats::offloaded);
    out->reset();
    return true;
  };
  if (last >= watermark_pages_) return offloaded();

  std::size_t missing = 0;
  for (std::size_t page = first; page <= last; ++page) missing += pages_[page].handle == 0;
  if (missing != 0 && !may_block) return false;
  if (missing == 0) {
    device.stats_.add(&DeviceStats::hits);
  } else {
    // Room for every missing page at once, each counted once. Pages this eviction
    // unmaps may give their memory to the missing ones (Device::Recycled).
    const std::size_t missing_bytes = missing * page_size_bytes_;
    const std::int64_t need = device.deficit_locked(missing_bytes);
    Device::Recycled recycled;
    recycled.page_bytes = page_size_bytes_;
    try {
      const bool mapped = map_missing_locked(first, last, need, recycled);
      device.release_recycled_locked(recycled);
      if (!mapped) {
        offload_from_locked(record.offset_bytes, first, last, missing_bytes, need);
        return offloaded();
      }
    } catch (...) {
      try {
        device.release_recycled_locked(recycled);
      } catch (...) {
        // The first failure is the one to report.
      }
      throw;
    }
  }

  device.stats_.add(&DeviceStats::faults);
  *out = pin_pages_locked(record, first, last);
  return true;
}

Signature Vbar::pin_pages_locked(AllocationRecord& record, std::size_t first, std::size_t last) {
  Signature signature;
  signature.serials.reserve(last - first + 1);
  for (std::size_t page = first; page <= last; ++page) {
    ++pages_[page].pins;
    signature.serials.push_back(pages_[page].serial);
  }
  ++record.pins;
  return signature;
}

bool Vbar::map_missing_locked(std::size_t first, std::size_t last, std::int64_t need,
                              Device::Recycled& recycled) {
  Device& device = *device_;
  if (need > 0) {
    // Check before evicting anything: a fault that evicts and then offloads anyway has
    // thrown pages away for nothing.
    const auto need_bytes = static_cast<std::size_t>(need);
    if (device.evictable_for_fault_locked(*this, last) < need_bytes) return false;
    const std::size_t freed = device.evict_for_fault_locked(need_bytes, *this, last, &recycled);
    AIMDO_ASSERT(freed >= need_bytes);
  }
  for (std::size_t page = first; page <= last; ++page) {
    if (pages_[page].handle != 0) continue;
    device.map_page_locked(*this, page, last, &recycled);
  }
  return true;
}

void Vbar::offload_from_locked(std::size_t offset_bytes, std::size_t first, std::size_t last,
                               std::size_t missing_bytes, std::int64_t need) {
  Device& device = *device_;
  const bool shares_first = offset_bytes % page_size_bytes_ != 0 && first < last;
  const std::size_t lowest = std::max(shares_first ? first + 1 : first, floor_pages_);
  if (lowest > last) {
    device.stats_.add(&DeviceStats::faults);
    throw OutOfMemoryError(
        "device " + std::to_string(device.ordinal()) + ": cannot fault " +
            detail::format_bytes(missing_bytes) + " of VBAR pages below this VBAR's floor (" +
            detail::format_bytes(floor_pages_ * page_size_bytes_) +
            "): pages of lower "
            "priority hold only " +
            detail::format_bytes(device.evictable_for_fault_locked(*this, last)) + " of the " +
            detail::format_signed_bytes(need) + " needed (budget " +
            detail::format_bytes(aimdo::budget_bytes(device.budget_inputs_locked(0))) +
            ", aimdo usage " + detail::format_bytes(device.usage_locked()) +
            "); the rest is more important, pinned, protected by floors, or used outside aimdo",
        device.ordinal(), missing_bytes, false);
  }
  std::size_t freed = 0;
  bool synced = false;
  device.lower_watermark_locked(*this, lowest, SIZE_MAX, freed, synced, nullptr);
  if (freed != 0) {
    device.stats_.add(&DeviceStats::evictions);
    device.stats_.add(&DeviceStats::evicted_bytes, freed);
  }
}

void Vbar::unpin(const Allocation& allocation) {
  check_owned(allocation);
  std::unique_lock<std::mutex> lock(device_->mutex());
  unpin_locked(allocation, true);
  device_->check_invariants_locked();
}

bool Vbar::try_unpin(const Allocation& allocation) {
  check_owned(allocation);
  std::unique_lock<std::mutex> lock(device_->mutex(), std::try_to_lock);
  if (!lock.owns_lock() || !unpin_locked(allocation, false)) return false;
  device_->check_invariants_locked();
  return true;
}

bool Vbar::unpin_locked(const Allocation& allocation, bool may_block) {
  check_open_locked();
  AllocationRecord& record = allocations_[allocation.index];
  if (record.pins == 0) {
    throw InvalidStateError("unpin without a matching fault: the allocation at offset " +
                            std::to_string(record.offset_bytes) + " holds no pin");
  }
  const std::size_t first = record.offset_bytes / page_size_bytes_;
  const std::size_t last = (record.offset_bytes + record.size_bytes - 1) / page_size_bytes_;
  if (!may_block) {
    // Releasing a page needs the driver: leave that to the blocking path.
    for (std::size_t page = first; page <= last; ++page) {
      if (pages_[page].pins == 1 && page >= watermark_pages_ && pages_[page].handle != 0) {
        return false;
      }
    }
  }
  // Every pin goes first, so that a failed release below cannot leave pages pinned.
  --record.pins;
  for (std::size_t page = first; page <= last; ++page) {
    AIMDO_ASSERT(pages_[page].pins > 0);
    --pages_[page].pins;
  }
  bool synced = false;
  std::size_t page = first;
  try {
    for (; page <= last; ++page) {
      const Page& state = pages_[page];
      if (state.pins == 0 && page >= watermark_pages_ && state.handle != 0) {
        device_->release_page_locked(*this, page, synced);
      }
    }
  } catch (...) {
    // The pages not released stay resident and unpinned: put them back below the
    // watermark, where eviction will find them again.
    for (std::size_t rest = last + 1; rest-- > page;) {
      if (pages_[rest].handle != 0 && pages_[rest].pins == 0 && rest >= watermark_pages_) {
        watermark_pages_ = rest + 1;
        break;
      }
    }
    throw;
  }
  return true;
}

void Vbar::prioritize() {
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  auto& list = device_->priority_;
  list.splice(list.begin(), list, priority_position_);
  watermark_pages_ = pages_.size();
  device_->check_invariants_locked();
}

void Vbar::deprioritize() {
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  auto& list = device_->priority_;
  list.splice(list.end(), list, priority_position_);
}

std::size_t Vbar::watermark_bytes() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  return watermark_pages_ * page_size_bytes_;
}

void Vbar::check_within(std::size_t bytes, const char* what) const {
  const std::size_t capacity = pages_.size() * page_size_bytes_;
  if (bytes > capacity) {
    throw InvalidArgumentError(std::string(what) + " " + detail::format_bytes(bytes) +
                               " is beyond this VBAR's " + detail::format_bytes(capacity));
  }
}

void Vbar::set_watermark(std::size_t bytes) {
  check_within(bytes, "watermark");
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  const std::size_t wanted = pages_for(bytes, page_size_bytes_);
  bool synced = false;
  // Lower one page at a time so that a driver failure leaves a consistent watermark.
  while (watermark_pages_ > wanted) {
    const std::size_t page = --watermark_pages_;
    if (pages_[page].handle != 0 && pages_[page].pins == 0) {
      try {
        device_->release_page_locked(*this, page, synced);
      } catch (...) {
        if (pages_[page].handle != 0) ++watermark_pages_;  // still resident: keep it findable
        throw;
      }
    }
  }
  watermark_pages_ = wanted;
  device_->check_invariants_locked();
}

std::size_t Vbar::floor_bytes() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  return floor_pages_ * page_size_bytes_;
}

void Vbar::set_floor(std::size_t bytes) {
  check_within(bytes, "floor");
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  floor_pages_ = pages_for(bytes, page_size_bytes_);
  if (watermark_pages_ < floor_pages_) watermark_pages_ = floor_pages_;
  device_->check_invariants_locked();
}

std::size_t Vbar::free_memory(std::size_t bytes) {
  if (bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError("free_memory size must be below 2^60 bytes");
  }
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  const std::size_t freed = device_->evict_locked(bytes, this);
  device_->check_invariants_locked();
  return freed;
}

std::size_t Vbar::loaded_bytes() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  return resident_pages_ * page_size_bytes_;
}

std::vector<PageResidency> Vbar::residency() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  std::vector<PageResidency> out(pages_.size());
  for (std::size_t i = 0; i < pages_.size(); ++i) {
    out[i].resident = pages_[i].handle != 0;
    out[i].pinned = pages_[i].pins != 0;
  }
  return out;
}

std::size_t Vbar::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  return next_offset_bytes_;
}

void Vbar::close() {
  std::lock_guard<std::mutex> lock(device_->mutex());
  device_->close_vbar_locked(*this);
  device_->check_invariants_locked();
}

bool Vbar::closed() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  return closed_;
}

}  // namespace aimdo
