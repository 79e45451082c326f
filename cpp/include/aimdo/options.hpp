// Per-device options with documented defaults. Python exposes them as keyword-only
// arguments of aimdo.Manager / aimdo.init (sizes in bytes, poll_interval in seconds).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace aimdo {

constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kGiB = std::size_t{1} << 30;

struct DeviceOptions {
  // Cap on the memory aimdo treats the device as having; none = the device's total.
  // A limit behaves like a smaller card (design.md §3.1).
  std::optional<std::size_t> vram_limit_bytes;
  // What the device must keep free; used by both parts of the deficit.
  std::size_t headroom_bytes = 256 * kMiB;
  // Added on top of the deficit.
  std::size_t extra_headroom_bytes = 0;
  // Unit of residency of VBARs created on this device afterwards; a positive multiple of
  // the device's allocation granularity.
  std::size_t page_size_bytes = 32 * kMiB;
  // The driver's free-memory query runs at most once per interval; 0 = every evaluation.
  std::int64_t poll_interval_ns = 2'000'000'000;
  // Extra room made before each allocation through Manager::external_alloc (design.md §3.7).
  std::size_t allocator_headroom_bytes = 0;
  // When a fault evicts to make room for its own missing pages, hand the evicted pages'
  // physical memory to those pages instead of releasing it and creating new memory
  // (saves cuMemRelease + cuMemCreate per page; benchmarks/page_churn.py measures it).
  bool recycle_pages = true;
  // How often a transient driver error ("not ready") is retried before it is reported.
  int transient_retries = 3;
};

}  // namespace aimdo
