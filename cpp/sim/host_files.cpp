#include "host_files.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>
#include <system_error>
#include <vector>

#include "aimdo/errors.hpp"

namespace aimdo::sim {
namespace {

// pwrite() chunk when filling a memfd: bounds the pattern buffer, not the file size.
constexpr std::size_t kFillChunkBytes = std::size_t{1} << 20;
// memcmp() chunk when scanning a trap: the expected-bytes block is this long.
constexpr std::size_t kScanChunkBytes = std::size_t{64} << 10;
// The trap file grows in steps of this many bytes (the CUDA granularity).
constexpr std::size_t kTrapStepBytes = std::size_t{2} << 20;

}  // namespace

std::string address_text(std::uintptr_t va) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "0x%" PRIxPTR, va);
  return buffer;
}

std::string range_text(std::uintptr_t va, std::size_t size_bytes) {
  return "[" + address_text(va) + ", +" + std::to_string(size_bytes) + " bytes)";
}

void throw_system_error(int error, const std::string& what) {
  throw std::system_error(error, std::generic_category(), what);
}

OwnedFd::~OwnedFd() {
  if (fd_ >= 0) ::close(fd_);
}

void fill_file(int fd, std::size_t offset, std::size_t size_bytes, unsigned char byte,
               const std::string& what) {
  const std::vector<unsigned char> pattern(std::min(size_bytes, kFillChunkBytes), byte);
  std::size_t done = 0;
  while (done < size_bytes) {
    const std::size_t chunk = std::min(pattern.size(), size_bytes - done);
    const ssize_t written = ::pwrite(fd, pattern.data(), chunk, static_cast<off_t>(offset + done));
    if (written < 0) {
      if (errno == EINTR) continue;
      throw_system_error(errno, what + ": filling the memfd failed");
    }
    if (written == 0) throw_system_error(EIO, what + ": filling the memfd wrote nothing");
    done += static_cast<std::size_t>(written);
  }
}

ChangedBytes find_changed(const unsigned char* bytes, std::size_t size_bytes) {
  static const std::vector<unsigned char> expected(kScanChunkBytes, kTrapByte);
  ChangedBytes changed;
  for (std::size_t offset = 0; offset < size_bytes; offset += kScanChunkBytes) {
    const std::size_t chunk = std::min(kScanChunkBytes, size_bytes - offset);
    if (std::memcmp(bytes + offset, expected.data(), chunk) == 0) continue;
    for (std::size_t i = offset; i < offset + chunk; ++i) {
      if (bytes[i] == kTrapByte) continue;
      if (changed.count == 0) changed.first = i;
      changed.last = i;
      ++changed.count;
    }
  }
  return changed;
}

TrapFile::~TrapFile() {
  if (fd_ >= 0) ::close(fd_);
}

int TrapFile::grown_to(std::size_t size_bytes, const std::string& what) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (fd_ < 0) {
    const int fd = ::memfd_create("aimdo-sim-trap", MFD_CLOEXEC);
    if (fd < 0) throw_system_error(errno, what + ": memfd_create of the trap file failed");
    fd_ = fd;
  }
  if (size_bytes_ >= size_bytes) return fd_;
  if (size_bytes > std::numeric_limits<std::size_t>::max() - kTrapStepBytes ||
      size_bytes > static_cast<std::size_t>(std::numeric_limits<off_t>::max()) - kTrapStepBytes) {
    throw InvalidArgumentError(what + ": too large for the trap file");
  }
  // Existing bytes are never rewritten: the file only grows.
  const std::size_t grown_bytes =
      (size_bytes + kTrapStepBytes - 1) / kTrapStepBytes * kTrapStepBytes;
  if (::ftruncate(fd_, static_cast<off_t>(grown_bytes)) != 0) {
    throw_system_error(errno, what + ": growing the trap file to " + std::to_string(grown_bytes) +
                                  " bytes failed");
  }
  fill_file(fd_, size_bytes_, grown_bytes - size_bytes_, kTrapByte, what + " (trap file)");
  size_bytes_ = grown_bytes;
  return fd_;
}

}  // namespace aimdo::sim
