// Internal: human-readable sizes for error messages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace aimdo::detail {

// "96 MiB (100663296 bytes)"; exact byte counts always follow the rounded figure.
std::string format_bytes(std::size_t bytes);
std::string format_signed_bytes(std::int64_t bytes);

}  // namespace aimdo::detail
