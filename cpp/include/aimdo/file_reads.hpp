// Reads of checkpoint files on threads of their own, without Python (design.md §7, host
// tiers): aimdo.torch's FileStream hands each piece of a weight to a FileReads, which
// reads it into a ring buffer with pread(), checking first that the file is still what
// its stamp says, and waits for it with the GIL released. Its reader threads never take
// the GIL, so the forward's thread does not wait for them, nor they for it.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace aimdo {

// Direct reads (O_DIRECT) start and end on multiples of this many bytes.
inline constexpr std::size_t kDirectReadAlign = 4096;

// One piece to read: `count` bytes of a file from byte `offset`, into `into`.
struct ReadRequest {
  int fd = -1;         // the file, read through the page cache
  int direct_fd = -1;  // the same file opened with O_DIRECT, or -1: read through the cache
  std::int64_t offset = 0;
  std::size_t count = 0;
  std::uintptr_t into = 0;  // with direct_fd: aligned, and `capacity` >= count + 2 aligns
  std::size_t capacity = 0;
  // The file's stamp, checked (fstat) on the descriptor read before reading.
  std::int64_t size = 0;
  std::int64_t mtime_ns = 0;
  std::uint64_t inode = 0;
};

enum class ReadStatus {
  kDone,       // read; the bytes begin `lead` bytes into the buffer
  kChanged,    // the file's stamp differs: it changed since its header was read
  kTruncated,  // the file ends before the piece does
  kFailed,     // a read failed: `error` is its errno
  kInvalid,    // the request itself is wrong (a direct buffer too small or not aligned)
};

struct ReadResult {
  ReadStatus status = ReadStatus::kDone;
  int error = 0;
  std::size_t lead = 0;
  // The O_DIRECT descriptor refused this read (EINVAL): it was read through the page
  // cache instead; read the file's next pieces so too.
  bool direct_refused = false;
};

// The reading of one request, on the calling thread (what a FileReads thread runs).
ReadResult read_piece(const ReadRequest& request);

class FileReads {
 public:
  explicit FileReads(int threads);
  ~FileReads();
  FileReads(const FileReads&) = delete;
  FileReads& operator=(const FileReads&) = delete;

  // Queue a read; returns its ticket. InvalidStateError once closed.
  std::uint64_t submit(const ReadRequest& request);
  // Wait until the ticket's read is done (true), or poke() was called since the last
  // wait returned (false). InvalidArgumentError for a ticket not queued, or taken (by
  // another thread) while this one waited.
  bool wait(std::uint64_t ticket);
  // Whether the ticket's read is done, without waiting. InvalidArgumentError for a ticket
  // not queued or taken already.
  bool done(std::uint64_t ticket) const;
  // Wake the wait in progress (or the next one): there is other work for its caller.
  void poke();
  // The result of a done read, forgotten once taken. InvalidArgumentError for a ticket
  // not done, not queued or taken already.
  ReadResult take(std::uint64_t ticket);
  // Read what is queued, then stop the threads; returns once they are stopped, from
  // whichever thread calls it. Idempotent.
  void close();
  bool closed() const;
  // In a child made by fork(): let the threads' handles go without joining or detaching
  // them (they are the parent's; a stale handle may name a thread of the child's own) and
  // touch no lock (the parent's threads may have held one at the fork).
  // The reads are forgotten. close() and the destructor call it themselves in a child.
  void abandon() noexcept;

 private:
  void run();

  mutable std::mutex mutex_;
  std::condition_variable work_;  // a request queued, or closing
  std::condition_variable done_;  // a read done, or a poke
  std::deque<std::pair<std::uint64_t, ReadRequest>> queue_;
  // Every ticket queued and not taken: its result once done.
  std::unordered_map<std::uint64_t, std::pair<bool, ReadResult>> tickets_;
  std::uint64_t next_ = 1;
  bool poked_ = false;
  bool closing_ = false;
  bool joining_ = false;  // a close is joining the threads
  bool joined_ = false;   // they are joined
  std::condition_variable joined_cv_;
  std::vector<std::thread> threads_;
  const long creator_;  // the process that made them (getpid)
};

}  // namespace aimdo
