// Internal: AIMDO_ASSERT for broken invariants (programmer errors, never the world's
// errors nor bad input, which are reported as typed exceptions). Always on: the checks
// are cheap, and a core that carries on past a broken page table corrupts memory that
// kernels read. Prints where and what, then aborts.
#pragma once

namespace aimdo::detail {

[[noreturn]] void assertion_failed(const char* expression, const char* file, int line) noexcept;

}  // namespace aimdo::detail

#define AIMDO_ASSERT(expression)       \
  ((expression) ? static_cast<void>(0) \
                : ::aimdo::detail::assertion_failed(#expression, __FILE__, __LINE__))
