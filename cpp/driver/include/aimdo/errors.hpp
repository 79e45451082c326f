// aimdo's exception hierarchy. The core throws these; the Python bindings translate each
// into the Python class of the same name (aimdo.AimdoError and subclasses).
//
// Messages say what was asked, on which device, and what was available, so that a user
// reading a traceback knows what to change.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "aimdo/driver.hpp"

namespace aimdo {

// Base of every error aimdo raises on purpose.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// The device (or the budget aimdo was given on it) cannot supply the memory asked for.
class OutOfMemoryError : public Error {
 public:
  OutOfMemoryError(const std::string& message, int device, std::size_t requested_bytes,
                   bool injected)
      : Error(message), device_(device), requested_bytes_(requested_bytes), injected_(injected) {}
  int device() const noexcept { return device_; }
  std::size_t requested_bytes() const noexcept { return requested_bytes_; }
  // True when the simulator produced the failure on purpose (fault injection).
  bool injected() const noexcept { return injected_; }

 private:
  int device_;
  std::size_t requested_bytes_;
  bool injected_;
};

// The driver answered an error aimdo cannot handle (after bounded retries of transient ones).
class DriverError : public Error {
 public:
  DriverError(const std::string& message, int device, const std::string& operation,
              const DriverStatus& status)
      : Error(message),
        device_(device),
        operation_(operation),
        code_(status.code),
        error_name_(status.name),
        injected_(status.injected) {}
  int device() const noexcept { return device_; }
  const std::string& operation() const noexcept { return operation_; }
  int code() const noexcept { return code_; }
  const std::string& error_name() const noexcept { return error_name_; }
  bool injected() const noexcept { return injected_; }

 private:
  int device_;
  std::string operation_;
  int code_;
  std::string error_name_;
  bool injected_;
};

// A device was used that the Manager was not told to initialize.
class DeviceNotInitializedError : public Error {
 public:
  DeviceNotInitializedError(const std::string& message, int device)
      : Error(message), device_(device) {}
  int device() const noexcept { return device_; }

 private:
  int device_;
};

// The object is in a state that forbids the call: a closed VBAR or Manager, an unpin
// without a matching fault. Nothing was changed. (Python: aimdo.InvalidStateError,
// also a RuntimeError.)
class InvalidStateError : public Error {
 public:
  explicit InvalidStateError(const std::string& message) : Error(message) {}
};

// An argument is out of range or otherwise unusable. Nothing was changed.
// (Python: ValueError.)
class InvalidArgumentError : public Error {
 public:
  explicit InvalidArgumentError(const std::string& message) : Error(message) {}
};

}  // namespace aimdo
