// The failures a FailingDriver injects: rules that select calls by operation and device
// and answer a chosen CUresult instead of making them. A count rule fails `count` matching
// calls after letting `skip` through, then disappears; a rate rule fails each matching
// call with a probability, drawn from a generator seeded by the seed and the order in
// which rate rules were made (splitmix64): the same calls fail again for the same seed and
// the same call sequence.
//
// Matching: the rules for the call's own device first, in the order they were made, then
// the rules for any device (device -1); the first that fires answers. A call whose device
// is not known (-1) matches only the rules for any device.
//
// Thread-safety: every method may be called from any thread. One mutex guards the rules;
// match() reads an atomic count first and takes the mutex only while a rule is armed.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "aimdo/driver.hpp"
#include "operations.hpp"

namespace aimdo::adaptors {

class FailureRules {
 public:
  explicit FailureRules(std::uint64_t seed) noexcept : seed_(seed) {}

  // Arguments are checked by the caller (FailingDriver): a code that is not success, a
  // positive count, a probability in (0, 1].
  void add_count(Operation operation, int device, int code, std::uint64_t skip,
                 std::uint64_t count);
  void add_rate(Operation operation, int device, int code, double probability);
  void clear();

  // The failure injected into a call of `operation` on `device` (flagged `injected`), or
  // success when no rule fires. Advances the rules it consults.
  DriverStatus match(Operation operation, int device);

 private:
  struct Rule {
    Operation operation;
    int device;
    int code;
    std::uint64_t skip;
    std::uint64_t count;
    double probability;   // > 0: a rate rule (skip and count unused)
    std::uint64_t state;  // a rate rule's generator
  };
  // The first rule of `device` (-1: for any device) that fires, erasing a spent one.
  bool fire(Operation operation, int rule_device, int* code);

  const std::uint64_t seed_;
  std::atomic<std::size_t> armed_{0};  // rules_.size(), readable without the mutex
  std::mutex mutex_;                   // guards the members below
  std::vector<Rule> rules_;
  std::uint64_t rate_rules_made_ = 0;
};

}  // namespace aimdo::adaptors
