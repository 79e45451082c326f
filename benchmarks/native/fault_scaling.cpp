// Fault/unpin throughput of the core on the simulator: one thread on one device against
// one thread per device on two devices, with no Python in the loop. Printed as JSON.
//
//   aimdo_bench_fault_scaling <seconds> <workload>
//     workload "hit":   every fault finds its pages resident (the steady state)
//     workload "churn": the working set is twice the budget, so faults evict and map
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aimdo/manager.hpp"
#include "sim_driver.hpp"

namespace {

constexpr std::size_t kPage = std::size_t{2} << 20;

double run(const std::vector<int>& devices, double seconds, bool churn) {
  std::vector<aimdo::sim::SimDeviceSpec> specs(2);
  for (auto& spec : specs) spec.total_bytes = std::size_t{1} << 30;
  auto sim = std::make_shared<aimdo::sim::SimDriver>(specs);
  aimdo::Manager manager(sim);
  const std::size_t pages = 16;
  for (int d = 0; d < 2; ++d) {
    aimdo::DeviceOptions options;
    options.page_size_bytes = kPage;
    options.headroom_bytes = 0;
    options.vram_limit_bytes = (churn ? pages / 2 : pages * 2) * kPage;
    options.poll_interval_ns = std::int64_t{1} << 62;
    manager.add_device(d, options);
  }
  std::atomic<bool> go{false};
  std::atomic<bool> stop{false};
  std::vector<std::uint64_t> counts(devices.size(), 0);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < devices.size(); ++t) {
    threads.emplace_back([&, t] {
      auto vbar = manager.create_vbar(devices[t], pages * kPage);
      std::vector<aimdo::Allocation> allocations;
      for (std::size_t i = 0; i < pages; ++i) allocations.push_back(vbar->alloc(kPage));
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      std::uint64_t n = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        if (churn) vbar->prioritize();
        for (const auto& allocation : allocations) {
          if (vbar->fault(allocation)) vbar->unpin(allocation);
        }
        n += allocations.size();
      }
      counts[t] = n;
    });
  }
  const auto start = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop.store(true);
  for (auto& thread : threads) thread.join();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::uint64_t total = 0;
  for (auto c : counts) total += c;
  return static_cast<double>(total) / elapsed;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::strcmp(argv[2], "hit") != 0 && std::strcmp(argv[2], "churn") != 0)) {
    std::fprintf(stderr, "usage: %s <seconds> hit|churn\n", argv[0]);
    return 2;
  }
  const double seconds = std::atof(argv[1]);
  const bool churn = std::strcmp(argv[2], "churn") == 0;
  const double one = run({0}, seconds, churn);
  const double two = run({0, 1}, seconds, churn);
  std::printf(
      "{\"workload\": \"%s\", \"one_device_ops_per_s\": %.0f, "
      "\"two_devices_ops_per_s\": %.0f, \"ratio\": %.3f}\n",
      argv[2], one, two, two / one);
  return 0;
}
