#include "host_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <system_error>
#include <utility>

#include "aimdo/errors.hpp"

namespace aimdo::sim {
namespace {

void* address(std::uintptr_t va) {
  return reinterpret_cast<void*>(va);
}

bool is_power_of_two(std::size_t value) {
  return value != 0 && (value & (value - 1)) == 0;
}

}  // namespace

// A physical allocation: a memfd of size_bytes. Shared by the allocation table (until
// release) and by mappings whose access is not set yet (they still have to mmap it);
// the descriptor closes with the last of them. An mmap made from it keeps the pages
// alive on its own.
struct HostMemory::Allocation {
  Allocation(int fd_in, std::size_t size_bytes_in) noexcept
      : fd(fd_in), size_bytes(size_bytes_in) {}
  ~Allocation() { ::close(fd); }
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  const int fd;
  const std::size_t size_bytes;
};

struct HostMemory::Reservation {
  struct Mapping {
    std::size_t size_bytes;
    // Until set_access() the allocation is not mmapped yet and is held here; null once
    // the range is backed by it.
    std::shared_ptr<Allocation> pending;
  };

  Reservation(std::uintptr_t base_in, std::size_t size_bytes_in) noexcept
      : base(base_in), size_bytes(size_bytes_in) {}

  // The check every call on the reservation makes once it holds the mutex.
  void require_usable(const char* operation) const {
    if (broken) {
      throw InvalidStateError(std::string("HostMemory::") + operation + " in " +
                              range_text(base, size_bytes) +
                              ": an earlier failed mmap left a hole in this reservation; "
                              "it can only be freed");
    }
  }

  const std::uintptr_t base;  // immutable: read without the mutex
  const std::size_t size_bytes;

  std::mutex mutex;     // guards everything below and serialises calls on this range
  bool broken = false;  // a failed MAP_FIXED left a hole we could not fill: never touch it
  std::map<std::uintptr_t, Mapping> mappings;   // by address; disjoint
  std::map<std::uintptr_t, std::size_t> traps;  // address -> size; disjoint
};

HostMemory::HostMemory()
    : page_size_bytes_([] {
        const long page = ::sysconf(_SC_PAGESIZE);
        if (page <= 0) throw_system_error(errno, "HostMemory: reading the host page size");
        return static_cast<std::size_t>(page);
      }()) {}

HostMemory::~HostMemory() {
  // Safe in a forked child too (see "fork()" in the header): munmap and close act on this
  // process's address space and descriptor table only; nothing here resizes or writes a
  // file the parent shares.
  for (auto& [base, reservation] : reservations_) {
    // A broken reservation may have someone else's mapping in its hole: leave it be.
    if (!reservation->broken) ::munmap(address(base), reservation->size_bytes);
  }
  reservations_.clear();  // closes the memfds of mappings still waiting for access
  allocations_.clear();   // closes every unreleased memfd
}

void HostMemory::check_range(std::uintptr_t va, std::size_t size_bytes,
                             const char* operation) const {
  if (size_bytes == 0 || va % page_size_bytes_ != 0 || size_bytes % page_size_bytes_ != 0 ||
      va > std::numeric_limits<std::uintptr_t>::max() - size_bytes) {
    throw InvalidArgumentError(std::string("HostMemory::") + operation + " of " +
                               range_text(va, size_bytes) +
                               ": the address and size must be non-zero multiples of the " +
                               std::to_string(page_size_bytes_) + "-byte host page");
  }
}

std::shared_ptr<HostMemory::Reservation> HostMemory::reservation_holding(
    std::uintptr_t va, std::size_t size_bytes, const char* operation) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = reservations_.upper_bound(va);
  if (it != reservations_.begin()) {
    const std::shared_ptr<Reservation>& reservation = std::prev(it)->second;
    if (va - reservation->base < reservation->size_bytes &&
        size_bytes <= reservation->base + reservation->size_bytes - va) {
      return reservation;
    }
  }
  throw InvalidArgumentError(std::string("HostMemory::") + operation + " of " +
                             range_text(va, size_bytes) + ": not inside one reservation");
}

