#include <string>

#include "aimdo/errors.hpp"
#include "common.hpp"

namespace aimdo::bindings {

std::size_t to_size(std::int64_t value, const char* what) {
  if (value < 0) {
    throw InvalidArgumentError(std::string(what) + " must not be negative, got " +
                               std::to_string(value));
  }
  return static_cast<std::size_t>(value);
}

std::size_t to_size(const IntArg& arg, const char* what) {
  if (arg.overflow > 0) throw InvalidArgumentError(std::string(what) + " is too large");
  if (arg.overflow < 0) throw InvalidArgumentError(std::string(what) + " must not be negative");
  return to_size(static_cast<std::int64_t>(arg.value), what);
}

int to_device(const IntArg& arg) {
  if (arg.overflow != 0 || arg.value < -1 || arg.value > 1 << 20) {
    throw InvalidArgumentError("device ordinal out of range");
  }
  return static_cast<int>(arg.value);
}

std::int64_t to_ns(const IntArg& arg, const char* what) {
  return static_cast<std::int64_t>(to_size(arg, what));
}

}  // namespace aimdo::bindings
