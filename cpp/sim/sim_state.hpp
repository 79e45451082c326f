// The simulator's state, internal to cpp/sim: virtual time, the bookkeeping of one device,
// the current context of each thread, and SimDriver::run, the start every operation
// shares. Locking is as sim_driver.hpp says: each DeviceState has its own mutex; the
// context table is sharded, each shard with its own; a device's mutex may be held when a
// shard's is taken, never the other way round.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "held_calls.hpp"
#include "host_memory.hpp"
#include "sim_driver.hpp"

namespace aimdo::sim {

// --- virtual time -------------------------------------------------------------------------

// Virtual time is int64 nanoseconds from 0, so it ends about 292 years in. The powers
// that move a clock by an amount the caller chose refuse one that would pass the end; a
// driver call cannot refuse to cost time, so its cost stops the clock at the end instead.
inline constexpr std::int64_t kEndOfTimeNs = std::numeric_limits<std::int64_t>::max();

// `start_ns + amount_ns`, or kEndOfTimeNs where the sum would pass it. Both must be
// non-negative (clocks start at 0 and only move forward; costs and delays are checked at
// construction).
constexpr std::int64_t saturating_sum_ns(std::int64_t start_ns, std::int64_t amount_ns) noexcept {
  return amount_ns > kEndOfTimeNs - start_ns ? kEndOfTimeNs : start_ns + amount_ns;
}

// An engine's time: the moment its queued work is done, in nanoseconds. Adding to it
// stops at kEndOfTimeNs instead of wrapping negative, so every `clock += cost` a driver
// call makes is safe as written; the powers check that their work fits first.
class ClockNs {
 public:
  operator std::int64_t() const noexcept { return ns_; }
  ClockNs& operator=(std::int64_t ns) noexcept {
    ns_ = ns;
    return *this;
  }
  ClockNs& operator+=(std::int64_t amount_ns) noexcept {
    ns_ = saturating_sum_ns(ns_, amount_ns);
    return *this;
  }
  friend ClockNs operator+(ClockNs clock, std::int64_t amount_ns) noexcept {
    return clock += amount_ns;
  }

 private:
  std::int64_t ns_ = 0;
};

// --- one device ---------------------------------------------------------------------------

struct Mapping {
  std::size_t size_bytes;
  PhysicalHandle handle;
  std::uint64_t access = 0;  // bit d: device d may use it (set_access)
};

inline constexpr std::uint64_t access_bit(int device) noexcept {
  return std::uint64_t{1} << static_cast<unsigned>(device);
}

// A host link shared by several devices: the moment the copies queued over it are done.
struct HostLink {
  std::mutex mutex;  // a leaf: taken under a device's mutex, never the other way round
  ClockNs busy_until_ns;
};

struct Reservation {
  std::size_t size_bytes;
  std::map<std::size_t, Mapping> mappings;  // by offset in the reservation
};

struct Physical {
  std::size_t size_bytes;
  std::uint64_t host_id = 0;  // its host memory in real-bytes mode
  int map_count = 0;
  bool released = false;  // released while mapped: freed at the last unmap
};

// An event (event_create). The simulator has no streams: recording one marks the moment
// all the work queued on its device so far is done, on both engines.
struct SimEvent {
  bool recorded = false;
  std::int64_t done_ns = 0;  // when the work it last recorded is done (if recorded)
};

struct DeviceState {
  mutable std::mutex mutex;  // guards everything below
  std::size_t physical_bytes = 0;
  std::size_t stream_bytes = 0;
  std::size_t external_bytes = 0;
  ClockNs clock_ns;        // the compute engine (and driver calls): done at
  ClockNs copy_engine_ns;  // the host-to-device copy engine: done at
  std::map<DeviceAddress, Reservation> reservations;
  std::map<PhysicalHandle, Physical> physical;
  std::map<DeviceAddress, std::size_t> streams;
  // Host memory adopted as this device's (SimDriver::adopt): start -> bytes.
  std::map<std::uintptr_t, std::size_t> adopted;
  std::map<EventHandle, SimEvent> events;  // live events (event_create), by handle
  DeviceAddress next_stream_va = 0;
  std::uint64_t next_handle = 1;
  std::uint64_t next_event = 1;
  // Stream-ordered frees not reusable yet: (when, bytes), in order of `when`.
  std::vector<std::pair<std::int64_t, std::size_t>> pending_frees;
  std::size_t pending_bytes = 0;

