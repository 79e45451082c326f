#include "format.hpp"

#include <cstdio>

namespace aimdo::detail {

std::string format_bytes(std::size_t bytes) {
  static const char* const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char buffer[96];
  if (unit == 0) {
    std::snprintf(buffer, sizeof buffer, "%zu bytes", bytes);
  } else {
    std::snprintf(buffer, sizeof buffer, "%.4g %s (%zu bytes)", value, units[unit], bytes);
  }
  return buffer;
}

std::string format_signed_bytes(std::int64_t bytes) {
  if (bytes < 0) return "-" + format_bytes(static_cast<std::size_t>(-bytes));
  return format_bytes(static_cast<std::size_t>(bytes));
}

}  // namespace aimdo::detail
