// A VBAR: one model's reserved virtual address range on one device, divided into pages
// that are mapped (made resident) when an allocation under them is faulted and released,
// lowest priority first, when the device runs short. See design.md §1 and §3.
//
// Thread-safety: every method may be called from any thread. Page table, watermark,
// floor, allocation records and the closed flag are guarded by the owning Device's
// lock; immutable fields (device, base address, page size and count) need none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <vector>

#include "aimdo/device.hpp"
#include "aimdo/driver.hpp"

namespace aimdo {

class Device;
class Vbar;

// Per-page serial numbers of the pages under an allocation at the time of a fault.
// Two signatures of the same allocation compare equal exactly when no page under it
// was re-mapped in between (the data written there is intact).
struct Signature {
  std::vector<std::uint64_t> serials;
  bool operator==(const Signature& other) const { return serials == other.serials; }
  bool operator!=(const Signature& other) const { return !(*this == other); }
};

// A byte range inside a VBAR handed to one tensor. Holds its VBAR alive.
struct Allocation {
  std::shared_ptr<Vbar> vbar;
  std::uint32_t index = 0;       // position in the VBAR's allocation records
  std::size_t offset_bytes = 0;  // from the VBAR's base, 512-byte aligned
  std::size_t size_bytes = 0;
  DeviceAddress address() const noexcept;
};

struct PageResidency {
  bool resident = false;
  bool pinned = false;
};

class Vbar : public std::enable_shared_from_this<Vbar> {
 public:
  static constexpr std::size_t kAllocationAlignment = 512;

  // Use Device::create_vbar.
  Vbar(std::shared_ptr<Device> device, DeviceAddress base, std::size_t size_bytes,
       std::size_t page_size_bytes);
  ~Vbar();
  Vbar(const Vbar&) = delete;
  Vbar& operator=(const Vbar&) = delete;

  int device() const noexcept;
  // The backend this VBAR's memory belongs to.
  std::shared_ptr<Driver> driver() const noexcept;
  DeviceAddress base_address() const noexcept { return base_; }
  std::size_t size_bytes() const noexcept { return size_bytes_; }
  std::size_t page_size_bytes() const noexcept { return page_size_bytes_; }
  std::size_t page_count() const noexcept { return pages_.size(); }

  // Hand out the next `size_bytes` (> 0) of the range, 512-byte aligned, in call order.
  // InvalidArgumentError when it does not fit; InvalidStateError when closed.
  Allocation alloc(std::size_t size_bytes);

  // design.md §3.2: make every page under `allocation` resident and pin it, returning its
  // signature; std::nullopt means offloaded (the allocation reaches above the watermark).
  // Errors: InvalidStateError (closed), InvalidArgumentError (foreign allocation),
  // OutOfMemoryError (the budget cannot be met, or the driver refused twice),
  // DriverError.
  std::optional<Signature> fault(const Allocation& allocation);

  // design.md §3.5: drop the pin of one earlier successful fault of `allocation`.
  // InvalidStateError when it holds no pin.
  void unpin(const Allocation& allocation);

  // The same calls, but they never wait for the device's lock and never call the driver:
  // they return false (having changed nothing) when they would have to, and the caller
  // then uses fault/unpin. A resident hit, an offloaded answer and an unpin that releases
  // nothing complete here. The Python bindings try these with the GIL held, which costs
  // less than releasing and re-taking the GIL around a call of a few hundred nanoseconds.
  bool try_fault(const Allocation& allocation, std::optional<Signature>* out);
  bool try_unpin(const Allocation& allocation);

  // design.md §4.4: a peer device reads this VBAR's resident pages.
  // share_with grants `peer` access to every page this VBAR maps from now on, and to the
  // pages resident now. InvalidArgumentError for the VBAR's own device, a negative one, or
  // one the driver gives no access (peer_link); DriverError when the driver refuses a
  // page's access: the peer is then not a reader, though pages granted before the refusal
  // keep their access until unmapped. InvalidStateError when closed. Sharing with a
  // reader again does nothing.
  void share_with(int peer);
  std::vector<int> readers() const;
  // Pin the pages under `allocation` when every one is resident, returning its signature;
  // std::nullopt, with nothing pinned, otherwise. Never maps, evicts or calls the driver,
  // and takes only this VBAR's device's lock: a peer pins the pages it copies from, and
  // unpin() lets them go once its copy is done. InvalidStateError when closed.
  std::optional<Signature> pin_resident(const Allocation& allocation);

