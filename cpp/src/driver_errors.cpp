#include "driver_errors.hpp"

#include "aimdo/errors.hpp"
#include "format.hpp"

namespace aimdo::detail {

void throw_driver_failure(const DriverStatus& status, int device, const char* operation,
                          std::size_t requested_bytes, const std::string& detail) {
  std::string message = "device " + std::to_string(device) + ": " + operation + " failed with " +
                        status.name + " (" + std::to_string(status.code) + ")";
  if (requested_bytes != 0) message += " asking for " + format_bytes(requested_bytes);
  if (status.injected) message += " [injected by the simulator]";
  if (!detail.empty()) message += "; " + detail;
  if (status.kind() == DriverErrorKind::out_of_memory) {
    throw OutOfMemoryError(message, device, requested_bytes, status.injected);
  }
  throw DriverError(message, device, operation, status);
}

}  // namespace aimdo::detail
