#include "aimdo/stats.hpp"

namespace aimdo {

DeviceStatsSnapshot DeviceStats::snapshot() const noexcept {
  const auto r = [](const std::atomic<std::uint64_t>& v) {
    return v.load(std::memory_order_relaxed);
  };
  DeviceStatsSnapshot out;
  out.faults = r(faults);
  out.hits = r(hits);
  out.offloaded = r(offloaded);
  out.pages_mapped = r(pages_mapped);
  out.pages_released = r(pages_released);
  out.evictions = r(evictions);
  out.evicted_bytes = r(evicted_bytes);
  out.synchronizes = r(synchronizes);
  out.polls = r(polls);
  out.transient_retries = r(transient_retries);
  out.oom_retries = r(oom_retries);
  out.pages_recycled = r(pages_recycled);
  return out;
}

}  // namespace aimdo
