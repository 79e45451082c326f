// Fault injection for any Driver: fails chosen calls with the CUresult asked for, flagged
// `injected`, without making them (failure_rules.hpp says which calls), and counts every
// call it sees, failed or not (what `skip` and call_count() measure). A call's device is
// told as device_routes.hpp says. Operations are named by their CUDA function
// (operations.hpp).
//
// Put it under a RecordingDriver and the log shows the injected failures as the caller
// saw them. With an event log, each use of a power is written to it while it records:
//   @fail op=<CUDA name> dev=<device, -1: any> code=<CUresult> skip=<n> count=<n>
//   @fail_rate op=<CUDA name> dev=<device, -1: any> code=<CUresult> p=<%.17g>
//   @clear_failures
// and replay_event() applies such a line again.
//
// fork(): in any process but the one that made it, every call passes straight through
// (no count, no rule, no lock), so the driver below answers a forked child as it would.
//
// Errors: the powers throw InvalidArgumentError for an unknown operation, a device the
// driver does not have, a zero code, a zero count, a probability outside (0, 1], and
// change nothing then. Calls answer as a Driver: errors as values.
//
// Thread-safety: every method may be called from any thread. Counts are atomics; the rules
// and the routes each have their own mutex (see there), never held across the call below.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device_routes.hpp"
#include "driver_adaptor.hpp"
#include "event_log.hpp"
#include "failure_rules.hpp"
#include "log_line.hpp"

namespace aimdo::adaptors {

class FailingDriver final : public DriverAdaptor {
 public:
  // `seed` drives the rate rules. `events` may be null (the powers are then not logged).
  // Reads the upstream driver's device count once, here.
  FailingDriver(std::shared_ptr<Driver> upstream, std::uint64_t seed,
                std::shared_ptr<EventLog> events = nullptr);

  // Fail `count` calls of `operation` on `device` (-1: any) after letting `skip` matching
  // calls through, answering `code` (e.g. 2 out of memory, 600 not ready).
  void fail(const std::string& operation, int device, int code, std::uint64_t skip,
            std::uint64_t count);
  // Fail each matching call with `probability`, until clear_failures().
  void fail_rate(const std::string& operation, int device, int code, double probability);
  void clear_failures();
  // Calls of `operation` seen on `device` (-1: all, those of no known device included).
  std::uint64_t call_count(const std::string& operation, int device) const;

  // Applies an event line this adaptor writes (see above); false for any other name.
  // InvalidArgumentError when the line does not read or the power refuses it.
  bool replay_event(LogLine& line);

 private:
  using Counts = std::array<std::atomic<std::uint64_t>, kOperationCount>;

  DriverStatus intercept(Call& call) override;
  void check_device(int device) const;  // -1 or a device of the driver
  void note(std::string line) const;

  const CreatingProcess process_;
  const std::shared_ptr<EventLog> events_;
  const int device_count_;
  std::vector<Counts> counts_;  // one per device, then one for calls of no known device
  DeviceRoutes routes_;
  FailureRules rules_;
};

}  // namespace aimdo::adaptors
