#include "held_calls.hpp"

#include <algorithm>
#include <chrono>

#include "aimdo/errors.hpp"

namespace aimdo::sim {

std::vector<HeldCalls::Hold>::iterator HeldCalls::find(std::uint64_t id) {
  return std::find_if(holds_.begin(), holds_.end(), [id](const Hold& h) { return h.id == id; });
}

std::uint64_t HeldCalls::hold(Operation operation, int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t id = next_id_++;
  holds_.push_back(Hold{id, operation, device});
  pending_.fetch_add(1, std::memory_order_acq_rel);
  return id;
}

bool HeldCalls::wait_arrived(std::uint64_t id, std::int64_t timeout_ns) {
  if (timeout_ns < 0) throw InvalidArgumentError("a timeout must not be negative");
  // A deadline past the steady clock's range waits as long as it can instead of wrapping
  // round to the past (wait_for would add the timeout to now() unchecked).
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  const auto timeout =
      std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(timeout_ns));
  const Clock::time_point deadline =
      timeout > Clock::time_point::max() - now ? Clock::time_point::max() : now + timeout;
  std::unique_lock<std::mutex> lock(mutex_);
  return changed_.wait_until(lock, deadline, [&] {
    const auto held = find(id);
    return held != holds_.end() && held->arrived;
  });
}

void HeldCalls::release(std::uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto held = find(id);
  if (held == holds_.end()) return;
  if (held->arrived) {
    held->released = true;  // the held call removes it
  } else {
    holds_.erase(held);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
  changed_.notify_all();
}

void HeldCalls::wait_if_held(Operation operation, int device) {
  if (pending_.load(std::memory_order_acquire) == 0) return;
  std::unique_lock<std::mutex> lock(mutex_);
  const auto match = std::find_if(holds_.begin(), holds_.end(), [&](const Hold& h) {
    return h.operation == operation && h.device == device && !h.arrived;
  });
  if (match == holds_.end()) return;
  const std::uint64_t id = match->id;
  match->arrived = true;
  changed_.notify_all();
  changed_.wait(lock, [&] {
    const auto held = find(id);
    return held == holds_.end() || held->released;
  });
  const auto held = find(id);
  if (held != holds_.end()) holds_.erase(held);
  pending_.fetch_sub(1, std::memory_order_acq_rel);
  changed_.notify_all();
}

}  // namespace aimdo::sim
