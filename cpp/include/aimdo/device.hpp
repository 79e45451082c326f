// Per-device state and policy: budget, priority list, eviction (design.md §3, §4).
//
// Thread-safety: one mutex per device (mutex()) guards the options, the priority list,
// every page table of this device's VBARs and the usage counters. No operation holds
// two devices' locks, and nothing here calls back into Python. Statistics are atomics,
// readable without the lock. Driver calls that depend on the current context run under
// a ScopedDevice for this device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "aimdo/budget.hpp"
#include "aimdo/driver.hpp"
#include "aimdo/options.hpp"
#include "aimdo/stats.hpp"

namespace aimdo {

class Vbar;

class Device : public std::enable_shared_from_this<Device> {
 public:
  // Use Manager::add_device. Validates `options` against the device's properties.
  Device(std::shared_ptr<Driver> driver, int ordinal, DeviceProperties properties,
         const DeviceOptions& options);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  int ordinal() const noexcept { return ordinal_; }
  const DeviceProperties& properties() const noexcept { return properties_; }
  const std::shared_ptr<Driver>& driver_ptr() const noexcept { return driver_; }
  std::mutex& mutex() const noexcept { return mutex_; }

  // InvalidArgumentError when `options` do not suit a device with these properties.
  static void validate(int ordinal, const DeviceProperties& properties,
                       const DeviceOptions& options);

  DeviceOptions options() const;
  // Replace the options (VBARs keep the page size they were created with).
  void set_options(const DeviceOptions& options);

  // A new VBAR at the top of the priority list; page_count = ceil(size / page size).
  std::shared_ptr<Vbar> create_vbar(std::size_t size_bytes);

  // Make room for an outside allocation of `size_bytes`: evict deficit_bytes(size) when
  // positive. Returns the bytes freed.
  std::size_t reclaim(std::size_t size_bytes);
  std::int64_t deficit_bytes(std::size_t size_bytes);

  // design.md §3.7: an allocation made for someone else (PyTorch's allocator): make room
  // for size + allocator headroom, allocate stream-ordered memory, on out-of-memory evict
  // that much more and retry once. OutOfMemoryError when the budget cannot be met or the
  // driver refuses twice. The bytes count as this device's usage until freed.
  DeviceAddress external_alloc(std::size_t size_bytes, StreamHandle stream);
  // Free `ptr` if it is one of this device's external allocations; false if it is not.
  bool external_free(DeviceAddress ptr, StreamHandle stream);
  std::size_t external_bytes() const;
  // Whether `ptr` is one of this device's external allocations (not freed yet).
  bool holds_external(DeviceAddress ptr) const;
  struct PollRecord {
    bool polled = false;
    std::int64_t time_ns = 0;     // on the driver's clock for this device
    std::size_t free_bytes = 0;   // what the driver reported free
    std::size_t usage_bytes = 0;  // what aimdo had in use then
  };
  // Poll now if the interval has passed (or never polled), or whatever the interval says
  // if `fresh` (memory others gave back, to be seen before the next poll is due), and
  // return the figures in use.
  PollRecord poll(bool fresh = false);
  // The driver's free and total memory of this device now (not the cached poll).
  std::pair<std::size_t, std::size_t> memory_info();
  std::size_t limit_bytes() const;
  std::size_t budget_bytes() const;
  std::size_t usage_bytes() const;     // resident VBAR bytes + external bytes
  std::size_t resident_bytes() const;  // resident VBAR bytes on this device
  void reset_floors();
  std::size_t vbar_count() const;
  // The live VBARs of this device, most important first.
  std::vector<std::shared_ptr<Vbar>> vbars() const;
  DeviceStatsSnapshot stats() const noexcept { return stats_.snapshot(); }

  // Close every VBAR of this device, free its external allocations and refuse new ones.
  // Throws the first driver failure after trying everything; calling it again retries
  // what is left (of VBARs alive or gone), and does nothing once all is given back.
  void close();
  bool closed() const;

 private:
  friend class Vbar;