  // design.md §3.6.
  void prioritize();
  void deprioritize();
  std::size_t watermark_bytes() const;
  // Pages starting at or above `bytes` (rounded up to a page) become offloaded; unpinned
  // resident ones are released. May raise the watermark too. 0 <= bytes <= page_count*page_size.
  void set_watermark(std::size_t bytes);
  std::size_t floor_bytes() const;
  // Eviction never lowers the watermark below the floor (rounded up to a page). Raises
  // the watermark to the floor if it is lower.
  void set_floor(std::size_t bytes);
  // Evict from this VBAR alone, top down, never below the floor; returns bytes freed.
  std::size_t free_memory(std::size_t bytes);
  std::size_t loaded_bytes() const;  // resident pages * page size
  std::vector<PageResidency> residency() const;
  std::size_t allocated_bytes() const;  // end of the last allocation

  // design.md §3.9: release every page (pinned ones too) and the address range. Throws the
  // first driver failure after trying everything (the VBAR is closed all the same); calling
  // it again retries what is left, and does nothing once all is given back.
  void close();
  bool closed() const;

 private:
  friend class Device;

  struct Page {
    PhysicalHandle handle = 0;  // 0: not resident
    std::uint32_t pins = 0;
    std::uint64_t serial = 0;  // of the mapping that made it resident
  };
  struct AllocationRecord {
    std::size_t offset_bytes;
    std::size_t size_bytes;
    std::uint32_t pins;
  };

  void check_open_locked() const;
  // Caller holds the device's lock. With may_block false, returns false as soon as the
  // driver would be needed; otherwise always true.
  bool fault_locked(const Allocation& allocation, bool may_block, std::optional<Signature>* out);
  bool unpin_locked(const Allocation& allocation, bool may_block);
  // Pin pages [first, last] (all resident) for one more user of `record`: their signature.
  Signature pin_pages_locked(AllocationRecord& record, std::size_t first, std::size_t last);
  // The missing pages of a fault of pages [first, last]: when `need` > 0, evict that much
  // of lower priority (recycling what it unmaps), then map them. False, having evicted
  // nothing of other VBARs, when the pages of lower priority and the free budget cannot
  // hold them all (design.md §3.2): the caller then offloads the allocation.
  bool map_missing_locked(std::size_t first, std::size_t last, std::int64_t need,
                          Device::Recycled& recycled);
  // The allocation at `offset_bytes` (pages [first, last]) cannot be made resident: lower
  // the watermark to its start, releasing this VBAR's unpinned pages from there up, so no
  // page of it stays mapped for nothing. A first page shared with an earlier allocation
  // and resident is kept (it serves that allocation, which is more important). Never
  // below the floor: OutOfMemoryError when the floor covers the whole allocation.
  void offload_from_locked(std::size_t offset_bytes, std::size_t first, std::size_t last,
                           std::size_t missing_bytes, std::int64_t need);
  void check_owned(const Allocation& allocation) const;
  // InvalidArgumentError when `bytes` is beyond the VBAR's pages.
  void check_within(std::size_t bytes, const char* what) const;

  std::shared_ptr<Device> device_;
  const DeviceAddress base_;
  const std::size_t size_bytes_;
  const std::size_t page_size_bytes_;

  // Guarded by device_->mutex():
  std::vector<Page> pages_;
  std::vector<AllocationRecord> allocations_;
  std::size_t next_offset_bytes_ = 0;
  std::size_t watermark_pages_;
  std::size_t floor_pages_ = 0;
  std::size_t resident_pages_ = 0;
  std::vector<int> readers_;  // peers granted access to every page mapped (share_with)
  bool closed_ = false;
  std::list<Vbar*>::iterator priority_position_;  // in the device's priority list
};

}  // namespace aimdo
