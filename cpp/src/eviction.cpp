// Eviction: lowering watermarks for a deficit (design.md §3.3) and for a fault (3.2).
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

namespace aimdo {

void Device::lower_watermark_locked(Vbar& vbar, std::size_t lowest_page, std::size_t bytes,
                                    std::size_t& freed, bool& synced, Recycled* recycle) {
  const std::size_t stop = std::max(vbar.floor_pages_, lowest_page);
  while (freed < bytes && vbar.watermark_pages_ > stop) {
    const std::size_t page = --vbar.watermark_pages_;
    const Vbar::Page& state = vbar.pages_[page];
    // A pinned page stays until its unpin, which releases it (it is above the watermark).
    if (state.handle == 0 || state.pins != 0) continue;
    try {
      release_page_locked(vbar, page, synced, recycle);
    } catch (...) {
      // Still resident after a failed release: back below the watermark, where a later
      // eviction finds it again (an unpinned page above it would be stranded).
      if (state.handle != 0) ++vbar.watermark_pages_;
      throw;
    }
    freed += vbar.page_size_bytes_;
  }
}

std::size_t Device::evict_locked(std::size_t bytes, Vbar* only) {
  if (bytes == 0) return 0;
  std::size_t recovered = 0;
  if (only == nullptr && !leftovers_.empty()) {
    // Memory the driver refused to take back earlier counts against the budget: try
    // again first. A refusal is no news here; it stays listed for later attempts.
    const std::size_t before = resident_bytes_;
    try {
      release_leftovers_locked(0);
    } catch (...) {
    }
    recovered = before - resident_bytes_;
  }
  std::size_t freed = recovered;
  bool synced = false;
  if (only != nullptr) {
    lower_watermark_locked(*only, 0, bytes, freed, synced, nullptr);
  } else {
    for (auto it = priority_.rbegin(); it != priority_.rend() && freed < bytes; ++it) {
      lower_watermark_locked(**it, 0, bytes, freed, synced, nullptr);
    }
  }
  if (freed != recovered) {
    stats_.add(&DeviceStats::evictions);
    stats_.add(&DeviceStats::evicted_bytes, freed - recovered);
  }
  return freed;
}

std::size_t Device::evictable_bytes_locked(const Vbar& vbar, std::size_t from_page) {
  std::size_t count = 0;
  for (std::size_t page = std::max(vbar.floor_pages_, from_page); page < vbar.watermark_pages_;
       ++page) {
    count += vbar.pages_[page].handle != 0 && vbar.pages_[page].pins == 0;
  }
  return count * vbar.page_size_bytes_;
}

std::size_t Device::evictable_for_fault_locked(const Vbar& vbar, std::size_t last_page) const {
  std::size_t bytes = 0;
  for (auto it = priority_.rbegin(); it != priority_.rend() && *it != &vbar; ++it) {
    bytes += evictable_bytes_locked(**it, 0);
  }
  return bytes + evictable_bytes_locked(vbar, last_page + 1);
}

std::size_t Device::evict_for_fault_locked(std::size_t bytes, Vbar& vbar, std::size_t last_page,
                                           Recycled* recycle) {
  if (bytes == 0) return 0;
  std::size_t freed = 0;
  bool synced = false;
  // The VBARs below `vbar` hold lower-priority pages than all of `vbar`'s; `vbar`'s own
  // pages above the allocation come last. A VBAR with nothing to give keeps its watermark:
  // lowering it would offload its pages and free nothing.
  const auto take = [&](Vbar& from, std::size_t lowest_page) {
    if (freed < bytes && evictable_bytes_locked(from, lowest_page) != 0) {
      lower_watermark_locked(from, lowest_page, bytes, freed, synced, recycle);
    }
  };
  for (auto it = priority_.rbegin(); it != priority_.rend() && *it != &vbar; ++it) take(**it, 0);
  take(vbar, last_page + 1);
  if (freed != 0) {
    stats_.add(&DeviceStats::evictions);
    stats_.add(&DeviceStats::evicted_bytes, freed);
  }
  return freed;
}

}  // namespace aimdo
