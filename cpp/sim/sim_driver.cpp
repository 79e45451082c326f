#include "sim_driver.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <system_error>
#include <thread>
#include <unordered_map>

#include <unistd.h>

#include "aimdo/errors.hpp"
#include "host_memory.hpp"

namespace aimdo::sim {
namespace {

enum Op : int {
  kMemGetInfo,
  kReserve,
  kFreeRange,
  kCreate,
  kRelease,
  kMap,
  kUnmap,
  kSetAccess,
  kSynchronize,
  kAllocAsync,
  kFreeAsync,
  kSetCurrent,
  kOpCount
};
constexpr const char* kOpNames[kOpCount] = {
    "cuMemGetInfo", "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate",
    "cuMemRelease", "cuMemMap",            "cuMemUnmap",       "cuMemSetAccess",
    "cuCtxSynchronize", "cuMemAllocAsync", "cuMemFreeAsync",   "cuCtxSetCurrent"};

// Each device owns two regions of address space, so an address names its device without
// a global table: one TiB for reservations (synthetic addresses, or real host address
// space in real-bytes mode) and one for stream-ordered allocations (always synthetic).
constexpr DeviceAddress kAddressBase = DeviceAddress{1} << 44;
constexpr DeviceAddress kRegionBytes = DeviceAddress{1} << 40;
constexpr int kHandleDeviceShift = 48;

DeviceAddress synthetic_region(int device) {
  return kAddressBase + static_cast<DeviceAddress>(device) * 2 * kRegionBytes;
}

DriverStatus failure(int code) noexcept { return DriverStatus{code, driver_code::name(code), false}; }

bool aligned(std::size_t value, std::size_t alignment) noexcept {
  return alignment != 0 && value % alignment == 0;
}

std::string hex(DeviceAddress va) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "0x%" PRIx64, static_cast<std::uint64_t>(va));
  return buffer;
}

// Reading numbers back from the event log (replay). The log writes each in one form:
// decimal (sizes, counts, devices, codes, times), 0x-hex (handles, addresses) and %.17g
// (probabilities); these read exactly that form, the whole text, in range for the type,
// and throw InvalidArgumentError naming `key` otherwise (no sign on an unsigned value,
// no spaces, no octal, no wrap-around).
template <class Number>
Number parse_number(const char* key, const std::string& text, int base) {
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (base == 16) {
    if (text.size() < 3 || text[0] != '0' || text[1] != 'x') {
      throw InvalidArgumentError(std::string(key) + "=" + text + " is not a 0x-hex number");
    }
    first += 2;
  }
  Number value{};
  const auto [end, error] = std::from_chars(first, last, value, base);
  if (error == std::errc::result_out_of_range) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is out of range for its type");
  }
  if (error != std::errc() || end != last) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is not a number");
  }
  return value;
}

double parse_probability(const char* key, const std::string& text) {
  double value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error == std::errc::result_out_of_range) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is out of range for a double");
  }
  if (error != std::errc() || end != text.data() + text.size()) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is not a number");
  }
  return value;
}

int op_index(const std::string& operation) {
  for (int i = 0; i < kOpCount; ++i) {
    if (operation == kOpNames[i]) return i;
  }
  std::string known;
  for (const char* name : kOpNames) known += (known.empty() ? "" : ", ") + std::string(name);
  throw InvalidArgumentError("unknown driver operation '" + operation + "'; known: " + known);
}

struct FailureRule {
  int op;
  int device;
  int code;
  std::uint64_t skip;
  std::uint64_t count;
  double probability = 0;      // > 0: a rate rule (count is ignored)
  std::uint64_t random = 0;    // its generator's state (splitmix64)
};

