// Internal: the first of several failures. Release paths try every step even when one
// fails (a close must not leave memory behind because an earlier release failed), then
// report the first failure.
#pragma once

#include <exception>
#include <utility>

namespace aimdo::detail {

class FirstFailure {
 public:
  // Runs `step`; an exception it throws is kept if it is the first.
  template <class Step>
  void run(Step&& step) noexcept {
    try {
      std::forward<Step>(step)();
    } catch (...) {
      if (!first_) first_ = std::current_exception();
    }
  }
  bool failed() const noexcept { return static_cast<bool>(first_); }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::exception_ptr first_;
};

}  // namespace aimdo::detail