std::uintptr_t HostMemory::reserve(std::size_t size_bytes, std::size_t alignment_bytes) {
  const std::size_t alignment =
      std::max(alignment_bytes == 0 ? kReservationAlignmentBytes : alignment_bytes,
               kReservationAlignmentBytes);
  if (size_bytes == 0 || size_bytes % page_size_bytes_ != 0 ||
      (alignment_bytes != 0 &&
       (!is_power_of_two(alignment_bytes) || alignment_bytes % page_size_bytes_ != 0)) ||
      size_bytes > std::numeric_limits<std::size_t>::max() - alignment) {
    throw InvalidArgumentError("HostMemory::reserve of " + std::to_string(size_bytes) +
                               " bytes aligned to " + std::to_string(alignment_bytes) +
                               ": the size must be a non-zero multiple of the " +
                               std::to_string(page_size_bytes_) +
                               "-byte host page and the alignment 0 or a power of two "
                               "multiple of it");
  }
  // Over-reserve by the largest shift alignment can need, then trim both ends.
  const std::size_t padded_bytes = size_bytes + alignment - page_size_bytes_;
  void* raw =
      ::mmap(nullptr, padded_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) {
    throw_system_error(errno, "HostMemory::reserve of " + std::to_string(size_bytes) +
                                  " bytes: mmap of " + std::to_string(padded_bytes) +
                                  " bytes of address space failed");
  }
  const std::uintptr_t raw_base = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t base = (raw_base + alignment - 1) & ~std::uintptr_t{alignment - 1};
  const std::uintptr_t raw_end = raw_base + padded_bytes;
  const std::uintptr_t end = base + size_bytes;
  if ((base > raw_base && ::munmap(raw, base - raw_base) != 0) ||
      (raw_end > end && ::munmap(address(end), raw_end - end) != 0)) {
    const int error = errno;
    ::munmap(raw, padded_bytes);
    throw_system_error(error, "HostMemory::reserve of " + std::to_string(size_bytes) +
                                  " bytes: trimming the reservation to its alignment failed");
  }
  try {
    auto reservation = std::make_shared<Reservation>(base, size_bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    reservations_.emplace(base, std::move(reservation));
  } catch (...) {
    ::munmap(address(base), size_bytes);
    throw;
  }
  return base;
}

std::uint64_t HostMemory::create(std::size_t size_bytes) {
  const std::string what = "HostMemory::create of " + std::to_string(size_bytes) + " bytes";
  if (size_bytes == 0 || size_bytes % page_size_bytes_ != 0 ||
      size_bytes > static_cast<std::size_t>(std::numeric_limits<off_t>::max())) {
    throw InvalidArgumentError(what + ": the size must be a non-zero multiple of the " +
                               std::to_string(page_size_bytes_) + "-byte host page");
  }
  OwnedFd fd(::memfd_create("aimdo-sim-physical", MFD_CLOEXEC));
  if (fd.get() < 0) throw_system_error(errno, what + ": memfd_create failed");
  if (::ftruncate(fd.get(), static_cast<off_t>(size_bytes)) != 0) {
    throw_system_error(errno, what + ": ftruncate failed");
  }
  fill_file(fd.get(), 0, size_bytes, kFreshByte, what);
  auto allocation = std::make_shared<Allocation>(fd.get(), size_bytes);
  fd.release();  // the Allocation owns it now
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t id = next_id_++;
  allocations_.emplace(id, std::move(allocation));
  return id;
}

void HostMemory::release(std::uint64_t id) {
  std::shared_ptr<Allocation> released;  // closed after the table lock is let go
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocations_.find(id);
  if (it == allocations_.end()) {
    throw InvalidArgumentError("HostMemory::release of allocation " + std::to_string(id) +
                               ": unknown or already released");
  }
  released = std::move(it->second);
  allocations_.erase(it);
}

void HostMemory::map(std::uintptr_t va, std::size_t size_bytes, std::uint64_t id) {
  check_range(va, size_bytes, "map");
  std::shared_ptr<Allocation> allocation;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = allocations_.find(id);
    if (it != allocations_.end()) allocation = it->second;
  }
  const auto refuse = [&](const std::string& why) {
    throw InvalidArgumentError("HostMemory::map of allocation " + std::to_string(id) + " at " +
                               range_text(va, size_bytes) + ": " + why);
  };
  if (allocation == nullptr) refuse("unknown or released allocation");
  if (size_bytes > allocation->size_bytes) {
    refuse("larger than the allocation's " + std::to_string(allocation->size_bytes) + " bytes");
  }
  const std::shared_ptr<Reservation> reservation = reservation_holding(va, size_bytes, "map");
  std::lock_guard<std::mutex> lock(reservation->mutex);
  reservation->require_usable("map");
  auto next = reservation->mappings.lower_bound(va);
  if ((next != reservation->mappings.end() && next->first - va < size_bytes) ||
      (next != reservation->mappings.begin() &&
       va - std::prev(next)->first < std::prev(next)->second.size_bytes)) {
    refuse("overlaps a mapping");
  }
  reservation->mappings.emplace(va, Reservation::Mapping{size_bytes, std::move(allocation)});
  drop_traps(*reservation, va, va + size_bytes);
}