double next_unit(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// Virtual time is int64 nanoseconds from 0, so it ends about 292 years in. The powers
// that move a clock by an amount the caller chose (advance, compute, copies) refuse one
// that would pass the end, with InvalidArgumentError; a driver call cannot refuse to cost
// time (the real driver would not fail), so its cost stops the clock at the end instead.
constexpr std::int64_t kEndOfTimeNs = std::numeric_limits<std::int64_t>::max();

// `start_ns + amount_ns`, or kEndOfTimeNs where the sum would pass it. Both must be
// non-negative (clocks start at 0 and only move forward; costs and delays are checked at
// construction).
constexpr std::int64_t saturating_sum_ns(std::int64_t start_ns, std::int64_t amount_ns) noexcept {
  return amount_ns > kEndOfTimeNs - start_ns ? kEndOfTimeNs : start_ns + amount_ns;
}

// InvalidArgumentError naming the clock (`where`, e.g. "device 0's clock"), the time
// the work starts at and its amount, unless `amount_ns` from `start_ns` fits in time.
void check_fits_in_time(const std::string& where, std::int64_t start_ns, const std::string& what,
                        std::int64_t amount_ns) {
  if (amount_ns <= kEndOfTimeNs - start_ns) return;
  throw InvalidArgumentError(where + " at " + std::to_string(start_ns) + " ns: " + what +
                             " " + std::to_string(amount_ns) +
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

// An engine's time: the moment its queued work is done, in nanoseconds. Adding to it
// stops at kEndOfTimeNs instead of wrapping negative, so every `clock += cost` a driver
// call makes is safe as written; the powers check with check_fits_in_time first.
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

struct Mapping {
  std::size_t size_bytes;
  PhysicalHandle handle;
  bool access = false;
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

struct DeviceState {
  mutable std::mutex mutex;
  std::size_t physical_bytes = 0;
  std::size_t stream_bytes = 0;
  std::size_t external_bytes = 0;
  ClockNs clock_ns;        // the compute engine (and driver calls): done at
  ClockNs copy_engine_ns;  // the host-to-device copy engine: done at
  std::map<DeviceAddress, Reservation> reservations;
  std::map<PhysicalHandle, Physical> physical;
  std::map<DeviceAddress, std::size_t> streams;
  DeviceAddress next_stream_va = 0;
  std::uint64_t next_handle = 1;
  std::vector<FailureRule> rules;
  std::array<std::uint64_t, kOpCount> calls{};
  // Stream-ordered frees not reusable yet: (when, bytes), in order of `when`.
  std::vector<std::pair<std::int64_t, std::size_t>> pending_frees;
  std::size_t pending_bytes = 0;

  // Give back the frees whose delay has passed on this device's clock.
  void reap() {
    std::size_t done = 0;
    while (done < pending_frees.size() && pending_frees[done].first <= clock_ns) {
      pending_bytes -= pending_frees[done].second;
      ++done;
    }
    pending_frees.erase(pending_frees.begin(), pending_frees.begin() + static_cast<std::ptrdiff_t>(done));
  }
  std::size_t used() const {
    return physical_bytes + stream_bytes + external_bytes + pending_bytes;
  }
};

struct ContextShard {
  std::mutex mutex;
  std::unordered_map<std::thread::id, int> current;
};

struct Hold {
  std::uint64_t id;
  int op;
  int device;
  bool arrived = false;
  bool released = false;
};

}  // namespace

struct SimDriver::State {
  std::vector<std::unique_ptr<DeviceState>> devices;
  std::array<ContextShard, 64> contexts;

  // Failures for "any device": rare, so the common path only reads the atomic count.
  std::mutex any_mutex;
  std::vector<FailureRule> any_rules;
  std::atomic<std::size_t> any_rule_count{0};
  std::array<std::atomic<std::uint64_t>, kOpCount> unrouted_calls{};

  // The event log: only touched while recording (a diagnostic mode), under its own mutex.
  std::atomic<bool> recording{false};
  mutable std::mutex log_mutex;
  std::vector<std::string> log_lines;
  std::atomic<std::int64_t> host_clock{0};
  std::atomic<std::uint64_t> rate_rules{0};  // seeds rate rules in order of creation
  std::size_t device_count = 0;

  // Fixed at construction: where each device's regions start, and the host memory that
  // backs mapped pages in real-bytes mode (null otherwise).
  std::vector<DeviceAddress> reservation_base;
  std::vector<DeviceAddress> stream_base;
  std::unique_ptr<HostMemory> host;

  // The process that created the simulator, the only one it answers (see "fork()" in
  // sim_driver.hpp). getpid() is asked on every check, not cached: a child made by a raw
  // fork() that runs no at-fork handler is recognised as well.
  const pid_t creator_pid = ::getpid();
  bool in_creating_process() const noexcept { return ::getpid() == creator_pid; }

  // Which device an address belongs to, and whether it is a stream-ordered one; -1 if none.
  int device_of(DeviceAddress va, bool* stream) const {
    for (std::size_t d = 0; d < device_count; ++d) {
      if (va >= reservation_base[d] && va - reservation_base[d] < kRegionBytes) {
        *stream = false;
        return static_cast<int>(d);
      }
      if (va >= stream_base[d] && va - stream_base[d] < kRegionBytes) {
        *stream = true;
        return static_cast<int>(d);
      }
    }
    return -1;
  }

  void record(std::string line) {
    std::lock_guard<std::mutex> lock(log_mutex);
    log_lines.push_back(std::move(line));
  }

  // Addresses in the log are relative to their device's region, so they read the same in
  // every run: "r<device>+0x<offset>" (reservations) or "s<device>+0x<offset>" (stream).
  std::string address(DeviceAddress va) const {
    bool stream = false;
    const int device = device_of(va, &stream);
    if (device < 0) return hex(va);
    const auto d = static_cast<std::size_t>(device);
    const DeviceAddress base = stream ? stream_base[d] : reservation_base[d];
    return std::string(stream ? "s" : "r") + std::to_string(device) + "+" + hex(va - base);
  }
  // What address() wrote: "r<device>+0x<offset>" with a device this simulator has and
  // an offset inside its region, or "0x<address>". InvalidArgumentError otherwise.
  DeviceAddress parse_address(const char* key, const std::string& text) const {
    if (!text.empty() && (text[0] == 'r' || text[0] == 's')) {
      const std::size_t plus = text.find('+');
      if (plus == std::string::npos) {
        throw InvalidArgumentError(std::string(key) + "=" + text + " is not an address");
      }
      const int device = parse_number<int>(key, text.substr(1, plus - 1), 10);
      if (device < 0 || static_cast<std::size_t>(device) >= device_count) {
        throw InvalidArgumentError(std::string(key) + "=" + text + " names device " +
                                   std::to_string(device) + "; the simulator has " +
                                   std::to_string(device_count));
      }
      const DeviceAddress offset = parse_number<DeviceAddress>(key, text.substr(plus + 1), 16);
      if (offset >= kRegionBytes) {
        throw InvalidArgumentError(std::string(key) + "=" + text +
                                   " lies past the end of the device's region");
      }
      const auto d = static_cast<std::size_t>(device);
      return (text[0] == 's' ? stream_base[d] : reservation_base[d]) + offset;
    }
    return parse_number<DeviceAddress>(key, text, 16);
  }
  // Advance the host clock to at least `ns`.
  void host_at_least(std::int64_t ns) {
    std::int64_t seen = host_clock.load(std::memory_order_relaxed);
    while (seen < ns && !host_clock.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
    }
  }
  // Move the host clock forward by `ns` (not negative), stopping at the end of time.
  void host_advance(std::int64_t ns) {
    std::int64_t seen = host_clock.load(std::memory_order_relaxed);
    while (!host_clock.compare_exchange_weak(seen, saturating_sum_ns(seen, ns),
                                             std::memory_order_relaxed)) {
    }
  }

  std::mutex holds_mutex;
  std::condition_variable holds_changed;
  std::vector<Hold> holds;
  std::atomic<std::size_t> pending_holds{0};
  std::uint64_t next_hold_id = 1;

  ContextShard& shard() {
    // libstdc++ hashes a thread id to its pthread_t, an aligned address: mix the bits, or
    // every thread would land in the same shard.
    std::uint64_t h = std::hash<std::thread::id>{}(std::this_thread::get_id());
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return contexts[static_cast<std::size_t>(h % contexts.size())];
  }

  int current_device() {
    if (!in_creating_process()) return -1;  // a forked child has no context
    ContextShard& s = shard();
    std::lock_guard<std::mutex> lock(s.mutex);
    auto found = s.current.find(std::this_thread::get_id());
    return found == s.current.end() ? -1 : found->second;
  }

  void set_current(int device) {
    ContextShard& s = shard();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (device < 0) {
      s.current.erase(std::this_thread::get_id());
    } else {
      s.current[std::this_thread::get_id()] = device;
    }
  }

  DriverStatus check_any_rules(int op, int device) {
    if (any_rule_count.load(std::memory_order_acquire) == 0) return DriverStatus::success();
    std::lock_guard<std::mutex> lock(any_mutex);
    return apply(any_rules, op, device, &any_rule_count);
  }

  static DriverStatus apply(std::vector<FailureRule>& rules, int op, int device,
                            std::atomic<std::size_t>* count) {
    for (auto it = rules.begin(); it != rules.end(); ++it) {
      if (it->op != op || (it->device != -1 && it->device != device)) continue;
      if (it->probability > 0) {
        if (next_unit(it->random) >= it->probability) continue;
        DriverStatus status = failure(it->code);
        status.injected = true;
        return status;
      }
      if (it->skip > 0) {
        --it->skip;
        continue;
      }
      DriverStatus status = failure(it->code);
      status.injected = true;
      if (--it->count == 0) {
        rules.erase(it);
        if (count != nullptr) count->fetch_sub(1, std::memory_order_acq_rel);
      }
      return status;
    }
    return DriverStatus::success();
  }

  // Caller holds d.mutex.
  DriverStatus intercept(DeviceState& d, int op, int device) {
    d.reap();
    ++d.calls[static_cast<std::size_t>(op)];
    DriverStatus status = apply(d.rules, op, device, nullptr);
    if (!status.ok()) return status;
    return check_any_rules(op, device);
  }

  // A call whose device cannot be told (a bad address or handle).
  DriverStatus intercept_unrouted(int op) {
    unrouted_calls[static_cast<std::size_t>(op)].fetch_add(1, std::memory_order_relaxed);
    return check_any_rules(op, -1);
  }

  // The start of every operation: refuse a process other than the creator, wait if it is
  // held, find its device (or answer `unrouted_code`, or the failure injected for "any
  // device"), take the device's lock into `lock` and apply injected failures. Returns the
  // device, or null with `status` set to the answer.
  DeviceState* enter(int op, int device, int unrouted_code, std::unique_lock<std::mutex>& lock,
                     DriverStatus* status) {
    // First, before any lock or count: what CUDA answers a child made by fork().
    if (!in_creating_process()) {
      *status = failure(driver_code::not_initialized);
      return nullptr;
    }
    wait_if_held(op, device);
    if (device < 0 || static_cast<std::size_t>(device) >= device_count) {
      const DriverStatus injected = intercept_unrouted(op);
      *status = injected.ok() ? failure(unrouted_code) : injected;
      return nullptr;
    }
    DeviceState& d = *devices[static_cast<std::size_t>(device)];
    lock = std::unique_lock<std::mutex>(d.mutex);
    *status = intercept(d, op, device);
    return status->ok() ? &d : nullptr;
  }

  void wait_if_held(int op, int device) {
    if (pending_holds.load(std::memory_order_acquire) == 0) return;
    std::unique_lock<std::mutex> lock(holds_mutex);
    auto match = std::find_if(holds.begin(), holds.end(), [&](const Hold& h) {
      return h.op == op && h.device == device && !h.arrived;
    });
    if (match == holds.end()) return;
    const std::uint64_t id = match->id;
    match->arrived = true;
    holds_changed.notify_all();
    holds_changed.wait(lock, [&] {
      auto h = std::find_if(holds.begin(), holds.end(), [&](const Hold& x) { return x.id == id; });
      return h == holds.end() || h->released;
    });
    holds.erase(std::remove_if(holds.begin(), holds.end(), [&](const Hold& x) { return x.id == id; }),
                holds.end());
    pending_holds.fetch_sub(1, std::memory_order_acq_rel);
    holds_changed.notify_all();
  }
};

const std::vector<std::string>& SimDriver::operation_names() {
  static const std::vector<std::string> names(std::begin(kOpNames), std::end(kOpNames));
  return names;
}

SimDriver::SimDriver(std::vector<SimDeviceSpec> devices, std::uint64_t seed, SimOptions options)
    : seed_(seed),
      options_(options),
      costs_(options_.costs),
      devices_(std::move(devices)),
      state_(std::make_unique<State>()) {
  if (options_.free_delay_ns < 0) throw InvalidArgumentError("free_delay must not be negative");
  // Clocks only move forward: a negative cost would move one back (and break the
  // end-of-time arithmetic, which assumes amounts are not negative).
  for (const std::int64_t cost_ns :
       {costs_.create_physical_ns, costs_.map_ns, costs_.set_access_ns, costs_.unmap_ns,
        costs_.release_physical_ns, costs_.memory_info_ns, costs_.synchronize_ns,
        costs_.reserve_ns, costs_.free_range_ns, costs_.stream_alloc_ns, costs_.stream_free_ns}) {
    if (cost_ns < 0) throw InvalidArgumentError("a simulated cost must not be negative");
  }
  if (devices_.empty() || devices_.size() > 64) {
    throw InvalidArgumentError("a simulator needs between 1 and 64 devices, got " +
                               std::to_string(devices_.size()));
  }
  for (std::size_t i = 0; i < devices_.size(); ++i) {
    const SimDeviceSpec& spec = devices_[i];
    const std::size_t g = spec.granularity_bytes;
    if (spec.total_bytes == 0) {
      throw InvalidArgumentError("simulated device " + std::to_string(i) +
                                 " needs a positive capacity");
    }
    if (g < 4096 || (g & (g - 1)) != 0) {
      throw InvalidArgumentError("simulated device " + std::to_string(i) +
                                 ": granularity must be a power of two of at least 4 KiB, got " +
                                 std::to_string(g));
    }
    if (!(spec.host_to_device_bytes_per_s > 0) || !std::isfinite(spec.host_to_device_bytes_per_s)) {
      throw InvalidArgumentError("simulated device " + std::to_string(i) +
                                 ": host-to-device bandwidth must be positive and finite");
    }
    auto state = std::make_unique<DeviceState>();
    state_->stream_base.push_back(synthetic_region(static_cast<int>(i)) + kRegionBytes);
    state->next_stream_va = state_->stream_base.back();
    state_->devices.push_back(std::move(state));
  }
  state_->device_count = devices_.size();
  state_->recording.store(options_.record);
  if (options_.real_bytes) {
    state_->host = std::make_unique<HostMemory>();
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      state_->reservation_base.push_back(
          static_cast<DeviceAddress>(state_->host->reserve(kRegionBytes, std::size_t{2} << 20)));
    }
  } else {
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      state_->reservation_base.push_back(synthetic_region(static_cast<int>(i)));
    }
  }
}

SimDriver::~SimDriver() = default;

bool SimDriver::real_bytes() const noexcept { return state_->host != nullptr; }

bool SimDriver::in_creating_process() const noexcept { return state_->in_creating_process(); }

void SimDriver::require_creating_process(const std::string& operation) const {
  if (state_->in_creating_process()) return;
  throw DriverError(operation + " in process " + std::to_string(::getpid()) +
                        " failed with CUDA_ERROR_NOT_INITIALIZED (3): this simulator belongs "
                        "to process " + std::to_string(state_->creator_pid) +
                        ", and a child made by fork() cannot use it, as it cannot use the "
                        "parent's CUDA driver state",
                    -1, operation, failure(driver_code::not_initialized));
}

void SimDriver::detach_from_parent() {
  if (state_->in_creating_process() || !state_->host) return;
  // The regions' bases are fixed at construction: read without a lock.
  for (const DeviceAddress base : state_->reservation_base) {
    HostMemory::detach(static_cast<std::uintptr_t>(base), static_cast<std::size_t>(kRegionBytes));
  }
}

std::vector<std::string> SimDriver::violations() const {
  return state_->host ? state_->host->violations() : std::vector<std::string>{};
}

namespace {


int device_of_handle(PhysicalHandle handle, std::size_t device_count) {
  const std::uint64_t encoded = handle >> kHandleDeviceShift;
  if (encoded == 0 || encoded > device_count) return -1;
  return static_cast<int>(encoded - 1);
}

// The reservation holding `va` and the offset of `va` in it, or null.
Reservation* find_reservation(DeviceState& d, DeviceAddress va, std::size_t* offset) {
  auto it = d.reservations.upper_bound(va);
  if (it == d.reservations.begin()) return nullptr;
  --it;
  if (va - it->first >= it->second.size_bytes) return nullptr;
  *offset = static_cast<std::size_t>(va - it->first);
  return &it->second;
}

// Every byte of [offset, offset + size) is mapped (with access set, if asked).
bool covered(Reservation& r, std::size_t offset, std::size_t size_bytes, bool need_access,
             std::vector<Mapping*>* out) {
  if (size_bytes == 0 || size_bytes > r.size_bytes - offset) return false;
  auto mapping = r.mappings.upper_bound(offset);
  if (mapping == r.mappings.begin()) return false;
  --mapping;
  std::size_t cursor = offset;
  while (cursor < offset + size_bytes) {
    if (mapping == r.mappings.end() || mapping->first > cursor ||
        mapping->first + mapping->second.size_bytes <= cursor ||
        (need_access && !mapping->second.access)) {
      return false;
    }
    if (out != nullptr) out->push_back(&mapping->second);
    cursor = mapping->first + mapping->second.size_bytes;
    ++mapping;
  }
  return true;
}

}  // namespace

// --- aimdo::Driver ---------------------------------------------------------------------

DriverStatus SimDriver::device_count(int* count) {
  // Answered in a forked child too, as the CUDA backend answers it from the devices it
  // found at initialization without calling the driver.
  *count = static_cast<int>(devices_.size());
  return DriverStatus::success();
}

DriverStatus SimDriver::device_properties(int device, DeviceProperties* out) {
  // Not a named operation (no enter()), but the CUDA backend asks the driver for these,
  // which refuses a forked child.
  if (!state_->in_creating_process()) return failure(driver_code::not_initialized);
  if (device < 0 || device >= device_total()) return failure(driver_code::invalid_device);
  const SimDeviceSpec& spec = devices_[static_cast<std::size_t>(device)];
  out->name = spec.name;
  out->total_bytes = spec.total_bytes;
  out->granularity_bytes = spec.granularity_bytes;
  out->integrated = spec.integrated;
  return DriverStatus::success();
}

DriverStatus SimDriver::memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kMemGetInfo, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    if (state_->current_device() != device) return failure(driver_code::invalid_context);
    const std::size_t total = devices_[static_cast<std::size_t>(device)].total_bytes;
    *total_bytes = total;
    *free_bytes = d.used() >= total ? 0 : total - d.used();
    d.clock_ns += costs_.memory_info_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemGetInfo") + " dev=" + std::to_string(device) + " cur=" + std::to_string(state_->current_device()) + " -> " + result.name;
    if (result.ok()) line += " free=" + std::to_string(*free_bytes) + " total=" + std::to_string(*total_bytes);
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::reserve_address_range(int device, std::size_t size_bytes,
                                              std::size_t alignment_bytes, DeviceAddress* out) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kReserve, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    const std::size_t granularity = devices_[static_cast<std::size_t>(device)].granularity_bytes;
    if (size_bytes == 0 || size_bytes > kRegionBytes / 2 || !aligned(size_bytes, granularity) ||
        (alignment_bytes != 0 && !aligned(alignment_bytes, granularity))) {
      return failure(driver_code::invalid_value);
    }
    const DeviceAddress alignment = std::max(alignment_bytes, granularity);
    // First fit in the device's region, leaving one unreserved granule after each range so
    // that an overrun never lands in a neighbour.
    const DeviceAddress region = state_->reservation_base[static_cast<std::size_t>(device)];
    DeviceAddress candidate = region;
    for (const auto& [start, reservation] : d.reservations) {
      candidate = (candidate + alignment - 1) / alignment * alignment;
      if (candidate + size_bytes + granularity <= start) break;
      candidate = start + reservation.size_bytes + granularity;
    }
    candidate = (candidate + alignment - 1) / alignment * alignment;
    if (candidate + size_bytes > region + kRegionBytes) return failure(driver_code::out_of_memory);
    d.reservations.emplace(candidate, Reservation{size_bytes, {}});
    *out = candidate;
    d.clock_ns += costs_.reserve_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemAddressReserve") + " dev=" + std::to_string(device) + " size=" + std::to_string(size_bytes) + " align=" + std::to_string(alignment_bytes) + " -> " + result.name;
    if (result.ok()) line += " va=" + state_->address(*out);
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::free_address_range(DeviceAddress va, std::size_t size_bytes) {
  const DriverStatus result = [&]() -> DriverStatus {
    bool stream = false;
    const int device = state_->device_of(va, &stream);
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kFreeRange, stream ? -1 : device, driver_code::invalid_value, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    auto it = d.reservations.find(va);
    if (it == d.reservations.end() || it->second.size_bytes != size_bytes ||
        !it->second.mappings.empty()) {
      return failure(driver_code::invalid_value);
    }
    // In real-bytes mode the range stays in the device's host reservation as it is: its
    // once-mapped pages read the trap pattern, so a Python view kept past the VBAR's
    // close reads garbage instead of crashing, and a later map there reports its writes.
    d.reservations.erase(it);
    d.clock_ns += costs_.free_range_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemAddressFree") + " va=" + state_->address(va) + " size=" + std::to_string(size_bytes) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kCreate, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    const SimDeviceSpec& spec = devices_[static_cast<std::size_t>(device)];
    if (size_bytes == 0 || !aligned(size_bytes, spec.granularity_bytes)) {
      return failure(driver_code::invalid_value);
    }
    if (d.used() > spec.total_bytes || size_bytes > spec.total_bytes - d.used()) {
      return failure(driver_code::out_of_memory);
    }
    std::uint64_t host_id = 0;
    if (state_->host) {
      try {
        host_id = state_->host->create(size_bytes);
      } catch (const std::exception&) {
        return failure(driver_code::out_of_memory);  // the host could not back it
      }
    }
    d.physical_bytes += size_bytes;
    const PhysicalHandle handle =
        (static_cast<PhysicalHandle>(device + 1) << kHandleDeviceShift) | d.next_handle++;
    Physical physical{size_bytes, host_id, 0, false};
    d.physical.emplace(handle, physical);
    *out = handle;
    d.clock_ns += costs_.create_physical_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemCreate") + " dev=" + std::to_string(device) + " size=" + std::to_string(size_bytes) + " -> " + result.name;
    if (result.ok()) line += " handle=" + hex(*out);
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::release_physical(PhysicalHandle handle) {
  const DriverStatus result = [&]() -> DriverStatus {
    const int device = device_of_handle(handle, devices_.size());
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kRelease, device, driver_code::invalid_handle, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    auto it = d.physical.find(handle);
    if (it == d.physical.end() || it->second.released) return failure(driver_code::invalid_handle);
    d.clock_ns += costs_.release_physical_ns;
    // As on the real driver, memory released while mapped lives until its last unmap
    // (so does a closed memfd that is still mapped).
    if (state_->host) state_->host->release(it->second.host_id);
    if (it->second.map_count > 0) {
      it->second.released = true;
    } else {
      d.physical_bytes -= it->second.size_bytes;
      d.physical.erase(it);
    }
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemRelease") + " handle=" + hex(handle) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) {
  const DriverStatus result = [&]() -> DriverStatus {
    const int device = device_of_handle(handle, devices_.size());
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kMap, device, driver_code::invalid_handle, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    auto physical = d.physical.find(handle);
    if (physical == d.physical.end() || physical->second.released) {
      return failure(driver_code::invalid_handle);
    }
    // Stricter than the driver: memory of one device is only mapped in a range reserved
    // for that device (aimdo never does otherwise).
    bool stream = false;
    if (state_->device_of(va, &stream) != device || stream) {
      return failure(driver_code::invalid_value);
    }
    const std::size_t granularity = devices_[static_cast<std::size_t>(device)].granularity_bytes;
    std::size_t offset = 0;
    Reservation* reservation = find_reservation(d, va, &offset);
    if (reservation == nullptr || size_bytes == 0 || !aligned(offset, granularity) ||
        !aligned(static_cast<std::size_t>(va), granularity) ||
        size_bytes != physical->second.size_bytes || size_bytes > reservation->size_bytes - offset) {
      return failure(driver_code::invalid_value);
    }
    // No overlap with an existing mapping on either side (the real driver answers
    // CUDA_ERROR_INVALID_VALUE too).
    auto next = reservation->mappings.lower_bound(offset);
    if (next != reservation->mappings.end() && next->first < offset + size_bytes) {
      return failure(driver_code::invalid_value);
    }
    if (next != reservation->mappings.begin()) {
      auto previous = std::prev(next);
      if (previous->first + previous->second.size_bytes > offset) {
        return failure(driver_code::invalid_value);
      }
    }
    if (state_->host) {
      try {
        state_->host->map(static_cast<std::uintptr_t>(va), size_bytes, physical->second.host_id);
      } catch (const std::exception&) {
        return failure(driver_code::out_of_memory);
      }
    }
    reservation->mappings.emplace(offset, Mapping{size_bytes, handle, false});
    ++physical->second.map_count;
    d.clock_ns += costs_.map_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemMap") + " va=" + state_->address(va) + " size=" + std::to_string(size_bytes) + " handle=" + hex(handle) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::unmap(DeviceAddress va, std::size_t size_bytes) {
  const DriverStatus result = [&]() -> DriverStatus {
    bool stream = false;
    const int device = state_->device_of(va, &stream);
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kUnmap, stream ? -1 : device, driver_code::invalid_value, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    std::size_t offset = 0;
    Reservation* reservation = find_reservation(d, va, &offset);
    if (reservation == nullptr) return failure(driver_code::invalid_value);
    auto mapping = reservation->mappings.find(offset);
    // Stricter than the driver, which accepts a second unmap: that is always a bug here.
    if (mapping == reservation->mappings.end()) return failure(driver_code::not_mapped);
    if (mapping->second.size_bytes != size_bytes) return failure(driver_code::invalid_value);
    if (state_->host) {
      try {
        state_->host->unmap(static_cast<std::uintptr_t>(va), size_bytes);
      } catch (const std::exception&) {
        return failure(driver_code::unknown);
      }
    }
    auto physical = d.physical.find(mapping->second.handle);
    reservation->mappings.erase(mapping);
    d.clock_ns += costs_.unmap_ns;
    if (physical != d.physical.end() && --physical->second.map_count == 0 &&
        physical->second.released) {
      d.physical_bytes -= physical->second.size_bytes;
      d.physical.erase(physical);
    }
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemUnmap") + " va=" + state_->address(va) + " size=" + std::to_string(size_bytes) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::set_access(DeviceAddress va, std::size_t size_bytes, int device) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kSetAccess, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    bool stream = false;
    // Peer access is not modelled: a device gets access to its own memory only.
    if (state_->device_of(va, &stream) != device || stream) {
      return failure(driver_code::invalid_value);
    }
    std::size_t offset = 0;
    Reservation* reservation = find_reservation(d, va, &offset);
    std::vector<Mapping*> mappings;
    if (reservation == nullptr || !covered(*reservation, offset, size_bytes, false, &mappings)) {
      return failure(driver_code::invalid_value);
    }
    if (state_->host) {
      try {
        state_->host->set_access(static_cast<std::uintptr_t>(va), size_bytes);
      } catch (const std::exception&) {
        return failure(driver_code::out_of_memory);
      }
    }
    for (Mapping* m : mappings) m->access = true;
    d.clock_ns += costs_.set_access_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemSetAccess") + " va=" + state_->address(va) + " size=" + std::to_string(size_bytes) + " dev=" + std::to_string(device) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::synchronize(int device) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kSynchronize, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    if (state_->current_device() != device) return failure(driver_code::invalid_context);
    // The host waits for both engines; the device's clock moves past both.
    d.clock_ns = std::max(d.clock_ns, d.copy_engine_ns) + costs_.synchronize_ns;
    state_->host_at_least(d.clock_ns);
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuCtxSynchronize") + " dev=" + std::to_string(device) + " cur=" + std::to_string(state_->current_device()) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::stream_alloc(int device, std::size_t size_bytes, StreamHandle,
                                     DeviceAddress* out) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kAllocAsync, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    if (state_->current_device() != device) return failure(driver_code::invalid_context);
    const std::size_t total = devices_[static_cast<std::size_t>(device)].total_bytes;
    if (size_bytes == 0 || size_bytes > kRegionBytes / 4) return failure(driver_code::invalid_value);
    if (d.used() > total || size_bytes > total - d.used()) {
      return failure(driver_code::out_of_memory);
    }
    const DeviceAddress region_end = state_->stream_base[static_cast<std::size_t>(device)] + kRegionBytes;
    const DeviceAddress padded = (size_bytes + 511) / 512 * 512 + 512;
    if (d.next_stream_va + padded > region_end) {
      d.next_stream_va = state_->stream_base[static_cast<std::size_t>(device)];  // wrap around
    }
    while (d.streams.count(d.next_stream_va) != 0) d.next_stream_va += 512;
    const DeviceAddress va = d.next_stream_va;
    d.next_stream_va += padded;
    d.stream_bytes += size_bytes;
    d.streams.emplace(va, size_bytes);
    *out = va;
    d.clock_ns += costs_.stream_alloc_ns;
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemAllocAsync") + " dev=" + std::to_string(device) + " cur=" + std::to_string(state_->current_device()) + " size=" + std::to_string(size_bytes) + " -> " + result.name;
    if (result.ok()) line += " ptr=" + state_->address(*out);
    state_->record(std::move(line));
  }
  return result;
}

DriverStatus SimDriver::stream_free(int device, DeviceAddress ptr, StreamHandle) {
  const DriverStatus result = [&]() -> DriverStatus {
    std::unique_lock<std::mutex> lock;
    DriverStatus status;
    DeviceState* entered = state_->enter(kFreeAsync, device, driver_code::invalid_device, lock, &status);
    if (entered == nullptr) return status;
    DeviceState& d = *entered;
    if (state_->current_device() != device) return failure(driver_code::invalid_context);
    auto it = d.streams.find(ptr);
    if (it == d.streams.end()) return failure(driver_code::invalid_value);
    d.stream_bytes -= it->second;
    d.clock_ns += costs_.stream_free_ns;
    if (options_.free_delay_ns > 0) {
      // Reusable only once the device's clock has passed the delay.
      d.pending_frees.emplace_back(d.clock_ns + options_.free_delay_ns, it->second);
      d.pending_bytes += it->second;
    }
    d.streams.erase(it);
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuMemFreeAsync") + " dev=" + std::to_string(device) + " cur=" + std::to_string(state_->current_device()) + " ptr=" + state_->address(ptr) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

int SimDriver::current_device() noexcept { return state_->current_device(); }

DriverStatus SimDriver::make_current(int device, ContextToken* previous) {
  const DriverStatus result = [&]() -> DriverStatus {
    {
      std::unique_lock<std::mutex> lock;
      DriverStatus status;
      if (state_->enter(kSetCurrent, device, driver_code::invalid_device, lock, &status) == nullptr) {
        return status;
      }
    }
    const int current = state_->current_device();
    previous->device = current;
    previous->context = nullptr;
    previous->switched = current != device;
    if (previous->switched) state_->set_current(device);
    return DriverStatus::success();
  }();
  if (state_->recording.load(std::memory_order_relaxed)) {
    std::string line = std::string("cuCtxSetCurrent") + " dev=" + std::to_string(device) + " -> " + result.name;
    state_->record(std::move(line));
  }
  return result;
}

void SimDriver::restore_current(const ContextToken& previous) noexcept {
  if (previous.switched) state_->set_current(previous.device);
}

std::int64_t SimDriver::now_ns(int device) noexcept {
  if (device < 0 || device >= device_total()) return 0;
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.clock_ns;
}

// --- simulator powers ------------------------------------------------------------------

namespace {
void check_device(int device, int total) {
  if (device < 0 || device >= total) {
    throw InvalidArgumentError("the simulator has no device " + std::to_string(device) +
                               " (it has " + std::to_string(total) + ")");
  }
}
}  // namespace

void SimDriver::add_external_usage(int device, std::size_t bytes) {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  const std::size_t total = devices_[static_cast<std::size_t>(device)].total_bytes;
  const std::size_t free_bytes = d.used() >= total ? 0 : total - d.used();
  if (bytes > free_bytes) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has only " +
                               std::to_string(free_bytes) + " bytes free; cannot add " +
                               std::to_string(bytes) + " bytes of external usage");
  }
  d.external_bytes += bytes;
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@add_external_usage dev=" + std::to_string(device) + " bytes=" +
                   std::to_string(bytes));
  }
}

void SimDriver::remove_external_usage(int device, std::size_t bytes) {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  if (bytes > d.external_bytes) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has only " +
                               std::to_string(d.external_bytes) +
                               " bytes of external usage; cannot remove " + std::to_string(bytes));
  }
  d.external_bytes -= bytes;
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@remove_external_usage dev=" + std::to_string(device) + " bytes=" +
                   std::to_string(bytes));
  }
}

