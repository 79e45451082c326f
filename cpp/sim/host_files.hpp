// The files and byte patterns behind HostMemory (host_memory.hpp), internal to cpp/sim:
// a descriptor that closes itself, filling a file with one byte, finding the bytes of a
// trap that a stale pointer changed, and the trap file every trap maps.
//
// Errors: a failed system call throws std::system_error carrying errno, its message
// saying what was asked. Thread-safety: the free functions are reentrant; TrapFile has
// its own mutex (below).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>

namespace aimdo::sim {

// The byte an unmapped range reads as (HostMemory::kTrapByte).
inline constexpr unsigned char kTrapByte = 0x5A;

// "0x7f0000000000": how every message names an address.
std::string address_text(std::uintptr_t va);
// "[0x7f0000000000, +33554432 bytes)": how every message names a range.
std::string range_text(std::uintptr_t va, std::size_t size_bytes);

[[noreturn]] void throw_system_error(int error, const std::string& what);

// A file descriptor that closes itself: HostMemory::create and the trap file hand theirs
// over only once everything that can fail has succeeded.
class OwnedFd {
 public:
  explicit OwnedFd(int fd) noexcept : fd_(fd) {}
  ~OwnedFd();
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  int get() const noexcept { return fd_; }
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// Writes `byte` over [offset, offset + size_bytes) of `fd`. pwrite(), not a mapping and
// memset: running out of shmem then answers ENOSPC/ENOMEM instead of raising SIGBUS.
// std::system_error naming `what` on failure.
void fill_file(int fd, std::size_t offset, std::size_t size_bytes, unsigned char byte,
               const std::string& what);

// The bytes of a trap that are no longer kTrapByte: how many, and the first and last
// (offsets from the start of the scanned range).
struct ChangedBytes {
  std::size_t count = 0;
  std::size_t first = 0;
  std::size_t last = 0;
};
// Scans `size_bytes` at `bytes`: memcmp() against a block of kTrapByte skips intact
// chunks at memory speed; only a chunk that differs is walked byte by byte.
ChangedBytes find_changed(const unsigned char* bytes, std::size_t size_bytes);

// The trap file: one memfd full of kTrapByte that every trap maps privately
// (copy-on-write). Made on first use and only ever grown, in whole 2 MiB steps, so that
// the private mappings of it already made are unaffected and none passes its end (which
// would raise SIGBUS). Thread-safety: one mutex guards it.
class TrapFile {
 public:
  TrapFile() = default;
  ~TrapFile();
  TrapFile(const TrapFile&) = delete;
  TrapFile& operator=(const TrapFile&) = delete;

  // The descriptor, the file grown to at least `size_bytes` first. InvalidArgumentError
  // for a size too large for a file; std::system_error when it cannot be made or grown
  // (`what` names the caller in the message).
  int grown_to(std::size_t size_bytes, const std::string& what);

 private:
  std::mutex mutex_;  // guards the members below
  int fd_ = -1;
  std::size_t size_bytes_ = 0;
};

}  // namespace aimdo::sim
