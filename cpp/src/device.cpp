#include "aimdo/device.hpp"

#include <algorithm>
#include <exception>
#include <optional>
#include <utility>

#include "aimdo/errors.hpp"
#include "aimdo/process.hpp"
#include "aimdo/vbar.hpp"
#include "driver_errors.hpp"
#include "check.hpp"
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
    throw InvalidArgumentError(where + "page_size must be a positive multiple of the allocation "
                               "granularity (" + format_bytes(granularity) + ") no larger than "
                               "the device's memory (" + format_bytes(properties.total_bytes) +
                               "), got " + format_bytes(options.page_size_bytes));
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
    throw InvalidArgumentError(where + "poll_interval must be in [0, 2^62 ns] (about 146 "
                               "years), got " + std::to_string(options.poll_interval_ns) + " ns");
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

template <class Call>
DriverStatus Device::retrying(Call&& call) {
  DriverStatus status = call();
  for (int attempt = 0;
       status.kind() == DriverErrorKind::transient && attempt < options_.transient_retries;
       ++attempt) {
    stats_.add(&DeviceStats::transient_retries);
    status = call();
  }
  return status;
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

template <class Call>
DriverStatus Device::retrying_twice(Call&& call) {
  DriverStatus status = retrying(call);
  if (!status.ok()) status = retrying(call);
  return status;
}

void Device::raise(const DriverStatus& status, const char* operation,
                   std::size_t requested_bytes) const {
  // Called with mutex_ held: the figures are consistent.
  const std::size_t usage = usage_locked();
  std::string detail = "aimdo uses " + format_bytes(usage) + " on this device";
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

void Device::poll_locked() {
  if (!poll_due_locked()) return;
  const std::int64_t now = driver_->now_ns(ordinal_);
  const std::size_t free_bytes = query_memory_locked().first;
  stats_.add(&DeviceStats::polls);
  polled_ = true;
  last_poll_ns_ = now;
  free_at_poll_bytes_ = free_bytes;
  usage_at_poll_bytes_ = usage_locked();
  stream_freed_since_poll_bytes_ = 0;
}

Device::PollRecord Device::poll() {
  std::lock_guard<std::mutex> lock(mutex_);
  poll_locked();
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
  return evict_locked(static_cast<std::size_t>(deficit), nullptr);
}

DeviceAddress Device::external_alloc(std::size_t size_bytes, StreamHandle stream) {
  if (size_bytes == 0 || size_bytes > detail::kMaxSizeBytes) {
    throw InvalidArgumentError("an external allocation must be positive and below 2^60 bytes, got " +
                               std::to_string(size_bytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw InvalidStateError("device " + std::to_string(ordinal_) + " is closed");
  const std::size_t wanted = size_bytes + options_.allocator_headroom_bytes;
  const std::int64_t deficit = deficit_locked(wanted);
  if (deficit > 0) {
    const std::size_t freed = evict_locked(static_cast<std::size_t>(deficit), nullptr);
    if (freed < static_cast<std::size_t>(deficit)) {
      throw OutOfMemoryError(
          "device " + std::to_string(ordinal_) + ": no room for an allocation of " +
              format_bytes(size_bytes) + ": eviction freed " + format_bytes(freed) + " of the " +
              detail::format_signed_bytes(deficit) + " needed (budget " +
              format_bytes(aimdo::budget_bytes(budget_inputs_locked(0))) + ", aimdo usage " +
              format_bytes(usage_locked()) + ")",
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
  external_bytes_ -= found->second;
  stream_freed_since_poll_bytes_ += found->second;
  external_.erase(found);
  return true;
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

void Device::reset_floors() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Vbar* vbar : priority_) vbar->floor_pages_ = 0;
}

void Device::lower_watermark_locked(Vbar& vbar, std::size_t lowest_page, std::size_t bytes,
                                    std::size_t& freed, bool& synced, Recycled* recycle) {
  const std::size_t stop = std::max(vbar.floor_pages_, lowest_page);
  while (freed < bytes && vbar.watermark_pages_ > stop) {
    const std::size_t page = --vbar.watermark_pages_;
    const Vbar::Page& state = vbar.pages_[page];
    // A pinned page stays until its unpin, which releases it (it is above the watermark).
    if (state.handle == 0 || state.pins != 0) continue;
    try {
      release_page_locked(vbar, page, synced, recycle);
    } catch (...) {
      // Still resident after a failed release: back below the watermark, where a later
      // eviction finds it again (an unpinned page above it would be stranded).
      if (state.handle != 0) ++vbar.watermark_pages_;
      throw;
    }
    freed += vbar.page_size_bytes_;
  }
}

std::size_t Device::evict_locked(std::size_t bytes, Vbar* only) {
  if (bytes == 0) return 0;
  std::size_t freed = 0;
  bool synced = false;
  if (only != nullptr) {
    lower_watermark_locked(*only, 0, bytes, freed, synced, nullptr);
  } else {
    for (auto it = priority_.rbegin(); it != priority_.rend() && freed < bytes; ++it) {
      lower_watermark_locked(**it, 0, bytes, freed, synced, nullptr);
    }
  }
  if (freed != 0) {
    stats_.add(&DeviceStats::evictions);
    stats_.add(&DeviceStats::evicted_bytes, freed);
  }
  return freed;
}

std::size_t Device::evictable_bytes_locked(const Vbar& vbar, std::size_t from_page) {
  std::size_t count = 0;
  for (std::size_t page = std::max(vbar.floor_pages_, from_page); page < vbar.watermark_pages_;
       ++page) {
    count += vbar.pages_[page].handle != 0 && vbar.pages_[page].pins == 0;
  }
  return count * vbar.page_size_bytes_;
}

std::size_t Device::evictable_for_fault_locked(const Vbar& vbar, std::size_t last_page) const {
  std::size_t bytes = 0;
  for (auto it = priority_.rbegin(); it != priority_.rend() && *it != &vbar; ++it) {
    bytes += evictable_bytes_locked(**it, 0);
  }
  return bytes + evictable_bytes_locked(vbar, last_page + 1);
}

std::size_t Device::evict_for_fault_locked(std::size_t bytes, Vbar& vbar, std::size_t last_page,
                                           Recycled* recycle) {
  if (bytes == 0) return 0;
  std::size_t freed = 0;
  bool synced = false;
  // The VBARs below `vbar` hold lower-priority pages than all of `vbar`'s; `vbar`'s own
  // pages above the allocation come last. A VBAR with nothing to give keeps its watermark:
  // lowering it would offload its pages and free nothing.
  const auto take = [&](Vbar& from, std::size_t lowest_page) {
    if (freed < bytes && evictable_bytes_locked(from, lowest_page) != 0) {
      lower_watermark_locked(from, lowest_page, bytes, freed, synced, recycle);
    }
  };
  for (auto it = priority_.rbegin(); it != priority_.rend() && *it != &vbar; ++it) take(**it, 0);
  take(vbar, last_page + 1);
  if (freed != 0) {
    stats_.add(&DeviceStats::evictions);
    stats_.add(&DeviceStats::evicted_bytes, freed);
  }
  return freed;
}

void Device::synchronize_locked() {
  std::optional<ScopedDevice> guard;
  activate(guard);
  const DriverStatus status = retrying([&] { return driver_->synchronize(ordinal_); });
  if (!status.ok()) raise(status, "cuCtxSynchronize", 0);
  stats_.add(&DeviceStats::synchronizes);
}

void Device::release_page_locked(Vbar& vbar, std::size_t page, bool& synced, Recycled* recycle) {
  // Kernels queued before this point may still read the page.
  if (!synced) {
    synchronize_locked();
    synced = true;
  }
  std::optional<ScopedDevice> guard;
  activate(guard);
  Vbar::Page& state = vbar.pages_[page];
  const std::size_t page_size = vbar.page_size_bytes_;
  const DeviceAddress va = vbar.base_ + page * page_size;
  // Releasing is retried once even after a hard error: a page lost to the driver costs
  // more than one more call. A failed unmap leaves the page resident and accounted.
  DriverStatus status = retrying_twice([&] { return driver_->unmap(va, page_size); });
  if (!status.ok()) raise(status, "cuMemUnmap", page_size);
  const PhysicalHandle handle = state.handle;
  state.handle = 0;
  --vbar.resident_pages_;
  stats_.add(&DeviceStats::pages_released);
  if (recycle != nullptr && options_.recycle_pages && recycle->page_bytes == page_size) {
    recycle->handles.push_back(handle);  // still usage: the fault maps it again at once
    return;
  }
  resident_bytes_ -= page_size;
  status = retrying_twice([&] { return driver_->release_physical(handle); });
  if (!status.ok()) raise(status, "cuMemRelease", page_size);
}

void Device::release_recycled_locked(Recycled& recycle) {
  std::exception_ptr first_failure;
  while (!recycle.handles.empty()) {
    const PhysicalHandle handle = recycle.handles.back();
    recycle.handles.pop_back();
    resident_bytes_ -= recycle.page_bytes;
    const DriverStatus status = retrying_twice([&] { return driver_->release_physical(handle); });
    if (!status.ok() && !first_failure) {
      try {
        raise(status, "cuMemRelease", recycle.page_bytes);
      } catch (...) {
        first_failure = std::current_exception();
      }
    }
  }
  if (first_failure) std::rethrow_exception(first_failure);
}

void Device::map_page_locked(Vbar& vbar, std::size_t page, std::size_t last_page,
                             Recycled* recycle) {
  const std::size_t page_size = vbar.page_size_bytes_;
  const DeviceAddress va = vbar.base_ + page * page_size;
  std::optional<ScopedDevice> guard;
  activate(guard);
  for (int attempt = 0;; ++attempt) {
    PhysicalHandle handle = 0;
    const char* operation = "cuMemCreate";
    // Recycled memory is already counted in resident_bytes_ (see release_page_locked).
    const bool recycled = recycle != nullptr && !recycle->handles.empty();
    DriverStatus status = DriverStatus::success();
    if (recycled) {
      handle = recycle->handles.back();
      recycle->handles.pop_back();
      resident_bytes_ -= page_size;
      stats_.add(&DeviceStats::pages_recycled);
    } else {
      status = retrying([&] { return driver_->create_physical(ordinal_, page_size, &handle); });
    }
    if (status.ok()) {
      operation = "cuMemMap";
      status = retrying([&] { return driver_->map(va, page_size, handle); });
      if (status.ok()) {
        operation = "cuMemSetAccess";
        status = retrying([&] { return driver_->set_access(va, page_size, ordinal_); });
        if (!status.ok()) driver_->unmap(va, page_size);
      }
      if (!status.ok()) driver_->release_physical(handle);
    }
    if (status.ok()) {
      Vbar::Page& state = vbar.pages_[page];
      state.handle = handle;
      state.serial = next_serial_++;
      ++vbar.resident_pages_;
      resident_bytes_ += page_size;
      stats_.add(&DeviceStats::pages_mapped);
      return;
    }
    if (status.kind() == DriverErrorKind::out_of_memory && attempt == 0) {
      // The driver knows better than our figures: make one more page of room, under the
      // fault's rule (nothing more important than the fault's own pages), and retry once.
      stats_.add(&DeviceStats::oom_retries);
      evict_for_fault_locked(page_size, vbar, last_page, nullptr);
      continue;
    }
    raise(status, operation, page_size);
  }
}

void Device::close_vbar_locked(Vbar& vbar) {
  if (!vbar.closed_) {
    // Out of service first: from here on, nothing but this release path touches its pages.
    vbar.closed_ = true;
    priority_.erase(vbar.priority_position_);
    for (std::size_t page = 0; page < vbar.pages_.size(); ++page) {
      Vbar::Page& state = vbar.pages_[page];
      state.pins = 0;
      if (state.handle == 0) continue;
      leftovers_.push_back(Leftover{vbar.base_, vbar.base_ + page * vbar.page_size_bytes_,
                                    vbar.page_size_bytes_, state.handle, true, false});
      state.handle = 0;
    }
    vbar.resident_pages_ = 0;
    for (auto& record : vbar.allocations_) record.pins = 0;
    vbar.watermark_pages_ = 0;
    leftovers_.push_back(Leftover{vbar.base_, vbar.base_,
                                  vbar.pages_.size() * vbar.page_size_bytes_, 0, false, true});
  }
  release_leftovers_locked(vbar.base_);
}

void Device::release_leftovers_locked(DeviceAddress base) {
  const auto ours = [base](const Leftover& item) { return base == 0 || item.vbar_base == base; };
  std::exception_ptr first_failure;
  const auto report = [&](const DriverStatus& status, const char* operation, std::size_t bytes) {
    if (first_failure) return;
    try {
      raise(status, operation, bytes);
    } catch (...) {
      first_failure = std::current_exception();
    }
  };
  std::optional<ScopedDevice> guard;
  try {
    activate(guard);
  } catch (...) {
    // cuMemUnmap, cuMemRelease and cuMemAddressFree do not need the context: try them.
    first_failure = std::current_exception();
  }
  // Kernels queued before the close may still read the pages: one synchronize before the
  // first unmap. A failed one is reported, but the releases still run: a close must not
  // leave mappings behind.
  const bool any_mapped = std::any_of(leftovers_.begin(), leftovers_.end(),
                                      [&](const Leftover& item) { return ours(item) && item.mapped; });
  if (any_mapped) {
    const DriverStatus status = retrying([&] { return driver_->synchronize(ordinal_); });
    if (status.ok()) {
      stats_.add(&DeviceStats::synchronizes);
    } else {
      report(status, "cuCtxSynchronize", 0);
    }
  }
  for (Leftover& item : leftovers_) {
    if (!ours(item) || item.range) continue;
    if (item.mapped) {
      // Releasing is retried even after a hard error: a page left mapped is lost for the
      // life of the process.
      const DriverStatus status =
          retrying_twice([&] { return driver_->unmap(item.address, item.bytes); });
      if (!status.ok()) {
        report(status, "cuMemUnmap", item.bytes);
        continue;
      }
      item.mapped = false;
      stats_.add(&DeviceStats::pages_released);
    }
    const DriverStatus status = retrying_twice([&] { return driver_->release_physical(item.handle); });
    if (!status.ok()) {
      report(status, "cuMemRelease", item.bytes);
      continue;
    }
    item.handle = 0;
    AIMDO_ASSERT(resident_bytes_ >= item.bytes);
    resident_bytes_ -= item.bytes;
  }
  const auto done = [](const Leftover& item) { return !item.range && item.handle == 0 && !item.mapped; };
  leftovers_.erase(std::remove_if(leftovers_.begin(), leftovers_.end(), done), leftovers_.end());
  for (Leftover& item : leftovers_) {
    if (!ours(item) || !item.range) continue;
    // A range is freed only once none of its pages is mapped (the driver refuses otherwise).
    const bool pages_mapped = std::any_of(leftovers_.begin(), leftovers_.end(), [&](const Leftover& page) {
      return !page.range && page.mapped && page.vbar_base == item.vbar_base;
    });
    if (pages_mapped) continue;
    const DriverStatus status =
        retrying_twice([&] { return driver_->free_address_range(item.address, item.bytes); });
    if (!status.ok()) {
      report(status, "cuMemAddressFree", item.bytes);
      continue;
    }
    item.range = false;  // nothing left of it: `done` now
  }
  leftovers_.erase(std::remove_if(leftovers_.begin(), leftovers_.end(), done), leftovers_.end());
  if (first_failure) std::rethrow_exception(first_failure);
}

void Device::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  closed_ = true;
  if (process_exiting()) return;  // the driver may be gone; the OS reclaims everything
  std::exception_ptr first_failure;
  const auto keep_first = [&] {
    if (!first_failure) first_failure = std::current_exception();
  };
  while (!priority_.empty()) {
    try {
      close_vbar_locked(*priority_.front());
    } catch (...) {
      keep_first();
    }
  }
  // What earlier closes left, of VBARs alive or gone.
  if (!leftovers_.empty()) {
    try {
      release_leftovers_locked(0);
    } catch (...) {
      keep_first();
    }
  }
  if (!external_.empty()) {
    std::optional<ScopedDevice> guard;
    for (int attempt = 0; attempt < 2 && !guard; ++attempt) {
      try {
        activate(guard);
      } catch (...) {
        if (attempt == 1) keep_first();
      }
    }
    // A free that fails stays listed (and counted), so a later close retries it.
    for (auto it = external_.begin(); it != external_.end();) {
      const DeviceAddress ptr = it->first;
      const std::size_t size = it->second;
      const DriverStatus status =
          retrying_twice([&] { return driver_->stream_free(ordinal_, ptr, 0); });
      if (!status.ok()) {
        try {
          raise(status, "cuMemFreeAsync", size);
        } catch (...) {
          keep_first();
        }
        ++it;
        continue;
      }
      external_bytes_ -= size;
      it = external_.erase(it);
    }
  }
  if (first_failure) std::rethrow_exception(first_failure);
}

bool Device::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

}  // namespace aimdo
