// Real bytes for the simulator (design.md §5, "real_bytes"): host memory that is really
// mapped and unmapped at the addresses of reserved ranges, the way the CUDA driver maps
// physical device memory into a VA reservation.
// Data written through a mapped range reads back exactly as long as the physical
// allocation behind it lives, so a test can tell intact data from data that was lost.
//
// The model, one host object per CUDA object (Linux only):
// - reservation (cuMemAddressReserve): an mmap of PROT_NONE, MAP_NORESERVE anonymous
//   memory, aligned to at least kReservationAlignmentBytes. Costs address space only,
//   so a 1 TiB reservation commits nothing.
// - physical allocation (cuMemCreate): a memfd of the allocation's size, filled with
//   kFreshByte, as new device memory holds whatever was there before. Released
//   (cuMemRelease) by closing the descriptor: pages still mapped somewhere stay alive
//   until their last unmap, which is the driver's release-while-mapped rule.
// - map (cuMemMap) + set_access (cuMemSetAccess): the memfd is mmapped MAP_SHARED at
//   the address, read-write, when access is set. Until then the range keeps whatever
//   it held (the reservation's PROT_NONE, or the trap left by an earlier unmap), so a
//   range is never accessible with the new allocation's bytes before set_access, and a
//   range that held a trap never turns PROT_NONE under a reader (see "Traps").
// - unmap (cuMemUnmap): the range becomes a *trap*, not PROT_NONE (see below).
//
// Traps. aimdo's rule is that nothing a Python caller does may crash the process, and a
// caller may still hold a memoryview of a page after aimdo evicted it. So an unmapped
// range stays readable and writable: it is replaced by a private copy-on-write mapping
// of a shared "trap file" full of kTrapByte. A stale reader sees kTrapByte garbage, never
// the data (and never the next allocation's data); a stale writer changes only its own
// private copy of the page. When the range is mapped again, the trap is scanned: any
// byte that is no longer kTrapByte was written through a stale pointer, and a violation
// ("write to 0x... after it was unmapped") is recorded for violations(). A trap commits
// no memory until someone writes into it (one shared trap file backs every trap, sized to
// the largest unmapped range: host_files.hpp). Limits: a stale write of the value
// kTrapByte itself is invisible; a stale write made between map() and set_access() of
// the same range is not reported (the trap was scanned at map()); traps still in place
// when the object is destroyed are not scanned. Reservations live as long as the object
// (the simulator reserves one region per device, once).
//
// Costs and system limits:
// - Each page that was ever mapped costs one kernel mapping (VMA) for as long as its
//   reservation lives: its memfd mapping while mapped, its trap once unmapped (adjacent
//   mappings of different memfds, or of the trap file at offset 0, never merge). The
//   reservation's PROT_NONE rest is split by them into up to one more VMA per page. So
//   budget about 2 VMAs per page against vm.max_map_count (65530 by default): about
//   32k pages, e.g. 64 GiB touched with 2 MiB pages. A call that runs past it fails
//   with ENOMEM (std::system_error).
// - Each live (unreleased) allocation holds one file descriptor (RLIMIT_NOFILE), as does
//   a released allocation that is mapped but whose access was not set yet, plus one for
//   the trap file.
// - Memory: each allocation's bytes are committed (shmem) at create(); traps commit only
//   the pages written through stale pointers, plus the trap file once.
// - Time: create() writes the whole allocation; map() reads each trap it drops (a
//   memcmp-speed scan: a few milliseconds for 32 MiB).
//
// Errors: arguments that are unusable (misaligned, zero or overflowing sizes, a range
// outside every reservation, an unknown or released id, overlapping or missing mappings)
// throw aimdo::InvalidArgumentError and change nothing. A failed system call throws
// std::system_error carrying errno, with a message that says what was asked. Alignment
// is to the host page size (page_size_bytes()); the simulator's own granularity rules
// are checked by SimDriver before it calls here.
//
// fork(). A child made by fork() inherits every mapping and every descriptor: the memfd
// mappings are MAP_SHARED (the child's writes through them land in the parent's pages),
// and the memfds and the trap file are the parent's files (an ftruncate in the child cuts
// the file under the parent's traps, whose next read raises SIGBUS in the parent). So
// only the process that created a HostMemory may call its methods; SimDriver refuses
// every operation in any other process before it gets here. In a child, detach() makes
// pointers inherited into a range harmless, and the destructor is safe: munmap and close
// change only the child's own address space and descriptor table, never a file's size or
// contents, so dropping the object in a child cannot hurt the parent.
//
// Thread-safety: every method may be called from any thread. One mutex guards the tables
// (reservations, allocations, violations) and is held only to look up or update them,
// never across a system call that touches page contents. Each reservation has its own
// mutex, held for the whole of a call on that reservation (its scans and mmaps
// included): calls on different reservations run concurrently, calls on one reservation
// are serialised. Lock order: a reservation's mutex, then the table mutex or the trap
// file's mutex; neither of those is held while taking another lock. The destructor
// must not race with any other call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "host_files.hpp"

