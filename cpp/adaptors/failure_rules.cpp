#include "failure_rules.hpp"

namespace aimdo::adaptors {
namespace {

// A uniform draw in [0, 1) from a splitmix64 generator.
double next_unit(std::uint64_t& state) noexcept {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace

void FailureRules::add_count(Operation operation, int device, int code, std::uint64_t skip,
                             std::uint64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  rules_.push_back(Rule{operation, device, code, skip, count, 0.0, 0});
  armed_.store(rules_.size(), std::memory_order_release);
}

void FailureRules::add_rate(Operation operation, int device, int code, double probability) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t index = rate_rules_made_++;
  const std::uint64_t state = seed_ ^ (0x9e3779b97f4a7c15ULL * (index + 1));
  rules_.push_back(Rule{operation, device, code, 0, 1, probability, state});
  armed_.store(rules_.size(), std::memory_order_release);
}

void FailureRules::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  rules_.clear();
  armed_.store(0, std::memory_order_release);
}

DriverStatus FailureRules::match(Operation operation, int device) {
  if (armed_.load(std::memory_order_acquire) == 0) return DriverStatus::success();
  std::lock_guard<std::mutex> lock(mutex_);
  int code = driver_code::success;
  const bool fired = (device >= 0 && fire(operation, device, &code)) || fire(operation, -1, &code);
  if (!fired) return DriverStatus::success();
  return DriverStatus{code, driver_code::name(code), true};
}

bool FailureRules::fire(Operation operation, int rule_device, int* code) {
  for (auto rule = rules_.begin(); rule != rules_.end(); ++rule) {
    if (rule->operation != operation || rule->device != rule_device) continue;
    if (rule->probability > 0) {
      if (next_unit(rule->state) >= rule->probability) continue;
      *code = rule->code;
      return true;
    }
    if (rule->skip > 0) {
      --rule->skip;
      continue;
    }
    *code = rule->code;
    if (--rule->count == 0) {
      rules_.erase(rule);
      armed_.store(rules_.size(), std::memory_order_release);
    }
    return true;
  }
  return false;
}

}  // namespace aimdo::adaptors
