#include "aimdo/process.hpp"

#include <atomic>

namespace aimdo {
namespace {
std::atomic<bool> g_exiting{false};
}  // namespace

bool process_exiting() noexcept {
  return g_exiting.load(std::memory_order_acquire);
}
void set_process_exiting() noexcept {
  g_exiting.store(true, std::memory_order_release);
}

}  // namespace aimdo