std::size_t SimDriver::external_usage(int device) const {
  check_device(device, device_total());
  const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.external_bytes;
}

std::size_t SimDriver::physical_bytes(int device) const {
  check_device(device, device_total());
  const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.physical_bytes;
}

std::size_t SimDriver::used_bytes(int device) const {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  return d.used();
}

std::size_t SimDriver::pending_free_bytes(int device) const {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  return d.pending_bytes;
}

bool SimDriver::is_accessible(DeviceAddress va, std::size_t size_bytes) const {
  bool stream = false;
  const int device = state_->device_of(va, &stream);
  if (device < 0 || stream) return false;
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  std::size_t offset = 0;
  Reservation* reservation = find_reservation(d, va, &offset);
  return reservation != nullptr && covered(*reservation, offset, size_bytes, true, nullptr);
}

void SimDriver::fail(const std::string& operation, int device, int code, std::uint64_t skip,
                     std::uint64_t count) {
  const int op = op_index(operation);
  if (code == driver_code::success) {
    throw InvalidArgumentError("an injected failure needs a non-zero code");
  }
  if (count == 0) throw InvalidArgumentError("count must be positive");
  const FailureRule rule{op, device, code, skip, count};
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@fail op=" + operation + " dev=" + std::to_string(device) + " code=" +
                   std::to_string(code) + " skip=" + std::to_string(skip) + " count=" +
                   std::to_string(count));
  }
  if (device == -1) {
    std::lock_guard<std::mutex> lock(state_->any_mutex);
    state_->any_rules.push_back(rule);
    state_->any_rule_count.fetch_add(1, std::memory_order_acq_rel);
    return;
  }
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.rules.push_back(rule);
}

