// Recording for any Driver: each driver call it sees is written to an event log as one
// line (call_line.hpp), after the call, with the answer the caller got and, on success,
// the outputs; the calls that need a current context carry the device that was current.
// A run recorded over the CUDA backend replays on the simulator (replay.hpp).
//
// The log opens with a header the recorder writes when it starts the first time, from
// what the upstream driver says of itself:
//   @recording backend=<cuda|sim>
//   @device dev=<d> total=<bytes> granularity=<bytes> integrated=<0|1>   (one per device)
// replay_event() writes the same lines again for the driver being replayed on, and
// read_header() reads them back so that a simulator can be given the recorded devices.
//
// Addresses are written as `naming` says (address_naming.hpp): relative to a simulator's
// regions, or 0x-hex for a backend without them (an empty naming).
//
// fork(): the log records nothing in a child made by fork() (event_log.hpp); calls pass
// through. Errors: calls answer as a Driver. Thread-safety: every method may be called
// from any thread; the log's mutex orders the lines; a line is written after its call
// returns, so calls made at once on several threads appear in the order they finished.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "address_naming.hpp"
#include "driver_adaptor.hpp"
#include "event_log.hpp"
#include "log_line.hpp"

namespace aimdo::adaptors {

// What a log's header says: the backend it was recorded on and its devices.
struct LogHeader {
  std::string backend;                    // empty: the log has no header
  std::vector<DeviceProperties> devices;  // name unset: the header does not carry it
  std::size_t line_number = 0;            // of the "@recording" line (1-based), 0 if none
  std::string line;                       // its text
};

// The header of `log_text`: its leading "@recording" and "@device" lines (blank lines
// skipped). InvalidArgumentError naming the line for a header line that does not read, or
// devices not listed in order from 0.
LogHeader read_header(const std::string& log_text);

class RecordingDriver final : public DriverAdaptor {
 public:
  // InvalidArgumentError for a null `log`.
  RecordingDriver(std::shared_ptr<Driver> upstream, std::shared_ptr<EventLog> log,
                  AddressNaming naming = {});

  // Records from now on; the first time, writes the header first.
  void start();
  void stop() noexcept { log_->set_recording(false); }
  const std::shared_ptr<EventLog>& log() const noexcept { return log_; }
  const AddressNaming& naming() const noexcept { return naming_; }

  // Writes a header line ("@recording", "@device") anew for the upstream driver, reading
  // the logged one's fields; false for any other name. InvalidArgumentError for a line
  // that does not read or a device the driver does not have.
  bool replay_event(LogLine& line);

 private:
  DriverStatus intercept(Call& call) override;
  std::string device_line(int device);  // "" when the driver cannot describe it

  const std::shared_ptr<EventLog> log_;
  const AddressNaming naming_;
  std::once_flag header_written_;
};

}  // namespace aimdo::adaptors