  // Gives back the frees whose delay has passed on this device's clock.
  void reap() {
    std::size_t done = 0;
    while (done < pending_frees.size() && pending_frees[done].first <= clock_ns) {
      pending_bytes -= pending_frees[done].second;
      ++done;
    }
    pending_frees.erase(pending_frees.begin(),
                        pending_frees.begin() + static_cast<std::ptrdiff_t>(done));
  }
  std::size_t used() const {
    return physical_bytes + stream_bytes + external_bytes + pending_bytes;
  }
  std::size_t free_of(std::size_t total_bytes) const {
    return used() >= total_bytes ? 0 : total_bytes - used();
  }
};

// --- the current context of each thread -----------------------------------------------------

class ContextTable {
 public:
  // The device current on the calling thread, or -1.
  int current();
  // Makes `device` current on the calling thread (-1: none).
  void set(int device);

 private:
  struct Shard {
    std::mutex mutex;  // guards `current`
    std::unordered_map<std::thread::id, int> current;
  };
  Shard& shard();

  std::array<Shard, 64> shards_;
};

// --- the whole simulator ---------------------------------------------------------------------

// Each device owns two regions of address space: one TiB for reservations (synthetic
// addresses, or real host address space in real-bytes mode) and one for stream-ordered
// allocations (always synthetic). A handle carries its device + 1 from this bit up.
inline constexpr DeviceAddress kRegionBytes = DeviceAddress{1} << 40;
inline constexpr int kHandleDeviceShift = 48;
// An event's handle: this tag in its top byte (no address or physical handle has it),
// its device + 1 from kHandleDeviceShift up to the tag, and its device's count below:
// the first event of device 0 is 0xee01000000000001.
inline constexpr int kEventTagShift = 56;
inline constexpr EventHandle kEventTag = 0xee;
static_assert(sizeof(EventHandle) == 8, "an event handle has 64 bits to carry its tag");

constexpr EventHandle event_handle(int device, std::uint64_t number) noexcept {
  return (kEventTag << kEventTagShift) |
         (static_cast<EventHandle>(device + 1) << kHandleDeviceShift) | number;
}

// The device whose event `event` may be, or -1 for a value no event of `device_count`
// devices has.
inline int device_of_event(EventHandle event, std::size_t device_count) noexcept {
  if (event >> kEventTagShift != kEventTag) return -1;
  const EventHandle encoded = (event >> kHandleDeviceShift) & 0xff;
  if (encoded == 0 || encoded > device_count) return -1;
  return static_cast<int>(encoded - 1);
}

struct SimDriver::State {
  std::vector<std::unique_ptr<DeviceState>> devices;
  ContextTable contexts;
  std::atomic<std::int64_t> host_clock_ns{0};
  // Fixed at construction: where each device's regions lie, and the host memory that
  // backs mapped pages in real-bytes mode (null otherwise).
  AddressNaming naming;
  std::unique_ptr<HostMemory> host;
  // The process that created the simulator, the only one it answers.
  CreatingProcess process;
  HeldCalls holds;
  // One per link SimTopology::host_links names (empty when each device has its own).
  std::vector<std::unique_ptr<HostLink>> host_links;
};

inline DriverStatus failure(int code) noexcept {
  return DriverStatus{code, driver_code::name(code), false};
}

inline bool aligned(std::size_t value, std::size_t alignment) noexcept {
  return alignment != 0 && value % alignment == 0;
}

// InvalidArgumentError unless `device` is one of the simulator's `total` devices.
void check_device(int device, int total);

// The start of every operation: refuse a process other than the creator (before any
// lock), wait if the call is held, answer `unknown_device_code` for a device the
// simulator does not have, then take the device's lock, give back the frees that are due,
// and run `body(device state, the operation's cost)` under it.
template <class Body>
DriverStatus SimDriver::run(Operation operation, int device, int unknown_device_code, Body&& body) {
  if (!state_->process.current()) return failure(driver_code::not_initialized);
  state_->holds.wait_if_held(operation, device);
  if (device < 0 || device >= device_total()) return failure(unknown_device_code);
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  return body(d, options_.costs.of(operation));
}

}  // namespace aimdo::sim