void SimDriver::fail_rate(const std::string& operation, int device, int code,
                          double probability) {
  const int op = op_index(operation);
  if (code == driver_code::success) {
    throw InvalidArgumentError("an injected failure needs a non-zero code");
  }
  if (!(probability > 0 && probability <= 1)) {
    throw InvalidArgumentError("probability must be in (0, 1]");
  }
  if (device != -1) check_device(device, device_total());
  FailureRule rule{op, device, code, 0, 1};
  rule.probability = probability;
  const std::uint64_t index = state_->rate_rules.fetch_add(1);
  rule.random = seed_ ^ (0x9e3779b97f4a7c15ULL * (index + 1));
  if (state_->recording.load(std::memory_order_relaxed)) {
    char text[40];
    std::snprintf(text, sizeof text, "%.17g", probability);
    state_->record("@fail_rate op=" + operation + " dev=" + std::to_string(device) + " code=" +
                   std::to_string(code) + " p=" + text);
  }
  if (device == -1) {
    std::lock_guard<std::mutex> lock(state_->any_mutex);
    state_->any_rules.push_back(rule);
    state_->any_rule_count.fetch_add(1, std::memory_order_acq_rel);
    return;
  }
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.rules.push_back(rule);
}

void SimDriver::clear_failures() {
  if (state_->recording.load(std::memory_order_relaxed)) state_->record("@clear_failures");
  {
    std::lock_guard<std::mutex> lock(state_->any_mutex);
    state_->any_rules.clear();
    state_->any_rule_count.store(0, std::memory_order_release);
  }
  for (auto& d : state_->devices) {
    std::lock_guard<std::mutex> lock(d->mutex);
    d->rules.clear();
  }
}

