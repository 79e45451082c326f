#include "aimdo/device.hpp"
#include "device_internal.hpp"

#include <algorithm>
#include <exception>
#include <optional>
#include <utility>

#include "aimdo/errors.hpp"
#include "aimdo/process.hpp"
#include "aimdo/vbar.hpp"
#include "check.hpp"
#include "driver_errors.hpp"
#include "format.hpp"
#include "limits.hpp"

namespace aimdo {
namespace {

using detail::format_bytes;

void validate_options(int ordinal, const DeviceProperties& properties,
                      const DeviceOptions& options) {
  const std::string where = "device " + std::to_string(ordinal) + ": ";
  const std::string max = format_bytes(detail::kMaxSizeBytes);
  // The budget arithmetic is exact only for figures up to kMaxSizeBytes (limits.hpp); a
  // backend reporting more is refused rather than trusted.
  if (properties.total_bytes == 0 || properties.total_bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError(where + "the backend reports " +
                               format_bytes(properties.total_bytes) +
                               " of memory; aimdo supports devices of 1 byte to " + max);
  }
  const std::size_t granularity = properties.granularity_bytes;
  if (options.page_size_bytes == 0 || granularity == 0 ||
      options.page_size_bytes % granularity != 0 ||
      options.page_size_bytes > properties.total_bytes) {
    throw InvalidArgumentError(where +
                               "page_size must be a positive multiple of the allocation "
                               "granularity (" +
                               format_bytes(granularity) +
                               ") no larger than "
                               "the device's memory (" +
                               format_bytes(properties.total_bytes) + "), got " +
                               format_bytes(options.page_size_bytes));
  }
  if (options.vram_limit_bytes &&
      (*options.vram_limit_bytes == 0 || *options.vram_limit_bytes > detail::kMaxSizeBytes)) {
    throw InvalidArgumentError(where + "vram_limit must be in [1 byte, " + max + "], got " +
                               format_bytes(*options.vram_limit_bytes));
  }
  const std::pair<const char*, std::size_t> sizes[] = {
      {"headroom", options.headroom_bytes},
      {"extra_headroom", options.extra_headroom_bytes},
      {"allocator_headroom", options.allocator_headroom_bytes},
  };
  for (const auto& [name, bytes] : sizes) {
    if (bytes > detail::kMaxSizeBytes) {
      throw InvalidArgumentError(where + name + " must be at most " + max + ", got " +
                                 format_bytes(bytes));
    }
  }
  if (options.poll_interval_ns < 0 || options.poll_interval_ns > detail::kMaxPollIntervalNs) {
    throw InvalidArgumentError(where +
                               "poll_interval must be in [0, 2^62 ns] (about 146 "
                               "years), got " +
                               std::to_string(options.poll_interval_ns) + " ns");
  }
  if (options.transient_retries < 0 || options.transient_retries > 1000) {
    throw InvalidArgumentError(where + "transient_retries must be in [0, 1000]");
  }
}

}  // namespace

void Device::validate(int ordinal, const DeviceProperties& properties,
                      const DeviceOptions& options) {
  validate_options(ordinal, properties, options);
}

Device::Device(std::shared_ptr<Driver> driver, int ordinal, DeviceProperties properties,
               const DeviceOptions& options)
    : driver_(std::move(driver)), ordinal_(ordinal), properties_(std::move(properties)) {
  validate_options(ordinal_, properties_, options);
  options_ = options;
}

Device::~Device() {
  // VBARs hold the Device alive, so by now every VBAR is gone and released.
}

DeviceOptions Device::options() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return options_;
}

void Device::set_options(const DeviceOptions& options) {
  validate_options(ordinal_, properties_, options);
  std::lock_guard<std::mutex> lock(mutex_);
  options_ = options;
}

void Device::activate(std::optional<ScopedDevice>& guard) {
  for (int attempt = 0;; ++attempt) {
    guard.emplace(*driver_, ordinal_);
    const DriverStatus status = guard->status();
    if (status.ok()) return;
    guard.reset();
    if (status.kind() != DriverErrorKind::transient || attempt >= options_.transient_retries) {
      raise(status, "cuCtxSetCurrent", 0);
    }
    stats_.add(&DeviceStats::transient_retries);
  }
}

void Device::raise(const DriverStatus& status, const char* operation, std::size_t requested_bytes,
                   const std::string& more) const {
  // Called with mutex_ held: the figures are consistent.
  const std::size_t usage = usage_locked();
  std::string detail = "aimdo uses " + format_bytes(usage) + " on this device" + more;
  detail::throw_driver_failure(status, ordinal_, operation, requested_bytes, detail);
}

