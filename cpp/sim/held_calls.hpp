// Calls held open on purpose, for tests that need a driver call to stay in flight (a
// slow synchronize, say) without any timing: hold(operation, device) makes the next call
// of that operation on that device block, when it starts and before it takes any of the
// simulator's locks, until release(). It is the simulator's because only it knows a
// call's device before taking a lock (addresses and handles carry it).
//
// Errors: wait_arrived throws InvalidArgumentError for a negative timeout; unknown ids
// are ignored. Thread-safety: every method may be called from any thread. One mutex and
// condition variable guard the holds; an atomic count of pending holds lets every call
// pass without the mutex while none is pending.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "operations.hpp"

namespace aimdo::sim {

class HeldCalls {
 public:
  // Holds the next call of `operation` on `device`. Returns the hold's id.
  std::uint64_t hold(Operation operation, int device);
  // Waits until the held call has arrived; false after `timeout_ns` of real time (the
  // only wall-clock wait in the simulator: a bound for a test that would otherwise hang).
  bool wait_arrived(std::uint64_t id, std::int64_t timeout_ns);
  // Lets the held call (or a future one) go on.
  void release(std::uint64_t id);
  // Called at the start of every call: blocks while a hold for it is pending.
  void wait_if_held(Operation operation, int device);

 private:
  struct Hold {
    std::uint64_t id;
    Operation operation;
    int device;
    bool arrived = false;
    bool released = false;
  };
  // The hold `id`, or holds_.end(). The caller holds mutex_.
  std::vector<Hold>::iterator find(std::uint64_t id);

  std::atomic<std::size_t> pending_{0};  // holds_.size(), readable without the mutex
  std::mutex mutex_;                     // guards the members below
  std::condition_variable changed_;
  std::vector<Hold> holds_;
  std::uint64_t next_id_ = 1;
};

}  // namespace aimdo::sim
