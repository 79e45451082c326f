#include "aimdo/budget.hpp"

#include <algorithm>

namespace aimdo {
namespace {
std::int64_t s(std::size_t v) noexcept {
  return static_cast<std::int64_t>(v);
}
}  // namespace

std::int64_t deficit_bytes(const BudgetInputs& in, std::size_t size_bytes) noexcept {
  const std::int64_t simple =
      s(in.usage_bytes) + s(size_bytes) + s(in.headroom_bytes) - s(in.limit_bytes);
  // A configured limit behaves like a smaller card: memory beyond it never counts as free.
  const std::int64_t free_adjusted =
      s(in.free_at_poll_bytes) - (s(in.total_bytes) - s(in.limit_bytes));
  // What aimdo allocated since the poll is not in the driver's figure yet.
  const std::int64_t measured = s(in.headroom_bytes) - free_adjusted +
                                (s(in.usage_bytes) - s(in.usage_at_poll_bytes)) +
                                s(in.stream_freed_since_poll_bytes) + s(size_bytes);
  return std::max(simple, measured) + s(in.extra_headroom_bytes);
}

std::size_t budget_bytes(const BudgetInputs& in) noexcept {
  const std::size_t reserved = in.headroom_bytes + in.extra_headroom_bytes;
  return in.limit_bytes > reserved ? in.limit_bytes - reserved : 0;
}

}  // namespace aimdo