std::uint64_t SimDriver::call_count(const std::string& operation, int device) const {
  const auto op = static_cast<std::size_t>(op_index(operation));
  if (device != -1) {
    check_device(device, device_total());
    const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
    std::lock_guard<std::mutex> lock(d.mutex);
    return d.calls[op];
  }
  std::uint64_t total = state_->unrouted_calls[op].load(std::memory_order_relaxed);
  for (const auto& d : state_->devices) {
    std::lock_guard<std::mutex> lock(d->mutex);
    total += d->calls[op];
  }
  return total;
}

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
    check_fits_in_time("device " + std::to_string(i) + "'s clock", d.clock_ns, "advancing it by",
                       ns);
  }
  if (device == -1) {
    check_fits_in_time("the host's clock", state_->host_clock.load(std::memory_order_relaxed),
                       "advancing it by", ns);
  }
  for (int i = 0; i < device_total(); ++i) {
    if (device != -1 && i != device) continue;
    DeviceState& d = *state_->devices[static_cast<std::size_t>(i)];
    std::lock_guard<std::mutex> lock(d.mutex);
    d.clock_ns += ns;
  }
  if (device == -1) state_->host_advance(ns);
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@advance dev=" + std::to_string(device) + " ns=" + std::to_string(ns));
  }
}

