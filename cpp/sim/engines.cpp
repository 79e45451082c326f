// Virtual time: the powers that move the clocks (advance) or queue declared work on a
// device's two engines (compute, copies), and the clocks' readings. See "Time" in
// sim_driver.hpp. Each power checks that its work fits before virtual time ends, then
// moves the clock and writes its event under the device's lock, so a refused call leaves
// the clocks and the log as they were.
#include <cmath>

#include "aimdo/errors.hpp"
#include "sim_state.hpp"

namespace aimdo::sim {
namespace {

// InvalidArgumentError naming the clock (`where`, e.g. "device 0's clock"), the time the
// work starts at and its amount, unless `amount_ns` from `start_ns` fits in time.
void check_fits_in_time(const std::string& where, std::int64_t start_ns, const std::string& what,
                        std::int64_t amount_ns) {
  if (amount_ns <= kEndOfTimeNs - start_ns) return;
  throw InvalidArgumentError(where + " at " + std::to_string(start_ns) + " ns: " + what + " " +
                             std::to_string(amount_ns) +
                             " ns would pass the end of virtual time (" +
                             std::to_string(kEndOfTimeNs) + " ns, about 292 years)");
}

// Nanoseconds a host-to-device copy of `bytes` takes on `device` at `bytes_per_s`;
// InvalidArgumentError when that is longer than virtual time lasts.
std::int64_t copy_duration_ns(int device, std::size_t bytes, double bytes_per_s) {
  const double ns = static_cast<double>(bytes) / bytes_per_s * 1e9;
  // 2^63 exactly: every double below it converts to an int64.
  if (!(ns < 9223372036854775808.0)) {
    throw InvalidArgumentError("device " + std::to_string(device) + ": a copy of " +
                               std::to_string(bytes) + " bytes at " + std::to_string(bytes_per_s) +
                               " bytes/s takes longer than virtual time lasts (" +
                               std::to_string(kEndOfTimeNs) + " ns, about 292 years)");
  }
  return static_cast<std::int64_t>(std::llround(ns));
}

std::string clock_of(int device) {
  return "device " + std::to_string(device) + "'s clock";
}

}  // namespace

void SimDriver::advance(int device, std::int64_t ns) {
  if (ns < 0) throw InvalidArgumentError("time only moves forward");
  if (device != -1) check_device(device, device_total());
  // Every clock moves or none does: all are checked before any moves. A driver call on
  // another thread may move a clock between the check and the move (no call takes two
  // devices' locks); that clock then stops at the end of time rather than wrapping.
  for (int i = 0; i < device_total(); ++i) {
    if (device != -1 && i != device) continue;
    DeviceState& d = *state_->devices[static_cast<std::size_t>(i)];
    std::lock_guard<std::mutex> lock(d.mutex);
    check_fits_in_time(clock_of(i), d.clock_ns, "advancing it by", ns);
  }
  if (device == -1) {
    check_fits_in_time("the host's clock", state_->host_clock_ns.load(std::memory_order_relaxed),
                       "advancing it by", ns);
  }
  for (int i = 0; i < device_total(); ++i) {
    if (device != -1 && i != device) continue;
    DeviceState& d = *state_->devices[static_cast<std::size_t>(i)];
    std::lock_guard<std::mutex> lock(d.mutex);
    d.clock_ns += ns;
  }
  if (device == -1) {
    std::int64_t seen = state_->host_clock_ns.load(std::memory_order_relaxed);
    while (!state_->host_clock_ns.compare_exchange_weak(seen, saturating_sum_ns(seen, ns),
                                                        std::memory_order_relaxed)) {
    }
  }
  if (recording()) note(LineText("@advance").add("dev", device).add("ns", ns).str());
}

void SimDriver::copy_to_device(int device, std::size_t bytes) {
  check_device(device, device_total());
  const std::int64_t ns = host_copy_ns(device, bytes);
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  HostLink* link = host_link(device);
  std::unique_lock<std::mutex> link_lock;
  if (link != nullptr) link_lock = std::unique_lock<std::mutex>(link->mutex);
  const std::int64_t start_ns =
      link == nullptr ? d.clock_ns : std::max<std::int64_t>(d.clock_ns, link->busy_until_ns);
  check_fits_in_time(clock_of(device), start_ns,
                     "a copy of " + std::to_string(bytes) + " bytes taking", ns);
  d.clock_ns = start_ns + ns;
  if (link != nullptr) link->busy_until_ns = d.clock_ns;
  if (recording()) note(LineText("@copy_to_device").add("dev", device).add("bytes", bytes).str());
}

void SimDriver::compute(int device, std::int64_t ns) {
  if (ns < 0) throw InvalidArgumentError("compute time must not be negative");
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  check_fits_in_time(clock_of(device), d.clock_ns, "compute of", ns);
  d.clock_ns += ns;
  if (recording()) note(LineText("@compute").add("dev", device).add("ns", ns).str());
}

std::int64_t SimDriver::copy_async(int device, std::size_t bytes, std::int64_t after_ns) {
  check_device(device, device_total());
  if (after_ns < 0) throw InvalidArgumentError("a copy cannot wait for a time before 0");
  const std::int64_t ns = host_copy_ns(device, bytes);
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  HostLink* link = host_link(device);
  std::unique_lock<std::mutex> link_lock;
  if (link != nullptr) link_lock = std::unique_lock<std::mutex>(link->mutex);
  std::int64_t start_ns = std::max<std::int64_t>(d.copy_engine_ns, after_ns);
  if (link != nullptr) start_ns = std::max<std::int64_t>(start_ns, link->busy_until_ns);
  check_fits_in_time("device " + std::to_string(device) + "'s copy engine, starting the copy",
                     start_ns, "a copy of " + std::to_string(bytes) + " bytes taking", ns);
  d.copy_engine_ns = start_ns + ns;
  if (link != nullptr) link->busy_until_ns = d.copy_engine_ns;
  if (recording()) {
    note(LineText("@copy_async")
             .add("dev", device)
             .add("bytes", bytes)
             .add("after", after_ns)
             .str());
  }
  return d.copy_engine_ns;
}

std::int64_t SimDriver::peer_copy_async(int device, int peer, std::size_t bytes,
                                        std::int64_t after_ns) {
  check_device(device, device_total());
  check_device(peer, device_total());
  if (after_ns < 0) throw InvalidArgumentError("a copy cannot wait for a time before 0");
  const SimPeerLink link = this->peer(device, peer);
  if (!(link.bytes_per_s > 0)) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has no link to device " +
                               std::to_string(peer) + "'s memory");
  }
  const std::int64_t ns =
      saturating_sum_ns(copy_duration_ns(device, bytes, link.bytes_per_s), link.latency_ns);
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  const std::int64_t start_ns = std::max<std::int64_t>(d.copy_engine_ns, after_ns);
  check_fits_in_time("device " + std::to_string(device) + "'s copy engine, starting the copy",
                     start_ns, "a copy of " + std::to_string(bytes) + " bytes taking", ns);
  d.copy_engine_ns = start_ns + ns;
  if (recording()) {
    note(LineText("@peer_copy_async")
             .add("dev", device)
             .add("peer", peer)
             .add("bytes", bytes)
             .add("after", after_ns)
             .str());
  }
  return d.copy_engine_ns;
}

