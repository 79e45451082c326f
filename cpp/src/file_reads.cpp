#include "aimdo/file_reads.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <utility>

#include "aimdo/errors.hpp"

namespace aimdo {
namespace {

// A read asks for at most this many bytes at once (pread may return fewer).
constexpr std::size_t kMaxReadBytes = std::size_t{1} << 30;

bool stamp_matches(int fd, const ReadRequest& request, int* error) {
  struct stat status{};
  if (fstat(fd, &status) != 0) {
    *error = errno;
    return false;
  }
  const std::int64_t mtime_ns =
      static_cast<std::int64_t>(status.st_mtim.tv_sec) * 1000000000 + status.st_mtim.tv_nsec;
  return static_cast<std::int64_t>(status.st_size) == request.size &&
         mtime_ns == request.mtime_ns && static_cast<std::uint64_t>(status.st_ino) == request.inode;
}

ReadResult checked(int fd, const ReadRequest& request) {
  ReadResult result;
  int error = 0;
  if (!stamp_matches(fd, request, &error)) {
    result.status = error != 0 ? ReadStatus::kFailed : ReadStatus::kChanged;
    result.error = error;
  }
  return result;
}

// Through the page cache: `count` bytes from `offset` into the buffer's start.
ReadResult read_cached(const ReadRequest& request) {
  ReadResult result = checked(request.fd, request);
  if (result.status != ReadStatus::kDone) return result;
  auto* into = reinterpret_cast<char*>(request.into);
  std::size_t done = 0;
  while (done < request.count) {
    const std::size_t want = std::min(request.count - done, kMaxReadBytes);
    const ssize_t got = pread(request.fd, into + done, want,
                              static_cast<off_t>(request.offset + static_cast<std::int64_t>(done)));
    if (got < 0) {
      if (errno == EINTR) continue;
      result.status = ReadStatus::kFailed;
      result.error = errno;
      return result;
    }
    if (got == 0) {
      result.status = ReadStatus::kTruncated;
      return result;
    }
    done += static_cast<std::size_t>(got);
  }
  return result;
}

// With O_DIRECT: the aligned range around the piece, into the aligned buffer; the bytes
// wanted begin `lead` bytes in. A file system that took the open but refuses the read
// (EINVAL) has it read through the page cache instead.
ReadResult read_direct(const ReadRequest& request) {
  ReadResult result = checked(request.direct_fd, request);
  if (result.status != ReadStatus::kDone) return result;
  const auto first = static_cast<std::size_t>(request.offset);
  const std::size_t aligned = first - first % kDirectReadAlign;
  const std::size_t lead = first - aligned;
  const std::size_t wanted = lead + request.count;
  const std::size_t length = (wanted + kDirectReadAlign - 1) / kDirectReadAlign * kDirectReadAlign;
  if (length > request.capacity || request.into % kDirectReadAlign != 0) {
    result.status = ReadStatus::kInvalid;
    return result;
  }
  auto* into = reinterpret_cast<char*>(request.into);
  std::size_t done = 0;
  while (done < wanted) {
    const std::size_t want = std::min(length - done, kMaxReadBytes);
    const ssize_t got =
        pread(request.direct_fd, into + done, want, static_cast<off_t>(aligned + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL) {
        ReadResult cached = read_cached(request);
        cached.direct_refused = true;
        return cached;
      }
      result.status = ReadStatus::kFailed;
      result.error = errno;
      return result;
    }
    done += static_cast<std::size_t>(got);
    // A read short of a whole block ends at the end of the file.
    if (got == 0 || (done < wanted && done % kDirectReadAlign != 0)) {
      result.status = ReadStatus::kTruncated;
      return result;
    }
  }
  result.lead = lead;
  return result;
}

}  // namespace

ReadResult read_piece(const ReadRequest& request) {
  ReadResult result = request.direct_fd >= 0 ? read_direct(request) : read_cached(request);
  // The stamp again once the bytes are in: a file written while it was read (after the
  // check before the read) has a new mtime now, and the bytes may be part old, part new.
  if (result.status == ReadStatus::kDone) {
    const ReadResult after = checked(request.fd, request);
    result.status = after.status;
    result.error = after.error;
  }
  return result;
}

FileReads::FileReads(int threads) : creator_(static_cast<long>(::getpid())) {
  if (threads < 1) throw InvalidArgumentError("FileReads needs at least one thread");
  threads_.reserve(static_cast<std::size_t>(threads));
  try {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  } catch (...) {
    close();
    throw;
  }
}

FileReads::~FileReads() {
  close();
}

std::uint64_t FileReads::submit(const ReadRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) throw InvalidStateError("these file reads are closed");
  const std::uint64_t ticket = next_++;
  tickets_.emplace(ticket, std::make_pair(false, ReadResult{}));
  queue_.emplace_back(ticket, request);
  work_.notify_one();
  return ticket;
}

bool FileReads::wait(std::uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mutex_);
  // -1: not queued (or taken meanwhile, by another thread), 0: reading, 1: done.
  const auto state = [&] {
    const auto found = tickets_.find(ticket);
    return found == tickets_.end() ? -1 : found->second.first ? 1 : 0;
  };
  int now = state();
  if (now < 0) throw InvalidArgumentError("read " + std::to_string(ticket) + " is not queued");
  done_.wait(lock, [&] {
    now = state();
    return now != 0 || poked_;
  });
  if (now < 0) throw InvalidArgumentError("read " + std::to_string(ticket) + " was taken");
  if (now == 1) return true;
  poked_ = false;
  return false;
}

bool FileReads::done(std::uint64_t ticket) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = tickets_.find(ticket);
  if (found == tickets_.end()) {
    throw InvalidArgumentError("read " + std::to_string(ticket) + " is not queued");
  }
  return found->second.first;
}

void FileReads::poke() {
  std::lock_guard<std::mutex> lock(mutex_);
  poked_ = true;
  done_.notify_all();
}

ReadResult FileReads::take(std::uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = tickets_.find(ticket);
  if (found == tickets_.end() || !found->second.first) {
    throw InvalidArgumentError("read " + std::to_string(ticket) + " is not done");
  }
  const ReadResult result = found->second.second;
  tickets_.erase(found);
  return result;
}

void FileReads::abandon() noexcept {
  // Moved out and never freed: neither joined nor detached (in a forked child a stale
  // handle may name a thread of the child's own). Moving a std::thread calls nothing.
  if (!threads_.empty()) new std::vector<std::thread>(std::move(threads_));  // NOLINT
  threads_.clear();
}

void FileReads::close() {
  if (static_cast<long>(::getpid()) != creator_) {
    abandon();
    return;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  closing_ = true;
  work_.notify_all();
  if (joining_) {  // another close joins the threads: wait for it
    joined_cv_.wait(lock, [this] { return joined_; });
    return;
  }
  joining_ = true;
  std::vector<std::thread> threads;
  threads.swap(threads_);
  lock.unlock();
  for (auto& thread : threads) thread.join();
  lock.lock();
  joined_ = true;
  joined_cv_.notify_all();
}

bool FileReads::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closing_;
}

void FileReads::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_.wait(lock, [this] { return closing_ || !queue_.empty(); });
    if (queue_.empty()) return;  // closing, and nothing left to read
    auto [ticket, request] = queue_.front();
    queue_.pop_front();
    lock.unlock();
    const ReadResult result = read_piece(request);
    lock.lock();
    auto& entry = tickets_[ticket];
    entry = {true, result};
    done_.notify_all();
  }
}

}  // namespace aimdo