// Each of these checks that the work fits before virtual time ends, then moves the clock
// and records the call under the device's lock, so a refused call leaves the clocks and
// the log as they were.
void SimDriver::copy_to_device(int device, std::size_t bytes) {
  check_device(device, device_total());
  const std::int64_t ns = copy_duration_ns(
      device, bytes, devices_[static_cast<std::size_t>(device)].host_to_device_bytes_per_s);
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  check_fits_in_time("device " + std::to_string(device) + "'s clock", d.clock_ns,
                     "a copy of " + std::to_string(bytes) + " bytes taking", ns);
  d.clock_ns += ns;
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@copy_to_device dev=" + std::to_string(device) + " bytes=" +
                   std::to_string(bytes));
  }
}

void SimDriver::compute(int device, std::int64_t ns) {
  if (ns < 0) throw InvalidArgumentError("compute time must not be negative");
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  check_fits_in_time("device " + std::to_string(device) + "'s clock", d.clock_ns, "compute of", ns);
  d.clock_ns += ns;
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@compute dev=" + std::to_string(device) + " ns=" + std::to_string(ns));
  }
}

std::int64_t SimDriver::copy_async(int device, std::size_t bytes, std::int64_t after_ns) {
  check_device(device, device_total());
  if (after_ns < 0) throw InvalidArgumentError("a copy cannot wait for a time before 0");
  const std::int64_t ns = copy_duration_ns(
      device, bytes, devices_[static_cast<std::size_t>(device)].host_to_device_bytes_per_s);
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  const std::int64_t start_ns = std::max<std::int64_t>(d.copy_engine_ns, after_ns);
  check_fits_in_time("device " + std::to_string(device) + "'s copy engine, starting the copy",
                     start_ns, "a copy of " + std::to_string(bytes) + " bytes taking", ns);
  d.copy_engine_ns = start_ns + ns;
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@copy_async dev=" + std::to_string(device) + " bytes=" + std::to_string(bytes) +
                   " after=" + std::to_string(after_ns));
  }
  return d.copy_engine_ns;
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
  if (state_->recording.load(std::memory_order_relaxed)) {
    state_->record("@compute_async dev=" + std::to_string(device) + " ns=" + std::to_string(ns) +
                   " after=" + std::to_string(after_ns));
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
  return state_->host_clock.load(std::memory_order_relaxed);
}

