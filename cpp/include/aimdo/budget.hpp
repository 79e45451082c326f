// The budget arithmetic of design.md §3.1, as a pure function so it can be read and
// tested on its own. All figures are bytes of one device.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aimdo {

struct BudgetInputs {
  std::size_t total_bytes = 0;           // the device's memory
  std::size_t limit_bytes = 0;           // min(total, vram_limit)
  std::size_t headroom_bytes = 0;        // kept free; in both parts
  std::size_t extra_headroom_bytes = 0;  // added on top
  std::size_t usage_bytes = 0;           // what aimdo has in use now
  std::size_t usage_at_poll_bytes = 0;   // what aimdo had in use at the last poll
  std::size_t free_at_poll_bytes = 0;    // what the driver reported free then
  // Stream-ordered frees since the last poll: out of aimdo's usage already, but the
  // driver may not have them back yet, so the measured part still counts them.
  std::size_t stream_freed_since_poll_bytes = 0;
};

// Bytes that must be freed before an allocation of `size_bytes` fits (<= 0: it fits):
//   simple   = usage + size + headroom - limit
//   measured = headroom - (free - (total - limit)) + (usage - usage_at_poll)
//              + stream_freed_since_poll + size
//   deficit  = max(simple, measured) + extra_headroom
// Inputs must be below 2^62 (the caller validates sizes); the result is exact.
std::int64_t deficit_bytes(const BudgetInputs& in, std::size_t size_bytes) noexcept;

// What aimdo may have in use: limit minus both headrooms, never negative.
std::size_t budget_bytes(const BudgetInputs& in) noexcept;

}  // namespace aimdo
