// Internal: bounds on what the core accepts, so that its arithmetic never overflows.
//
// Every size (an option, an argument, a device's memory) is at most kMaxSizeBytes = 2^60.
// The deficit (budget.hpp) adds at most seven such figures or their differences, and an
// external allocation adds the allocator headroom to its size: every intermediate stays
// below 2^63, so the signed 64-bit arithmetic is exact.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aimdo::detail {

constexpr std::size_t kMaxSizeBytes = std::size_t{1} << 60;
// About 146 years: a clock reading plus one interval stays far below 2^63 ns.
constexpr std::int64_t kMaxPollIntervalNs = std::int64_t{1} << 62;

}  // namespace aimdo::detail