namespace aimdo::sim {

class HostMemory {
 public:
  // The byte a new physical allocation is filled with ("whatever was there").
  static constexpr unsigned char kFreshByte = 0xA5;
  // The byte an unmapped range reads as.
  static constexpr unsigned char kTrapByte = sim::kTrapByte;
  // Every reservation's base is aligned to at least this (2 MiB, the CUDA granularity).
  static constexpr std::size_t kReservationAlignmentBytes = std::size_t{2} << 20;
  // violations() lists at most this many entries, then one line counting the rest.
  static constexpr std::size_t kMaxListedViolations = 256;

  // Reads the host page size. Creates no kernel object (the trap file is made on first
  // use). Throws std::system_error if the page size cannot be read.
  HostMemory();
  // Unmaps every reservation (and with it every mapping and trap) and closes every
  // memfd. Errors are ignored. No other call may run concurrently.
  ~HostMemory();
  HostMemory(const HostMemory&) = delete;
  HostMemory& operator=(const HostMemory&) = delete;
  HostMemory(HostMemory&&) = delete;
  HostMemory& operator=(HostMemory&&) = delete;

  // The host page size in bytes: every address and size passed here must be a multiple
  // of it. Thread-safe (immutable).
  std::size_t page_size_bytes() const noexcept { return page_size_bytes_; }

  // Reserves `size_bytes` of address space (PROT_NONE, MAP_NORESERVE: nothing is
  // committed, 1 TiB is fine) and returns its base, aligned to the larger of
  // `alignment_bytes` and kReservationAlignmentBytes (0: the default). Touching the
  // range before a mapping is made faults, as on the device.
  // InvalidArgumentError: zero size, size not a multiple of the page size, alignment not
  // a power of two multiple of the page size, or size + alignment overflowing.
  // std::system_error: mmap or munmap failed (ENOMEM: no address space).
  std::uintptr_t reserve(std::size_t size_bytes, std::size_t alignment_bytes = 0);

  // Creates a physical allocation of `size_bytes`: a memfd (MFD_CLOEXEC) filled with
  // kFreshByte, committed now. Returns its id (never 0, never reused).
  // InvalidArgumentError: zero size, or not a multiple of the page size.
  // std::system_error: memfd_create, ftruncate or the fill failed (ENOMEM, ENOSPC,
  // EMFILE: out of memory or of file descriptors).
  std::uint64_t create(std::size_t size_bytes);

  // Releases the allocation `id`: the id becomes unknown at once, and its memory is freed
  // when it is no longer mapped anywhere (at once if it is not mapped).
  // InvalidArgumentError: unknown or already released id.
  void release(std::uint64_t id);

  // Maps the first `size_bytes` of allocation `id` at [va, va + size_bytes), which must
  // lie inside one reservation and overlap no other mapping. The bytes become reachable
  // at set_access(). Traps inside the range are scanned first: bytes written through
  // stale pointers since they were unmapped are recorded as violations (this never
  // fails the call).
  // InvalidArgumentError: unaligned or zero range, range outside every reservation or
  // overlapping a mapping, unknown or released id, size larger than the allocation.
  // Makes no system call.
  void map(std::uintptr_t va, std::size_t size_bytes, std::uint64_t id);