void SimDriver::set_recording(bool on) { state_->recording.store(on); }

std::string SimDriver::log() const {
  std::lock_guard<std::mutex> lock(state_->log_mutex);
  std::string out;
  for (const auto& line : state_->log_lines) {
    out += line;
    out += '\n';
  }
  return out;
}

namespace {

// One log line: its name, its key=value arguments, and whether "->" and a result follow
// them (a driver call's line has one, a simulator power's has none). The result is not
// read: replay compares it as text.
struct LogLine {
  std::string name;
  std::map<std::string, std::string> args;
  bool has_result = false;
  std::set<std::string> read;  // the arguments replay used: any other is one too many
};

LogLine parse_line(const std::string& line) {
  std::istringstream in(line);
  LogLine out;
  in >> out.name;
  std::string token;
  while (in >> token) {
    if (token == "->") {
      out.has_result = true;
      break;
    }
    const std::size_t eq = token.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw InvalidArgumentError("'" + token + "' is not key=value");
    }
    if (!out.args.emplace(token.substr(0, eq), token.substr(eq + 1)).second) {
      throw InvalidArgumentError(token.substr(0, eq) + "= appears twice");
    }
  }
  if (out.has_result != (out.name[0] != '@')) {
    throw InvalidArgumentError(out.has_result ? "a simulator power's line has no '->'"
                                              : "it lacks '-> result'");
  }
  return out;
}

const std::string& field(LogLine& l, const char* key) {
  auto found = l.args.find(key);
  if (found == l.args.end()) throw InvalidArgumentError(std::string("it lacks ") + key + "=");
  l.read.insert(key);
  return found->second;
}

// Log text as an error message quotes it: at most `max_bytes`, cut between two UTF-8
// characters (Python decodes the message), "..." marking the cut.
std::string clipped(const std::string& text, std::size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  std::size_t cut = max_bytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut) + "...";
}

}  // namespace

