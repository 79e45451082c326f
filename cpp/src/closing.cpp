// Closing VBARs and devices, and the leftovers a failed release keeps for a retry.
#include "aimdo/device.hpp"

#include <algorithm>
#include <exception>
#include <optional>
#include <utility>

#include "aimdo/errors.hpp"
#include "aimdo/process.hpp"
#include "aimdo/vbar.hpp"
#include "check.hpp"
#include "device_internal.hpp"
#include "first_failure.hpp"

namespace aimdo {

void Device::close_vbar_locked(Vbar& vbar) {
  if (!vbar.closed_) {
    // Room first (the only step that can throw), so the hand-over below cannot stop half
    // way.
    leftovers_.reserve(leftovers_.size() + vbar.resident_pages_ + 1);
    // Out of service first: from here on, nothing but this release path touches its pages.
    vbar.closed_ = true;
    priority_.erase(vbar.priority_position_);
    for (std::size_t page = 0; page < vbar.pages_.size(); ++page) {
      Vbar::Page& state = vbar.pages_[page];
      state.pins = 0;
      if (state.handle == 0) continue;
      leftovers_.push_back(Leftover{vbar.base_, vbar.base_ + page * vbar.page_size_bytes_,
                                    vbar.page_size_bytes_, state.handle, true, false});
      state.handle = 0;
    }
    vbar.resident_pages_ = 0;
    for (auto& record : vbar.allocations_) record.pins = 0;
    vbar.watermark_pages_ = 0;
    leftovers_.push_back(Leftover{vbar.base_, vbar.base_,
                                  vbar.pages_.size() * vbar.page_size_bytes_, 0, false, true});
    // A reader's copy may still read the pages (design.md §4.4): wait for each reader's
    // queued work before the release unmaps them. A driver call, not the reader's lock.
    // Best effort: a reader that cannot be synchronized does not keep the pages mapped.
    for (const int reader : vbar.readers_) {
      ScopedDevice on_reader(*driver_, reader);
      if (on_reader.status().ok()) driver_->synchronize(reader);
    }
  }
  release_leftovers_locked(vbar.base_);
}

void Device::forget_vbar_locked(Vbar& vbar) noexcept {
  if (vbar.closed_) return;
  vbar.closed_ = true;
  priority_.erase(vbar.priority_position_);
}

void Device::release_leftovers_locked(DeviceAddress base, DeviceAddress only_address) {
  const auto ours = [base, only_address](const Leftover& item) {
    return (base == 0 || item.vbar_base == base) &&
           (only_address == 0 || item.address == only_address);
  };
  // Nothing to give back: no driver call at all (a closed VBAR's second close is free).
  if (std::none_of(leftovers_.begin(), leftovers_.end(), ours)) return;
  detail::FirstFailure failure;
  std::optional<ScopedDevice> guard;
  // cuMemUnmap, cuMemRelease and cuMemAddressFree do not need the context: without it,
  // they are tried all the same.
  failure.run([&] { activate(guard); });
  // Kernels queued before the close may still read the pages: one synchronize before the
  // first unmap. A failed one is reported, but the releases still run: a close must not
  // leave mappings behind.
  if (std::any_of(leftovers_.begin(), leftovers_.end(),
                  [&](const Leftover& item) { return ours(item) && item.mapped; })) {
    failure.run([&] { synchronize_locked(); });
  }
  for (Leftover& item : leftovers_) {
    if (ours(item) && !item.range) failure.run([&] { give_back_page_locked(item); });
  }
  const auto done = [](const Leftover& item) {
    return !item.range && item.handle == 0 && !item.mapped;
  };
  leftovers_.erase(std::remove_if(leftovers_.begin(), leftovers_.end(), done), leftovers_.end());
  for (Leftover& item : leftovers_) {
    if (!ours(item) || !item.range) continue;
    // A range is freed only once none of its pages is mapped (the driver refuses otherwise).
    const bool pages_mapped =
        std::any_of(leftovers_.begin(), leftovers_.end(), [&](const Leftover& page) {
          return !page.range && page.mapped && page.vbar_base == item.vbar_base;
        });
    if (pages_mapped) continue;
    failure.run([&] {
      const DriverStatus status =
          retrying_twice([&] { return driver_->free_address_range(item.address, item.bytes); });
      if (!status.ok()) raise(status, "cuMemAddressFree", item.bytes);
      item.range = false;  // nothing left of it: `done` now
    });
  }
  leftovers_.erase(std::remove_if(leftovers_.begin(), leftovers_.end(), done), leftovers_.end());
  failure.rethrow();
}

void Device::give_back_page_locked(Leftover& item) {
  if (item.mapped) {
    // Retried even after a hard error: a page left mapped is lost for the life of the
    // process.
    const DriverStatus status =
        retrying_twice([&] { return driver_->unmap(item.address, item.bytes); });
    if (!status.ok()) raise(status, "cuMemUnmap", item.bytes);
    item.mapped = false;
    stats_.add(&DeviceStats::pages_released);
  }
  const DriverStatus status =
      retrying_twice([&] { return driver_->release_physical(item.handle); });
  if (!status.ok()) raise(status, "cuMemRelease", item.bytes);
  item.handle = 0;
  AIMDO_ASSERT(resident_bytes_ >= item.bytes);
  resident_bytes_ -= item.bytes;
}

void Device::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  closed_ = true;
  if (process_exiting()) return;  // the driver may be gone; the OS reclaims everything
  detail::FirstFailure failure;
  while (!priority_.empty()) failure.run([&] { close_vbar_locked(*priority_.front()); });
  // What earlier closes left, of VBARs alive or gone.
  if (!leftovers_.empty()) failure.run([&] { release_leftovers_locked(0); });
  if (!external_.empty()) failure.run([&] { free_externals_locked(); });
  check_invariants_locked();
  failure.rethrow();
}

void Device::free_externals_locked() {
  detail::FirstFailure failure;
  std::optional<ScopedDevice> guard;
  for (int attempt = 0; attempt < 2 && !guard; ++attempt) {
    if (attempt == 1) {
      failure.run([&] { activate(guard); });
    } else {
      try {
        activate(guard);
      } catch (...) {
        // One more attempt (above) before it is reported.
      }
    }
  }
  // A free that fails stays listed (and counted), so a later close retries it.
  for (auto it = external_.begin(); it != external_.end();) {
    const DeviceAddress ptr = it->first;
    const std::size_t size = it->second;
    const DriverStatus status =
        retrying_twice([&] { return driver_->stream_free(ordinal_, ptr, 0); });
    if (!status.ok()) {
      failure.run([&] { raise(status, "cuMemFreeAsync", size); });
      ++it;
      continue;
    }
    AIMDO_ASSERT(external_bytes_ >= size);
    external_bytes_ -= size;
    it = external_.erase(it);
  }
  failure.rethrow();
}

}  // namespace aimdo
