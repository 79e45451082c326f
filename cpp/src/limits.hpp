// Internal: bounds on sizes the core accepts, so that byte arithmetic never overflows.
#pragma once

#include <cstddef>

namespace aimdo::detail {

constexpr std::size_t kMaxSizeBytes = std::size_t{1} << 60;

}  // namespace aimdo::detail