  // Makes every mapping that [va, va + size_bytes) touches readable and writable (all of
  // each such mapping, as the simulator counts access per mapping): its memfd is mmapped
  // MAP_SHARED | MAP_FIXED at its address, replacing the trap or PROT_NONE there in one
  // step. Setting access again on an accessible mapping does nothing.
  // InvalidArgumentError: unaligned or zero range, or a byte of it not mapped.
  // std::system_error: mmap failed (ENOMEM: vm.max_map_count). The mappings done before
  // the failure stay accessible; the failed one stays mapped without access, its range
  // PROT_NONE.
  void set_access(std::uintptr_t va, std::size_t size_bytes);

  // Unmaps the mapping that starts at `va` and spans exactly `size_bytes` (as
  // cuMemUnmap, a whole mapping) and leaves a trap in its place: the range reads
  // kTrapByte and may be written without crashing; writes are reported when the range is
  // mapped again. The allocation's pages are freed if it was released and this was its
  // last mapping.
  // InvalidArgumentError: no mapping starts at `va`, or its size differs.
  // std::system_error: the trap could not be put in place (ENOMEM). The mapping is gone
  // all the same and the range is PROT_NONE.
  void unmap(std::uintptr_t va, std::size_t size_bytes);

  // For a child made by fork(): replaces [va, va + size_bytes) of the calling process
  // with private, zero-filled, read-write memory (PROT_NONE if the kernel refuses that)
  // that commits nothing until written, so that pointers into it kept across fork() no
  // longer reach pages shared with the parent: the child reads zeros and its writes stay
  // its own. Pass whole ranges returned by reserve(); the object's tables are neither
  // read nor changed and no lock is taken (the child of a multithreaded parent may hold
  // copies of mutexes locked for good), so afterwards the object is fit only for
  // destruction. Static for that reason: the caller names the ranges it reserved.
  // InvalidArgumentError: unaligned, zero or overflowing range. std::system_error: both
  // mmaps failed (the range then still shares the parent's pages).
  static void detach(std::uintptr_t va, std::size_t size_bytes);

  // One line per detected write through a stale pointer, oldest first, e.g.
  // "write to 0x7f3a40201000 after it was unmapped: 16 bytes changed in
  // [0x7f3a40201000, 0x7f3a4020100f], in the unmapped range [0x7f3a40200000,
  // +33554432 bytes)". At most kMaxListedViolations lines plus one counting the rest.
  // Empty when no stale write was seen.
  std::vector<std::string> violations() const;

 private:
  struct Allocation;   // a memfd; closed when the last reference goes
  struct Reservation;  // a reserved range: its mappings and traps, under its own mutex

  std::shared_ptr<Reservation> reservation_holding(std::uintptr_t va, std::size_t size_bytes,
                                                   const char* operation) const;
  void check_range(std::uintptr_t va, std::size_t size_bytes, const char* operation) const;
  // Scans and drops the traps (or parts) of `reservation` inside [begin, end). The caller
  // holds the reservation's mutex.
  void drop_traps(Reservation& reservation, std::uintptr_t begin, std::uintptr_t end);
  void scan_trap(std::uintptr_t begin, std::uintptr_t end, std::uintptr_t trap_begin,
                 std::size_t trap_size_bytes);
  void record_violation(std::string message);
  // Puts PROT_NONE back over a range after a failed MAP_FIXED; on failure marks the
  // reservation broken (its range is then never touched again, not even freed).
  static void restore_reserved(Reservation& reservation, std::uintptr_t va,
                               std::size_t size_bytes) noexcept;

  const std::size_t page_size_bytes_;

  mutable std::mutex mutex_;  // guards the members below, up to trap_file_
  std::map<std::uintptr_t, std::shared_ptr<Reservation>> reservations_;  // by base
  std::map<std::uint64_t, std::shared_ptr<Allocation>> allocations_;     // live ids
  std::uint64_t next_id_ = 1;
  std::vector<std::string> violations_;
  std::size_t unlisted_violations_ = 0;

  TrapFile trap_file_;  // has its own mutex
};

}  // namespace aimdo::sim