  // Everything below: caller holds mutex_.
  BudgetInputs budget_inputs_locked(std::size_t usage);
  std::int64_t deficit_locked(std::size_t size_bytes);
  void poll_locked(bool fresh = false);
  bool poll_due_locked() const;
  // The driver's (free, total) now, under this device's context.
  std::pair<std::size_t, std::size_t> query_memory_locked();
  // Physical memory unmapped by the eviction a fault makes for its own missing pages,
  // kept (still counted as usage) to be mapped again by those pages. Lives for one fault;
  // what is left is released by release_recycled_locked.
  struct Recycled {
    std::size_t page_bytes = 0;
    std::vector<PhysicalHandle> handles;
  };
  // design.md §3.3, eviction for a deficit: walk every VBAR from lowest priority up (or only
  // `only`) until `bytes` are freed or nothing more may be lowered. Returns bytes freed.
  std::size_t evict_locked(std::size_t bytes, Vbar* only);
  // design.md §3.2, eviction for a fault of `vbar`'s pages up to `last_page`: only pages of
  // lower priority than those, i.e. of the VBARs below `vbar` (lowest first), then `vbar`'s
  // own pages above `last_page`. Returns bytes freed (unmapped pages kept in `recycle`
  // count: the fault maps them again at once).
  std::size_t evict_for_fault_locked(std::size_t bytes, Vbar& vbar, std::size_t last_page,
                                     Recycled* recycle);
  // What evict_for_fault_locked could free now: the resident, unpinned pages it may take.
  std::size_t evictable_for_fault_locked(const Vbar& vbar, std::size_t last_page) const;
  // Bytes of `vbar`'s resident, unpinned pages from max(its floor, from_page) up to its
  // watermark: what lowering its watermark that far would free.
  static std::size_t evictable_bytes_locked(const Vbar& vbar, std::size_t from_page);
  // Lower `vbar`'s watermark one page at a time from the top, never below its floor nor
  // below `lowest_page`, releasing each resident unpinned page passed, until `freed`
  // reaches `bytes`. A pinned page keeps its memory until its unpin (it is above the
  // watermark then). `synced` says whether the device was synchronized already.
  void lower_watermark_locked(Vbar& vbar, std::size_t lowest_page, std::size_t bytes,
                              std::size_t& freed, bool& synced, Recycled* recycle);
  // Map one page of `vbar` (recycled memory if there is any, else create; then map + set
  // access, unwound on failure). On an out-of-memory answer, evicts one page under the
  // fault's rule (pages of lower priority than `vbar`'s pages up to `last_page`) and
  // retries once; a second failure is thrown.
  void map_page_locked(Vbar& vbar, std::size_t page, std::size_t last_page, Recycled* recycle);
  // One attempt of map_page_locked: the failed status (and in `operation` the call that
  // failed), everything made so far given back; throws only when giving back fails too.
  DriverStatus make_page_locked(Vbar& vbar, std::size_t page, Recycled* recycle,
                                const char** operation);
  class PageInProgress;  // pages.cpp
  // Release one resident page (synchronizing the device first, once per `synced` flag),
  // or keep its memory in `recycle` when the sizes match and recycling is on.
  void release_page_locked(Vbar& vbar, std::size_t page, bool& synced, Recycled* recycle = nullptr);
  // Release what a fault did not map again. Throws the first failure after trying all.
  void release_recycled_locked(Recycled& recycle);
  void synchronize_locked();
  // Debug and sanitizer builds (AIMDO_CHECK_INVARIANTS): abort unless the accounting
  // holds: resident_bytes_ equals the resident pages of every VBAR (times their page size)
  // plus the leftovers' memory; each VBAR's resident_pages_ counts its mapped pages; no
  // unpinned resident page sits above a watermark; no page pin is missing its fault.
  // Other builds: nothing. Call where no fault is half-way (no recycled memory in hand).
  void check_invariants_locked() const;
  // design.md §3.9. The first call takes the VBAR out of service and hands every page and its
  // range to the leftovers; every call then releases what is left of it. Throws the first
  // failure after trying everything; a later call retries.
  void close_vbar_locked(Vbar& vbar);
  // Free every external allocation; one whose free fails stays listed for a later close.
  void free_externals_locked();
  // Take `vbar` out of service without any driver call (at process exit).
  void forget_vbar_locked(Vbar& vbar) noexcept;
  // Give back the leftovers of the VBAR whose range starts at `base` (0: of every VBAR;
  // `only_address`, when not 0: only what lies there):
  // synchronize once, unmap mapped pages, release physical memory, then free each range
  // none of whose pages is still mapped. What fails stays for the next call. Throws the
  // first failure after trying everything.
  void release_leftovers_locked(DeviceAddress base, DeviceAddress only_address = 0);
  struct Leftover;
  // Unmap (if mapped) and release one leftover page; throws the driver's refusal, the
  // item then still lists what is left of it.
  void give_back_page_locked(Leftover& item);
  std::size_t usage_locked() const { return resident_bytes_ + external_bytes_; }

  // Throws the error a failed driver status stands for; `more` is appended to its message.
  [[noreturn]] void raise(const DriverStatus& status, const char* operation,
                          std::size_t requested_bytes, const std::string& more = {}) const;
  // Runs a driver call, retrying transient failures up to options_.transient_retries.
  template <class Call>
  DriverStatus retrying(Call&& call);
  // Make this device's context current for the guard's lifetime, retrying transient
  // failures; throws the driver's error otherwise. `guard` is empty on entry.
  void activate(std::optional<ScopedDevice>& guard);
  // For release paths: `retrying`, and once more after any failure.
  template <class Call>
  DriverStatus retrying_twice(Call&& call);

  std::shared_ptr<Driver> driver_;
  const int ordinal_;
  const DeviceProperties properties_;
  mutable std::mutex mutex_;

  // Guarded by mutex_:
  DeviceOptions options_;
  std::list<Vbar*> priority_;  // front: most important
  std::size_t resident_bytes_ = 0;
  std::size_t external_bytes_ = 0;
  bool polled_ = false;
  std::int64_t last_poll_ns_ = 0;
  std::size_t free_at_poll_bytes_ = 0;
  std::size_t total_at_poll_bytes_ = 0;
  std::size_t usage_at_poll_bytes_ = 0;
  std::size_t stream_freed_since_poll_bytes_ = 0;
  std::map<DeviceAddress, std::size_t> external_;  // external allocations by address
  // What could not be given back to the driver yet (a close, or a release or unwind that
  // failed), owned here rather than by a VBAR (which may be gone by the next attempt);
  // still counted in resident_bytes_ until its physical memory is released. Retried by
  // Vbar::close, Device::close, an eviction for a deficit, and a new mapping at its address.
  struct Leftover {
    DeviceAddress vbar_base = 0;  // which VBAR it came from
    DeviceAddress address = 0;    // the page (or, for the range, its start)
    std::size_t bytes = 0;
    PhysicalHandle handle = 0;  // physical memory still to release (0: none)
    bool mapped = false;        // the page is still mapped at `address`
    bool range = false;         // the VBAR's reserved range, still to free
  };
  std::vector<Leftover> leftovers_;
  // Adds `item` to the leftovers, counting its physical memory (if any) as usage.
  void keep_leftover_locked(const Leftover& item);
  std::uint64_t next_serial_ = 1;
  bool closed_ = false;

  DeviceStats stats_;
};

}  // namespace aimdo
