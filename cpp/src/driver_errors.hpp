// Internal: turning a failed DriverStatus into the exception it stands for.
#pragma once

#include <cstddef>
#include <string>

#include "aimdo/driver.hpp"

namespace aimdo::detail {

// OutOfMemoryError for an out-of-memory answer, DriverError otherwise. `detail` is
// appended to the message (usage and budget figures, say); may be empty.
[[noreturn]] void throw_driver_failure(const DriverStatus& status, int device,
                                       const char* operation, std::size_t requested_bytes,
                                       const std::string& detail);

}  // namespace aimdo::detail