std::vector<std::string> SimDriver::replay(const std::string& log_text) const {
  SimOptions options = options_;
  options.record = true;
  SimDriver fresh(devices_, seed_, options);
  State& st = *fresh.state_;
  std::vector<std::string> expected;
  std::vector<std::size_t> expected_line_numbers;  // in log_text, blank lines counted
  std::istringstream lines(log_text);
  std::string line;
  std::size_t line_number = 0;
  while (std::getline(lines, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();  // a log saved with CRLF
    if (line.find_first_not_of(" \t\r\v\f") == std::string::npos) continue;  // blank
    expected.push_back(line);
    expected_line_numbers.push_back(line_number);
    try {
      LogLine l = parse_line(line);
      const auto number = [&](const char* key) {
        return parse_number<std::uint64_t>(key, field(l, key), 10);
      };
      const auto handle_of = [&](const char* key) {
        return parse_number<PhysicalHandle>(key, field(l, key), 16);
      };
      const auto signed_number = [&](const char* key) {
        return parse_number<std::int64_t>(key, field(l, key), 10);
      };
      const auto int_number = [&](const char* key) {
        return parse_number<int>(key, field(l, key), 10);
      };
      const auto device = [&] { return int_number("dev"); };
      const auto size = [&] { return static_cast<std::size_t>(number("size")); };
      const auto va = [&] { return st.parse_address("va", field(l, "va")); };
      // The calls that need a current context log it (cur=, -1 for none) before their
      // result; replay makes it current again first.
      const auto current = [&] {
        const int cur = int_number("cur");
        if (cur < -1 || cur >= fresh.device_total()) {
          throw InvalidArgumentError("cur=" + std::to_string(cur) + " is not -1 or a device of " +
                                     "this simulator");
        }
        st.set_current(cur);
      };
      std::size_t a = 0;
      std::size_t b = 0;
      DeviceAddress out = 0;
      PhysicalHandle handle = 0;
      if (l.name == "cuMemGetInfo") {
        current();
        fresh.memory_info(device(), &a, &b);
      } else if (l.name == "cuMemAddressReserve") {
        fresh.reserve_address_range(device(), size(), static_cast<std::size_t>(number("align")), &out);
      } else if (l.name == "cuMemAddressFree") {
        fresh.free_address_range(va(), size());
      } else if (l.name == "cuMemCreate") {
        fresh.create_physical(device(), size(), &handle);
      } else if (l.name == "cuMemRelease") {
        fresh.release_physical(handle_of("handle"));
      } else if (l.name == "cuMemMap") {
        fresh.map(va(), size(), handle_of("handle"));
      } else if (l.name == "cuMemUnmap") {
        fresh.unmap(va(), size());
      } else if (l.name == "cuMemSetAccess") {
        fresh.set_access(va(), size(), device());
      } else if (l.name == "cuCtxSynchronize") {
        current();
        fresh.synchronize(device());
      } else if (l.name == "cuMemAllocAsync") {
        current();
        fresh.stream_alloc(device(), size(), 0, &out);
      } else if (l.name == "cuMemFreeAsync") {
        current();
        fresh.stream_free(device(), st.parse_address("ptr", field(l, "ptr")), 0);
      } else if (l.name == "cuCtxSetCurrent") {
        ContextToken token;
        fresh.make_current(device(), &token);
      } else if (l.name == "@add_external_usage") {
        fresh.add_external_usage(device(), static_cast<std::size_t>(number("bytes")));
      } else if (l.name == "@remove_external_usage") {
        fresh.remove_external_usage(device(), static_cast<std::size_t>(number("bytes")));
      } else if (l.name == "@fail") {
        fresh.fail(field(l, "op"), device(), int_number("code"), number("skip"), number("count"));
      } else if (l.name == "@fail_rate") {
        fresh.fail_rate(field(l, "op"), device(), int_number("code"),
                        parse_probability("p", field(l, "p")));
      } else if (l.name == "@clear_failures") {
        fresh.clear_failures();
      } else if (l.name == "@advance") {
        fresh.advance(device(), signed_number("ns"));
      } else if (l.name == "@copy_to_device") {
        fresh.copy_to_device(device(), static_cast<std::size_t>(number("bytes")));
      } else if (l.name == "@compute") {
        fresh.compute(device(), signed_number("ns"));
      } else if (l.name == "@copy_async") {
        fresh.copy_async(device(), static_cast<std::size_t>(number("bytes")), signed_number("after"));
      } else if (l.name == "@compute_async") {
        fresh.compute_async(device(), signed_number("ns"), signed_number("after"));
      } else {
        throw InvalidArgumentError("'" + l.name + "' is neither a driver call nor a simulator power");
      }
      // Checked after the call: it only ran on `fresh`, which the throw discards.
      for (const auto& arg : l.args) {
        if (l.read.count(arg.first) == 0) {
          throw InvalidArgumentError(l.name + " has no argument " + arg.first + "=");
        }
      }
    } catch (const InvalidArgumentError& error) {
      // A line that does not read, or a power that refuses it (which a recorded call
      // never was): the documented error, naming the line.
      throw InvalidArgumentError("cannot replay log line " + std::to_string(line_number) + " ('" +
                                 clipped(line, 200) + "'): " + clipped(error.what(), 300));
    }
  }
  std::vector<std::string> differences;
  std::lock_guard<std::mutex> lock(st.log_mutex);
  const std::size_t n = std::max(expected.size(), st.log_lines.size());
  for (std::size_t i = 0; i < n; ++i) {
    const std::string want = i < expected.size() ? expected[i] : "(nothing)";
    const std::string got = i < st.log_lines.size() ? st.log_lines[i] : "(nothing)";
    if (want != got) {
      // Lines are replayed one for one, so a line of its own past the log's end would be
      // a bug of replay's; it is still reported, numbered after the log's last line.
      const std::size_t number =
          i < expected.size() ? expected_line_numbers[i] : line_number + 1 + (i - expected.size());
      differences.push_back("line " + std::to_string(number) + ": logged '" + want +
                            "', replayed '" + got + "'");
    }
  }
  return differences;
}

std::vector<std::string> SimDriver::leaks() const {
  std::vector<std::string> out;
  for (int device = 0; device < device_total(); ++device) {
    const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
    const std::string prefix = "device " + std::to_string(device) + ": ";
    std::lock_guard<std::mutex> lock(d.mutex);
    for (const auto& [va, reservation] : d.reservations) {
      out.push_back(prefix + "address reservation of " + std::to_string(reservation.size_bytes) +
                    " bytes at " + hex(va));
      for (const auto& [offset, mapping] : reservation.mappings) {
        out.push_back(prefix + "mapping of " + std::to_string(mapping.size_bytes) + " bytes at " +
                      hex(va + offset) + " (physical allocation " + hex(mapping.handle) + ")");
      }
    }
    for (const auto& [handle, physical] : d.physical) {
      out.push_back(prefix + "physical allocation " + hex(handle) + " of " +
                    std::to_string(physical.size_bytes) + " bytes" +
                    (physical.released ? " (released but still mapped)" : ""));
    }
    for (const auto& [va, size] : d.streams) {
      out.push_back(prefix + "stream-ordered allocation of " + std::to_string(size) +
                    " bytes at " + hex(va));
    }
  }
  return out;
}

std::uint64_t SimDriver::hold(const std::string& operation, int device) {
  const int op = op_index(operation);
  check_device(device, device_total());
  std::lock_guard<std::mutex> lock(state_->holds_mutex);
  const std::uint64_t id = state_->next_hold_id++;
  state_->holds.push_back(Hold{id, op, device});
  state_->pending_holds.fetch_add(1, std::memory_order_acq_rel);
  return id;
}

bool SimDriver::wait_held(std::uint64_t hold_id, std::int64_t timeout_ns) {
  if (timeout_ns < 0) throw InvalidArgumentError("a timeout must not be negative");
  // A deadline past the steady clock's range waits as long as it can instead of wrapping
  // round to the past (wait_for would add the timeout to now() unchecked).
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  const auto timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(timeout_ns));
  const Clock::time_point deadline =
      timeout > Clock::time_point::max() - now ? Clock::time_point::max() : now + timeout;
  std::unique_lock<std::mutex> lock(state_->holds_mutex);
  return state_->holds_changed.wait_until(lock, deadline, [&] {
    auto h = std::find_if(state_->holds.begin(), state_->holds.end(),
                          [&](const Hold& x) { return x.id == hold_id; });
    return h != state_->holds.end() && h->arrived;
  });
}

void SimDriver::release_hold(std::uint64_t hold_id) {
  std::lock_guard<std::mutex> lock(state_->holds_mutex);
  auto h = std::find_if(state_->holds.begin(), state_->holds.end(),
                        [&](const Hold& x) { return x.id == hold_id; });
  if (h == state_->holds.end()) return;
  if (h->arrived) {
    h->released = true;  // the held call removes it
  } else {
    state_->holds.erase(h);
    state_->pending_holds.fetch_sub(1, std::memory_order_acq_rel);
  }
  state_->holds_changed.notify_all();
}

}  // namespace aimdo::sim
