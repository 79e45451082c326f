// Process-exit flag. Once the process is exiting (Python's atexit ran, or the C++
// runtime is tearing statics down), destructors that would call the driver skip it: the
// driver may already be gone, and the OS reclaims everything anyway.
//
// This is one of the only two kinds of global state aimdo allows (with immutable
// resolved driver entry points). Thread-safe.
#pragma once

namespace aimdo {

bool process_exiting() noexcept;
void set_process_exiting() noexcept;

}  // namespace aimdo