void HostMemory::set_access(std::uintptr_t va, std::size_t size_bytes) {
  check_range(va, size_bytes, "set_access");
  const std::shared_ptr<Reservation> reservation =
      reservation_holding(va, size_bytes, "set_access");
  std::lock_guard<std::mutex> lock(reservation->mutex);
  reservation->require_usable("set_access");
  // Every byte must be mapped before anything changes.
  std::vector<std::pair<std::uintptr_t, Reservation::Mapping*>> touched;
  const std::uintptr_t end = va + size_bytes;
  auto mapping = reservation->mappings.upper_bound(va);
  std::uintptr_t cursor = va;
  if (mapping != reservation->mappings.begin()) {
    --mapping;
    while (cursor < end && mapping != reservation->mappings.end() && mapping->first <= cursor &&
           cursor - mapping->first < mapping->second.size_bytes) {
      touched.emplace_back(mapping->first, &mapping->second);
      cursor = mapping->first + mapping->second.size_bytes;
      ++mapping;
    }
  }
  if (cursor < end) {
    throw InvalidArgumentError("HostMemory::set_access of " + range_text(va, size_bytes) + ": " +
                               address_text(cursor) + " is not mapped");
  }
  for (auto& [start, touched_mapping] : touched) {
    if (touched_mapping->pending == nullptr) continue;  // accessible already
    const std::size_t bytes = touched_mapping->size_bytes;
    // One MAP_FIXED replaces the trap (or PROT_NONE) with the data: no moment in which a
    // stale reader of this range could fault.
    if (::mmap(address(start), bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
               touched_mapping->pending->fd, 0) == MAP_FAILED) {
      const int error = errno;
      restore_reserved(*reservation, start, bytes);
      throw_system_error(error, "HostMemory::set_access of " + range_text(va, size_bytes) +
                                    ": mmap of the mapping at " + range_text(start, bytes) +
                                    " failed");
    }
    touched_mapping->pending.reset();  // the mmap keeps the pages; a release may close
  }
}

void HostMemory::unmap(std::uintptr_t va, std::size_t size_bytes) {
  check_range(va, size_bytes, "unmap");
  const std::shared_ptr<Reservation> reservation = reservation_holding(va, size_bytes, "unmap");
  std::lock_guard<std::mutex> lock(reservation->mutex);
  reservation->require_usable("unmap");
  auto mapping = reservation->mappings.find(va);
  if (mapping == reservation->mappings.end() || mapping->second.size_bytes != size_bytes) {
    throw InvalidArgumentError("HostMemory::unmap of " + range_text(va, size_bytes) + ": " +
                               (mapping == reservation->mappings.end()
                                    ? std::string("no mapping starts there")
                                    : "the mapping there spans " +
                                          std::to_string(mapping->second.size_bytes) +
                                          " bytes; unmap it whole"));
  }
  const std::string what = "HostMemory::unmap of " + std::to_string(size_bytes) + " bytes";
  const int trap_fd = trap_file_.grown_to(size_bytes, what);  // may throw: nothing changed yet
  // A private (copy-on-write) mapping of the trap file: reads kTrapByte, takes stale
  // writes without faulting, and commits a page only when one is written. MAP_NORESERVE
  // keeps the untouched copy-on-write pages out of the commit charge.
  if (::mmap(address(va), size_bytes, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, trap_fd, 0) == MAP_FAILED) {
    const int error = errno;
    restore_reserved(*reservation, va, size_bytes);
    reservation->mappings.erase(mapping);
    throw_system_error(error, "HostMemory::unmap of " + range_text(va, size_bytes) +
                                  ": mmap of the trap over it failed");
  }
  reservation->mappings.erase(mapping);
  reservation->traps.emplace(va, size_bytes);
}

