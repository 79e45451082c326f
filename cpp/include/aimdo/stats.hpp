// Per-device counters. Written under the device's lock, readable without it (relaxed
// atomics): a snapshot taken while another thread works may mix two moments.
#pragma once

#include <atomic>
#include <cstdint>

namespace aimdo {

struct DeviceStatsSnapshot {
  std::uint64_t faults = 0;             // Vbar::fault calls that returned
  std::uint64_t hits = 0;               // faults that found every page resident
  std::uint64_t offloaded = 0;          // faults answered "offloaded"
  std::uint64_t pages_mapped = 0;       // pages made resident
  std::uint64_t pages_released = 0;     // pages given back (eviction, unpin, watermark, close)
  std::uint64_t evictions = 0;          // eviction passes that had something to free
  std::uint64_t evicted_bytes = 0;      // bytes freed by eviction passes
  std::uint64_t synchronizes = 0;       // device synchronizations before releases
  std::uint64_t polls = 0;              // free-memory queries
  std::uint64_t transient_retries = 0;  // driver calls retried after "not ready"
  std::uint64_t oom_retries = 0;        // driver out-of-memory answers retried after eviction
  std::uint64_t pages_recycled = 0;     // evicted pages whose memory a fault mapped again
};

class DeviceStats {
 public:
  void add(std::atomic<std::uint64_t> DeviceStats::* counter, std::uint64_t n = 1) noexcept {
    (this->*counter).fetch_add(n, std::memory_order_relaxed);
  }
  DeviceStatsSnapshot snapshot() const noexcept;

  std::atomic<std::uint64_t> faults{0};
  std::atomic<std::uint64_t> hits{0};
  std::atomic<std::uint64_t> offloaded{0};
  std::atomic<std::uint64_t> pages_mapped{0};
  std::atomic<std::uint64_t> pages_released{0};
  std::atomic<std::uint64_t> evictions{0};
  std::atomic<std::uint64_t> evicted_bytes{0};
  std::atomic<std::uint64_t> synchronizes{0};
  std::atomic<std::uint64_t> polls{0};
  std::atomic<std::uint64_t> transient_retries{0};
  std::atomic<std::uint64_t> oom_retries{0};
  std::atomic<std::uint64_t> pages_recycled{0};
};

}  // namespace aimdo
