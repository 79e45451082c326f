// One driver call as data: its operation, its arguments and, once made, its outputs.
// An adaptor turns each Driver method into a Call, looks at it, and makes it on the
// driver below with invoke(); the event log writes a Call as a line and replay reads one
// back into a Call (log_line.hpp). Which fields an operation uses is its row of the
// operations table (operations.hpp); the others keep their defaults.
//
// Units: bytes and nanoseconds, as in the Driver interface. Thread-safety: a Call is a
// plain value owned by one thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "aimdo/driver.hpp"
#include "operations.hpp"

namespace aimdo {

struct Call {
  Operation operation = Operation::memory_info;
  // Arguments (those of the operation's table row; `current` too, where it is listed).
  int device = -1;
  std::size_t size_bytes = 0;
  std::size_t alignment_bytes = 0;
  DeviceAddress address = 0;  // in, or out of reserve_address_range
  PhysicalHandle handle = 0;  // in, or out of create_physical
  DeviceAddress pointer = 0;  // in to stream_free, or out of stream_alloc
  DeviceAddress source = 0;   // in to copy_async (its `address` is the destination)
  EventHandle event = 0;      // in, or out of event_create
  // In to copy_from_host_async (its `address` is the destination). Not logged: replay
  // copies from a buffer of its own.
  std::uintptr_t host_source = 0;
  StreamHandle stream = 0;  // not logged: replay uses the default stream
  // The device current on the calling thread when the call was made (-1: none). Not an
  // argument of any Driver method: the event log carries it for the context-dependent
  // calls, and replay makes it current again before making the call.
  int current = -1;
  // Outputs, valid once invoke() answered success.
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  ContextToken previous{};  // of make_current
};

// Makes `call` on `driver` (the Driver method its operation names), filling its outputs.
// Answers what the driver answers.
DriverStatus invoke(Driver& driver, Call& call);

}  // namespace aimdo