void HostMemory::drop_traps(Reservation& reservation, std::uintptr_t begin, std::uintptr_t end) {
  auto trap = reservation.traps.upper_bound(begin);
  if (trap != reservation.traps.begin() &&
      std::prev(trap)->first + std::prev(trap)->second > begin) {
    --trap;
  }
  while (trap != reservation.traps.end() && trap->first < end) {
    const std::uintptr_t trap_begin = trap->first;
    const std::size_t trap_bytes = trap->second;
    const std::uintptr_t trap_end = trap_begin + trap_bytes;
    const std::uintptr_t scan_begin = std::max(trap_begin, begin);
    const std::uintptr_t scan_end = std::min(trap_end, end);
    scan_trap(scan_begin, scan_end, trap_begin, trap_bytes);
    // The parts of the trap outside [begin, end) stay traps, still unscanned.
    trap = reservation.traps.erase(trap);
    if (trap_begin < scan_begin) reservation.traps.emplace(trap_begin, scan_begin - trap_begin);
    if (scan_end < trap_end) {
      reservation.traps.emplace(scan_end, trap_end - scan_end);
      break;  // this trap reached past `end`: no other one overlaps
    }
  }
}

void HostMemory::scan_trap(std::uintptr_t begin, std::uintptr_t end, std::uintptr_t trap_begin,
                           std::size_t trap_size_bytes) {
  const ChangedBytes changed =
      find_changed(reinterpret_cast<const unsigned char*>(begin), end - begin);
  if (changed.count == 0) return;
  const std::uintptr_t first = begin + changed.first;
  const std::uintptr_t last = begin + changed.last;
  record_violation("write to " + address_text(first) +
                   " after it was unmapped: " + std::to_string(changed.count) +
                   " byte(s) changed in [" + address_text(first) + ", " + address_text(last) +
                   "], in the unmapped range " + range_text(trap_begin, trap_size_bytes));
}

void HostMemory::record_violation(std::string message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (violations_.size() < kMaxListedViolations) {
    violations_.push_back(std::move(message));
  } else {
    ++unlisted_violations_;
  }
}

void HostMemory::detach(std::uintptr_t va, std::size_t size_bytes) {
  const long page = ::sysconf(_SC_PAGESIZE);
  const std::size_t page_bytes = page > 0 ? static_cast<std::size_t>(page) : 4096;
  if (size_bytes == 0 || va % page_bytes != 0 || size_bytes % page_bytes != 0 ||
      va > std::numeric_limits<std::uintptr_t>::max() - size_bytes) {
    throw InvalidArgumentError("HostMemory::detach of " + range_text(va, size_bytes) +
                               ": the address and size must be non-zero multiples of the " +
                               std::to_string(page_bytes) + "-byte host page");
  }
  // One MAP_FIXED replaces every inherited mapping in the range at once. Private
  // anonymous memory: nothing of the parent's is reachable through it any more.
  // MAP_NORESERVE: a 1 TiB range commits nothing until the child writes into it.
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED;
  if (::mmap(address(va), size_bytes, PROT_READ | PROT_WRITE, flags, -1, 0) != MAP_FAILED) {
    return;
  }
  const int error = errno;
  // Strict overcommit (vm.overcommit_memory=2) charges writable private memory even with
  // MAP_NORESERVE; PROT_NONE is never charged. Stale pointers then fault in the child,
  // but still reach nothing of the parent's.
  if (::mmap(address(va), size_bytes, PROT_NONE, flags, -1, 0) != MAP_FAILED) return;
  throw_system_error(error, "HostMemory::detach of " + range_text(va, size_bytes) +
                                ": mmap of private memory over it failed");
}

std::vector<std::string> HostMemory::violations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> listed = violations_;
  if (unlisted_violations_ > 0) {
    listed.push_back("and " + std::to_string(unlisted_violations_) +
                     " more write(s) after unmap, not listed");
  }
  return listed;
}

void HostMemory::restore_reserved(Reservation& reservation, std::uintptr_t va,
                                  std::size_t size_bytes) noexcept {
  if (::mmap(address(va), size_bytes, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED) {
    reservation.broken = true;
  }
}

}  // namespace aimdo::sim
