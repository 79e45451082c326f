// An event log: lines (log_line.hpp) in the order they were appended, and a switch saying
// whether anyone should append. One log is shared (std::shared_ptr) by everything that
// writes into it: a RecordingDriver writes each driver call it sees; a simulator and a
// FailingDriver write each use of their powers, so that replay can re-apply them.
//
// fork(). A child made by fork() inherits a copy of the log, whose mutex a thread of the
// parent may hold for good. recording() answers false in any process but the one that
// made the log, so writers that check it first never take that mutex in a child.
//
// Thread-safety: every method may be called from any thread. One mutex guards the lines,
// held only to append or copy them; recording() is one atomic load (and a getpid()), so
// writers check it on every call at no cost while the log is off.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <string>
#include <vector>

namespace aimdo {

// The process an object was made in. An object that takes locks checks current() first
// and, in any other process (a child made by fork()), touches none of its state.
// getpid() is asked on every check, not cached: a child made by a raw fork() that ran no
// at-fork handler is recognised as well.
class CreatingProcess {
 public:
  bool current() const noexcept { return ::getpid() == pid_; }
  pid_t pid() const noexcept { return pid_; }

 private:
  const pid_t pid_ = ::getpid();
};

class EventLog {
 public:
  // Whether lines should be appended now: on, and in the process that made the log.
  bool recording() const noexcept {
    return recording_.load(std::memory_order_relaxed) && process_.current();
  }
  void set_recording(bool on) noexcept { recording_.store(on, std::memory_order_relaxed); }

  // Appends `line` (no newline), whether recording or not: writers check recording().
  void append(std::string line);
  // Every line, each followed by '\n'.
  std::string text() const;
  std::vector<std::string> lines() const;

 private:
  CreatingProcess process_;
  std::atomic<bool> recording_{false};
  mutable std::mutex mutex_;  // guards lines_
  std::vector<std::string> lines_;
};

}  // namespace aimdo