std::shared_ptr<Vbar> Device::create_vbar(std::size_t size_bytes) {
  if (size_bytes == 0 || size_bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError("device " + std::to_string(ordinal_) +
                               ": a VBAR's size must be positive and below 2^60 bytes, got " +
                               std::to_string(size_bytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw InvalidStateError("device " + std::to_string(ordinal_) + " is closed");
  const std::size_t page_size = options_.page_size_bytes;
  const std::size_t pages = (size_bytes + page_size - 1) / page_size;
  const std::size_t reserve_bytes = pages * page_size;

  std::optional<ScopedDevice> guard;
  activate(guard);
  DeviceAddress base = 0;
  const DriverStatus status = retrying([&] {
    return driver_->reserve_address_range(ordinal_, reserve_bytes, properties_.granularity_bytes,
                                          &base);
  });
  if (!status.ok()) raise(status, "cuMemAddressReserve", reserve_bytes);

  // The list node comes first so that nothing can fail once the VBAR exists (its
  // destructor would need this device's lock, which is held here).
  std::shared_ptr<Vbar> vbar;
  try {
    priority_.push_front(nullptr);
    try {
      vbar = std::make_shared<Vbar>(shared_from_this(), base, size_bytes, page_size);
    } catch (...) {
      priority_.pop_front();
      throw;
    }
  } catch (...) {
    driver_->free_address_range(base, reserve_bytes);
    throw;
  }
  priority_.front() = vbar.get();
  vbar->priority_position_ = priority_.begin();
  return vbar;
}

BudgetInputs Device::budget_inputs_locked(std::size_t usage) {
  BudgetInputs in;
  in.total_bytes = properties_.total_bytes;
  in.limit_bytes = std::min(in.total_bytes, options_.vram_limit_bytes.value_or(in.total_bytes));
  in.headroom_bytes = options_.headroom_bytes;
  in.extra_headroom_bytes = options_.extra_headroom_bytes;
  in.usage_bytes = usage;
  in.usage_at_poll_bytes = usage_at_poll_bytes_;
  in.free_at_poll_bytes = free_at_poll_bytes_;
  in.stream_freed_since_poll_bytes = stream_freed_since_poll_bytes_;
  return in;
}

bool Device::poll_due_locked() const {
  return !polled_ || driver_->now_ns(ordinal_) - last_poll_ns_ >= options_.poll_interval_ns;
}

std::pair<std::size_t, std::size_t> Device::query_memory_locked() {
  std::optional<ScopedDevice> guard;
  activate(guard);
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  const DriverStatus status =
      retrying([&] { return driver_->memory_info(ordinal_, &free_bytes, &total_bytes); });
  if (!status.ok()) raise(status, "cuMemGetInfo", 0);
  return {free_bytes, total_bytes};
}

void Device::poll_locked(bool fresh) {
  if (!fresh && !poll_due_locked()) return;
  const std::int64_t now = driver_->now_ns(ordinal_);
  const std::size_t free_bytes = query_memory_locked().first;
  stats_.add(&DeviceStats::polls);
  polled_ = true;
  last_poll_ns_ = now;
  free_at_poll_bytes_ = free_bytes;
  usage_at_poll_bytes_ = usage_locked();
  stream_freed_since_poll_bytes_ = 0;
}

Device::PollRecord Device::poll(bool fresh) {
  std::lock_guard<std::mutex> lock(mutex_);
  poll_locked(fresh);
  return PollRecord{polled_, last_poll_ns_, free_at_poll_bytes_, usage_at_poll_bytes_};
}

std::pair<std::size_t, std::size_t> Device::memory_info() {
  std::lock_guard<std::mutex> lock(mutex_);
  return query_memory_locked();
}

std::int64_t Device::deficit_locked(std::size_t size_bytes) {
  poll_locked();
  return aimdo::deficit_bytes(budget_inputs_locked(usage_locked()), size_bytes);
}

std::int64_t Device::deficit_bytes(std::size_t size_bytes) {
  if (size_bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError("size must be below 2^60 bytes, got " + std::to_string(size_bytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return deficit_locked(size_bytes);
}

std::size_t Device::reclaim(std::size_t size_bytes) {
  if (size_bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError("reclaim size must be below 2^60 bytes, got " +
                               std::to_string(size_bytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw InvalidStateError("device " + std::to_string(ordinal_) + " is closed");
  const std::int64_t deficit = deficit_locked(size_bytes);
  if (deficit <= 0) return 0;
  const std::size_t freed = evict_locked(static_cast<std::size_t>(deficit), nullptr);
  check_invariants_locked();
  return freed;
}

DeviceAddress Device::external_alloc(std::size_t size_bytes, StreamHandle stream) {
  if (size_bytes == 0 || size_bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError(
        "an external allocation must be positive and below 2^60 bytes, got " +
        std::to_string(size_bytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw InvalidStateError("device " + std::to_string(ordinal_) + " is closed");
  const std::size_t wanted = size_bytes + options_.allocator_headroom_bytes;
  const std::int64_t deficit = deficit_locked(wanted);
  if (deficit > 0) {
    const std::size_t freed = evict_locked(static_cast<std::size_t>(deficit), nullptr);
    if (freed < static_cast<std::size_t>(deficit)) {
      throw OutOfMemoryError("device " + std::to_string(ordinal_) +
                                 ": no room for an allocation of " + format_bytes(size_bytes) +
                                 ": eviction freed " + format_bytes(freed) + " of the " +
                                 detail::format_signed_bytes(deficit) + " needed (budget " +
                                 format_bytes(aimdo::budget_bytes(budget_inputs_locked(0))) +
                                 ", aimdo usage " + format_bytes(usage_locked()) + ")",
                             ordinal_, size_bytes, false);
    }
  }
  std::optional<ScopedDevice> guard;
  activate(guard);
  DeviceAddress ptr = 0;
  DriverStatus status =
      retrying([&] { return driver_->stream_alloc(ordinal_, size_bytes, stream, &ptr); });
  if (status.kind() == DriverErrorKind::out_of_memory) {
    stats_.add(&DeviceStats::oom_retries);
    evict_locked(wanted, nullptr);
    status = retrying([&] { return driver_->stream_alloc(ordinal_, size_bytes, stream, &ptr); });
  }
  if (!status.ok()) raise(status, "cuMemAllocAsync", size_bytes);
  external_.emplace(ptr, size_bytes);
  external_bytes_ += size_bytes;
  check_invariants_locked();
  return ptr;
}

bool Device::external_free(DeviceAddress ptr, StreamHandle stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = external_.find(ptr);
  if (found == external_.end()) return false;
  std::optional<ScopedDevice> guard;
  activate(guard);
  const DriverStatus status = retrying([&] { return driver_->stream_free(ordinal_, ptr, stream); });
  if (!status.ok()) raise(status, "cuMemFreeAsync", found->second);
  AIMDO_ASSERT(external_bytes_ >= found->second);
  external_bytes_ -= found->second;
  stream_freed_since_poll_bytes_ += found->second;
  external_.erase(found);
  return true;
}

void Device::check_invariants_locked() const {
#if defined(AIMDO_CHECK_INVARIANTS)
  std::size_t accounted = 0;
  for (const Vbar* vbar : priority_) {
    std::size_t mapped = 0;
    std::vector<std::uint64_t> pins(vbar->pages_.size(), 0);
    for (const auto& record : vbar->allocations_) {
      if (record.pins == 0) continue;
      const std::size_t first = record.offset_bytes / vbar->page_size_bytes_;
      const std::size_t last =
          (record.offset_bytes + record.size_bytes - 1) / vbar->page_size_bytes_;
      for (std::size_t page = first; page <= last; ++page) pins[page] += record.pins;
    }
    for (std::size_t page = 0; page < vbar->pages_.size(); ++page) {
      const Vbar::Page& state = vbar->pages_[page];
      mapped += state.handle != 0;
      AIMDO_ASSERT(state.pins == pins[page]);
      AIMDO_ASSERT(state.pins == 0 || state.handle != 0);
      AIMDO_ASSERT(page < vbar->watermark_pages_ || state.handle == 0 || state.pins != 0);
    }
    AIMDO_ASSERT(mapped == vbar->resident_pages_);
    accounted += mapped * vbar->page_size_bytes_;
  }
  for (const Leftover& item : leftovers_) accounted += item.handle != 0 ? item.bytes : 0;
  AIMDO_ASSERT(accounted == resident_bytes_);
  std::size_t external = 0;
  for (const auto& entry : external_) external += entry.second;
  AIMDO_ASSERT(external == external_bytes_);
#endif
}

bool Device::holds_external(DeviceAddress ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return external_.count(ptr) != 0;
}

std::size_t Device::external_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return external_bytes_;
}

std::size_t Device::limit_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::min(properties_.total_bytes,
                  options_.vram_limit_bytes.value_or(properties_.total_bytes));
}

std::size_t Device::budget_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  BudgetInputs in;
  in.total_bytes = properties_.total_bytes;
  in.limit_bytes = std::min(in.total_bytes, options_.vram_limit_bytes.value_or(in.total_bytes));
  in.headroom_bytes = options_.headroom_bytes;
  in.extra_headroom_bytes = options_.extra_headroom_bytes;
  return aimdo::budget_bytes(in);
}

std::size_t Device::usage_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return usage_locked();
}

std::size_t Device::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return resident_bytes_;
}

std::size_t Device::vbar_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return priority_.size();
}

std::vector<std::shared_ptr<Vbar>> Device::vbars() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::shared_ptr<Vbar>> out;
  out.reserve(priority_.size());
  for (Vbar* vbar : priority_) {
    // Empty for a VBAR whose destructor waits for this lock: it is going, not listed.
    if (auto alive = vbar->weak_from_this().lock()) out.push_back(std::move(alive));
  }
  return out;
}

void Device::reset_floors() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Vbar* vbar : priority_) vbar->floor_pages_ = 0;
}

bool Device::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

}  // namespace aimdo