std::int64_t SimDriver::host_copy_ns(int device, std::size_t bytes) const {
  return saturating_sum_ns(
      copy_duration_ns(device, bytes,
                       devices_[static_cast<std::size_t>(device)].host_to_device_bytes_per_s),
      options_.topology.host_latency_ns);
}

void SimDriver::queue_host_copy(int device, DeviceState& d, std::size_t bytes) noexcept {
  const double ns = static_cast<double>(bytes) /
                    devices_[static_cast<std::size_t>(device)].host_to_device_bytes_per_s * 1e9;
  // 2^63 exactly: every double below it converts to an int64.
  const std::int64_t transfer_ns =
      ns < 9223372036854775808.0
          ? saturating_sum_ns(std::llround(ns), options_.topology.host_latency_ns)
          : kEndOfTimeNs;
  HostLink* link = host_link(device);
  std::unique_lock<std::mutex> link_lock;
  if (link != nullptr) link_lock = std::unique_lock<std::mutex>(link->mutex);
  std::int64_t start_ns = std::max<std::int64_t>(d.copy_engine_ns, d.clock_ns);
  if (link != nullptr) start_ns = std::max<std::int64_t>(start_ns, link->busy_until_ns);
  d.copy_engine_ns = start_ns;
  d.copy_engine_ns += transfer_ns;
  if (link != nullptr) link->busy_until_ns = d.copy_engine_ns;
}

void SimDriver::host_waits_until(std::int64_t ns) noexcept {
  std::int64_t seen = state_->host_clock_ns.load(std::memory_order_relaxed);
  while (seen < ns &&
         !state_->host_clock_ns.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
  }
}

HostLink* SimDriver::host_link(int device) const noexcept {
  const auto& links = options_.topology.host_links;
  if (links.empty()) return nullptr;
  return state_->host_links[static_cast<std::size_t>(links[static_cast<std::size_t>(device)])]
      .get();
}

std::int64_t SimDriver::compute_async(int device, std::int64_t ns, std::int64_t after_ns) {
  if (ns < 0) throw InvalidArgumentError("compute time must not be negative");
  if (after_ns < 0) throw InvalidArgumentError("compute cannot wait for a time before 0");
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  const std::int64_t start_ns = std::max<std::int64_t>(d.clock_ns, after_ns);
  check_fits_in_time("device " + std::to_string(device) + "'s compute engine, starting the work",
                     start_ns, "compute of", ns);
  d.clock_ns = start_ns + ns;
  if (recording()) {
    note(LineText("@compute_async").add("dev", device).add("ns", ns).add("after", after_ns).str());
  }
  return d.clock_ns;
}

std::int64_t SimDriver::copy_engine_now_ns(int device) const {
  check_device(device, device_total());
  const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.copy_engine_ns;
}

std::int64_t SimDriver::host_now_ns() const noexcept {
  return state_->host_clock_ns.load(std::memory_order_relaxed);
}

}  // namespace aimdo::sim
