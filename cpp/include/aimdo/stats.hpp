// Per-device counters. Written under the device's lock, readable without it (relaxed
// atomics): a snapshot taken while another thread works may mix two moments.
#pragma once

#include <atomic>
#include <cstdint>

namespace aimdo {

// Every counter, once: X(name, what it counts). The snapshot, the live counters and the
// Python statistics dict are all generated from this list.
#define AIMDO_DEVICE_STATS(X)                                                \
  X(faults, "Vbar::fault calls that returned")                               \
  X(hits, "faults that found every page resident")                           \
  X(offloaded, "faults answered offloaded")                                  \
  X(pages_mapped, "pages made resident")                                     \
  X(pages_released, "pages given back (eviction, unpin, watermark, close)")  \
  X(evictions, "eviction passes that had something to free")                 \
  X(evicted_bytes, "bytes freed by eviction passes")                         \
  X(synchronizes, "device synchronizations before releases")                 \
  X(polls, "free-memory queries")                                            \
  X(transient_retries, "driver calls retried after a transient error")       \
  X(oom_retries, "driver out-of-memory answers retried after eviction")      \
  X(pages_recycled, "evicted pages whose memory a fault mapped again")       \
  X(driver_calls, "driver calls made for the device's memory (retries too)") \
  X(driver_ns, "nanoseconds in those calls, on the driver's clock")

struct DeviceStatsSnapshot {
#define AIMDO_SNAPSHOT_FIELD(name, what) std::uint64_t name = 0;
  AIMDO_DEVICE_STATS(AIMDO_SNAPSHOT_FIELD)
#undef AIMDO_SNAPSHOT_FIELD
};

class DeviceStats {
 public:
  void add(std::atomic<std::uint64_t> DeviceStats::* counter, std::uint64_t n = 1) noexcept {
    (this->*counter).fetch_add(n, std::memory_order_relaxed);
  }
  DeviceStatsSnapshot snapshot() const noexcept {
    DeviceStatsSnapshot out;
#define AIMDO_SNAPSHOT_READ(name, what) out.name = name.load(std::memory_order_relaxed);
    AIMDO_DEVICE_STATS(AIMDO_SNAPSHOT_READ)
#undef AIMDO_SNAPSHOT_READ
    return out;
  }

#define AIMDO_LIVE_COUNTER(name, what) std::atomic<std::uint64_t> name{0};
  AIMDO_DEVICE_STATS(AIMDO_LIVE_COUNTER)
#undef AIMDO_LIVE_COUNTER
};

}  // namespace aimdo
