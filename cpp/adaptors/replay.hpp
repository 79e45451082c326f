// Replay: makes the calls of an event log again, on a driver stack whose top is a
// RecordingDriver, and compares what that recorder writes with the log, line by line.
//
// What replay needs of the stack (ReplayStack): the recorder on top, recording into a
// log of its own that is empty; the driver at the bottom, on which replay makes the
// logged current device current before a context-dependent call (cur=), unseen by the
// recorder and by any adaptor in between; and the handlers of the powers' event lines
// ("@...": a FailingDriver's, a simulator's), tried in order after the recorder's own
// header lines. A handler answers whether the line is its, applying it if so.
//
// Two ways to compare, chosen by the log's header (recording_driver.hpp):
// - A log recorded on the backend replayed on, or one without a header, must come out
//   exactly: each replayed line equal to the logged one, byte for byte.
// - A log recorded on another backend (the CUDA driver, replayed on the simulator) must
//   come out with the same answers: each line's name and answer code as logged. Values
//   the device reported about itself (free and total memory) are the environment's:
//   where they differ that is a note, not a difference.
// Either way, a raw 0x-hex address is translated to the replayed stack's: by the logged
// reservation it falls in (to the replayed reservation made by the same line, at the same
// offset) or, for a stream-ordered pointer, the replayed allocation made by the line that
// logged it; a physical allocation's or an event's handle likewise, by the line that
// logged it (until the line that gave it back). Addresses named relative to a simulator's
// regions ("r0+0x0") are read with the recorder's naming. Anything that matches nothing
// is used as it is.
//
// A host-to-device copy (cuMemcpyHtoDAsync) is logged without its host address, so replay
// copies zeros from a buffer of its own of the logged size: the bytes replayed differ from
// those recorded, and a copy whose host address was refused (null) replays with a valid
// one.
//
// Errors: InvalidArgumentError "cannot replay log line N ('<text>'): <why>" for a line
// that is not as a recorder writes it (a field missing, extra or repeated; a number that
// does not read or does not fit its type; an address outside the regions; an unknown
// name), or that a power refuses. No other exception for bad text.
//
// Thread-safety: replay() uses the stack alone; nothing else may use it meanwhile.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "aimdo/driver.hpp"
#include "log_line.hpp"
#include "recording_driver.hpp"

namespace aimdo::adaptors {

struct ReplayStack {
  RecordingDriver* recorder = nullptr;
  Driver* context = nullptr;
  std::vector<std::function<bool(LogLine&)>> event_handlers;
};

struct ReplayReport {
  // "line N: logged '...', replayed '...'", N counting the log's lines (blank ones too);
  // a replayed line past the log's end is numbered after its last line.
  std::vector<std::string> differences;
  // "line N: cuMemGetInfo free=... total=... when recorded, free=... total=... replayed".
  std::vector<std::string> notes;
};

ReplayReport replay(const std::string& log_text, ReplayStack& stack);

}  // namespace aimdo::adaptors
