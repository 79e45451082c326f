#include "check.hpp"

#include <cstdio>
#include <cstdlib>

namespace aimdo::detail {

void assertion_failed(const char* expression, const char* file, int line) noexcept {
  std::fprintf(stderr, "aimdo: internal invariant broken: %s (%s:%d); aborting\n", expression, file,
               line);
  std::fflush(stderr);
  std::abort();
}

}  // namespace aimdo::detail
