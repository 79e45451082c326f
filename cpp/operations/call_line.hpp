// A driver call as an event-log line: the operation's CUDA name, its arguments in the
// order of its table row (operations.hpp), "->", the answer's name and, when the answer
// is success, its outputs. For example
//   cuMemCreate dev=0 size=33554432 -> CUDA_SUCCESS handle=0x1000000000001
//   cuMemMap va=r0+0x0 size=33554432 handle=0x1000000000001 -> CUDA_ERROR_INVALID_VALUE
// Replay reads such a line back (cpp/adaptors/replay.cpp) field by field, in the forms
// written here.
//
// Thread-safety: reentrant.
#pragma once

#include <string>

#include "address_naming.hpp"
#include "call.hpp"

namespace aimdo {

std::string call_line(const Call& call, const DriverStatus& status, const AddressNaming& naming);

}  // namespace aimdo
