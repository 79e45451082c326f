#include "aimdo/file_pump.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <exception>
#include <string>
#include <utility>

#include <unistd.h>

#include "aimdo/errors.hpp"
#include "aimdo/process.hpp"

namespace aimdo {

// One job as the pump keeps it. The queuer thread alone touches the fields above `ended`
// until the job has ended; `ended` and `result` are read under the pump's mutex after.
struct FilePump::Active {
  PumpJob job;
  std::size_t next = 0;    // its next piece to hand to a reader
  int reads = 0;           // its pieces being read now
  bool exhausted = false;  // every piece handed out (or dropped)
  bool started = false;    // `after` waited for, `start` recorded
  bool failed = false;     // a read or a driver call of it failed: `result` says which
  bool ended = false;
  PumpResult result;
  // A held job's: set under the pump's mutex (attach, cancel), read by the queuer without
  // it. `attached` is stored after the fields attach() sets, which the queuer reads only
  // once it has seen it.
  std::atomic<bool> attached{false};
  std::atomic<bool> cancelled{false};
};

namespace {

std::int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

PumpStatus status_of(ReadStatus status) {
  switch (status) {
    case ReadStatus::kDone: return PumpStatus::kDone;
    case ReadStatus::kChanged: return PumpStatus::kChanged;
    case ReadStatus::kTruncated: return PumpStatus::kTruncated;
    case ReadStatus::kFailed: return PumpStatus::kFailed;
    case ReadStatus::kInvalid: return PumpStatus::kInvalid;
  }
  return PumpStatus::kInvalid;
}

std::vector<PumpBuffer> checked_ring(std::vector<PumpBuffer> ring) {
  if (ring.empty()) throw InvalidArgumentError("a file pump needs at least one ring buffer");
  for (const PumpBuffer& buffer : ring) {
    if (buffer.address == 0 || buffer.capacity == 0) {
      throw InvalidArgumentError("a ring buffer needs memory (an address and a capacity)");
    }
  }
  return ring;
}

}  // namespace

FilePump::FilePump(std::shared_ptr<Driver> driver, int device, std::vector<PumpBuffer> ring,
                   int readers, std::size_t split)
    : driver_(std::move(driver)),
      device_(device),
      ring_(checked_ring(std::move(ring))),
      split_(split),
      readers_(static_cast<std::size_t>(std::max(readers, 1))),
      reads_(readers),
      creator_(static_cast<long>(::getpid())) {
  if (!driver_) throw InvalidArgumentError("a file pump needs a driver");
  const auto undo = [this] {
    for (const EventHandle event : free_) driver_->event_destroy(event);
    free_.clear();
    reads_.close();
  };
  DriverStatus status;
  {
    ScopedDevice guard(*driver_, device_);
    status = guard.status();
    while (status.ok() && free_.size() < ring_.size()) {
      EventHandle event = 0;
      status = driver_->event_create(device_, &event);
      if (status.ok()) free_.push_back(event);
    }
  }
  if (!status.ok()) {
    undo();
    throw DriverError("cannot make the events of a file pump's ring on device " +
                          std::to_string(device_) + ": " + status.name,
                      device_, "cuEventCreate", status);
  }
  recorded_.assign(ring_.size(), false);
  unsure_.assign(ring_.size(), false);
  try {
    queuer_ = std::thread([this] { run(); });
  } catch (...) {
    undo();
    throw;
  }
}

FilePump::~FilePump() {
  try {
    close();
  } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): nothing to tell
  }
}

std::uint64_t FilePump::queue(PumpJob job) {
  std::size_t smallest = ring_.front().capacity;
  for (const PumpBuffer& buffer : ring_) smallest = std::min(smallest, buffer.capacity);
  for (const PumpPiece& piece : job.pieces) {
    const std::size_t room =
        piece.read.direct_fd >= 0 ? smallest - std::min(smallest, 2 * kDirectReadAlign) : smallest;
    if (piece.read.count == 0 || piece.read.count > room) {
      throw InvalidArgumentError("a piece of " + std::to_string(piece.read.count) +
                                 " bytes does not fit a ring buffer of " +
                                 std::to_string(smallest) + " bytes");
    }
  }
  auto active = std::make_unique<Active>();
  active->job = std::move(job);
  std::uint64_t number = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) throw InvalidStateError("this file pump is closed");
    number = next_++;
    queued_.push_back(active.get());
    jobs_.emplace(number, std::move(active));
    ++unended_;
    work_.notify_one();
  }
  reads_.poke();  // a queuer waiting on a read hands this job's pieces out at once
  return number;
}

void FilePump::attach(std::uint64_t number, const PumpJob& targets) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) throw InvalidStateError("this file pump is closed");
  const auto found = jobs_.find(number);
  if (found == jobs_.end() || !found->second->job.held) {
    throw InvalidArgumentError("job " + std::to_string(number) + " is not a held job queued");
  }
  Active& job = *found->second;
  if (job.attached.load() || job.cancelled.load()) {
    throw InvalidArgumentError("job " + std::to_string(number) +
                               " was attached or cancelled already");
  }
  job.job.base = targets.base;
  job.job.stream = targets.stream;
  job.job.after = targets.after;
  job.job.start = targets.start;
  job.job.done = targets.done;
  job.job.timed = targets.timed;
  job.attached.store(true, std::memory_order_release);
  work_.notify_all();
}

void FilePump::cancel(std::uint64_t number) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = jobs_.find(number);
    if (found == jobs_.end() || !found->second->job.held) {
      throw InvalidArgumentError("job " + std::to_string(number) + " is not a held job queued");
    }
    Active& job = *found->second;
    if (job.attached.load()) {
      throw InvalidArgumentError("job " + std::to_string(number) + " was attached: it copies");
    }
    job.cancelled.store(true, std::memory_order_release);
    work_.notify_all();
  }
  reads_.poke();
}

void FilePump::cancel_held() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cancel_unattached();
  }
  reads_.poke();
}

void FilePump::cancel_unattached() {
  for (auto& [number, job] : jobs_) {
    if (job->job.held && !job->attached.load()) job->cancelled.store(true);
  }
  work_.notify_all();
}

bool FilePump::waits_for_attach(const Active& job) {
  return job.job.held && !job.attached.load(std::memory_order_acquire) &&
         !job.cancelled.load(std::memory_order_acquire);
}

bool FilePump::wait(std::uint64_t job, std::int64_t timeout_ns) {
  std::unique_lock<std::mutex> lock(mutex_);
  const auto state = [&] {  // -1: not queued (or taken), 0: running, 1: ended
    const auto found = jobs_.find(job);
    return found == jobs_.end() ? -1 : found->second->ended ? 1 : 0;
  };
  int now = state();
  if (now < 0) throw InvalidArgumentError("job " + std::to_string(job) + " is not queued");
  ended_.wait_for(lock, std::chrono::nanoseconds(std::max<std::int64_t>(0, timeout_ns)), [&] {
    now = state();
    return now != 0;
  });
  if (now < 0) throw InvalidArgumentError("job " + std::to_string(job) + " was forgotten");
  return now == 1;
}

bool FilePump::ended(std::uint64_t job) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = jobs_.find(job);
  return found == jobs_.end() || found->second->ended;
}

PumpResult FilePump::result(std::uint64_t job) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = jobs_.find(job);
  if (found == jobs_.end() || !found->second->ended) {
    throw InvalidArgumentError("job " + std::to_string(job) +
                               " has not ended, or is not queued, or was forgotten");
  }
  return found->second->result;
}

void FilePump::forget(std::uint64_t job) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = jobs_.find(job);
  if (found == jobs_.end() || !found->second->ended) {
    throw InvalidArgumentError("job " + std::to_string(job) +
                               " has not ended, or is not queued, or was forgotten");
  }
  jobs_.erase(found);
}

void FilePump::drain() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cancel_unattached();
  }
  reads_.poke();
  std::unique_lock<std::mutex> lock(mutex_);
  ended_.wait(lock, [this] { return unended_ == 0; });
}

std::size_t FilePump::take_bytes_copied() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(bytes_copied_, 0);
}

std::uint64_t FilePump::pieces_read() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pieces_read_;
}

std::uint64_t FilePump::reads() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reads_handed_;
}

bool FilePump::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closing_;
}

void FilePump::close() {
  if (static_cast<long>(::getpid()) != creator_) {
    // A forked child: the threads are the parent's, and so may be any lock held at the
    // fork. Their handles are left unjoined and undetached (moved out and never freed: in
    // the child a stale handle may name a thread of the child's own), no lock is taken
    // and no driver called.
    if (queuer_.joinable()) new std::thread(std::move(queuer_));  // NOLINT: leaked on purpose
    reads_.abandon();
    return;
  }
  std::lock_guard<std::mutex> closing(close_mutex_);  // a second close waits for the first
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    closing_ = true;
    cancel_unattached();
  }
  reads_.poke();
  if (queuer_.joinable()) queuer_.join();  // it ends the jobs queued first
  DriverStatus failed{};
  const char* operation = "";
  const bool exiting = process_exiting();  // the driver may be gone: the OS reclaims all
  const auto step = [&](const char* name, const DriverStatus& status) {
    if (!status.ok() && failed.ok()) {
      failed = status;
      operation = name;
    }
  };
  for (std::size_t i = 0; i < free_.size() && !exiting; ++i) {
    if (unsure_[i]) {
      ScopedDevice guard(*driver_, device_);
      step("cuCtxSynchronize",
           guard.status().ok() ? driver_->synchronize(device_) : guard.status());
    } else if (recorded_[i]) {
      step("cuEventSynchronize", driver_->event_synchronize(free_[i]));
    }
    step("cuEventDestroy", driver_->event_destroy(free_[i]));
  }
  free_.clear();
  reads_.close();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  if (!failed.ok()) {
    throw DriverError(std::string("closing a file pump on device ") + std::to_string(device_) +
                          ": " + operation + " failed with " + failed.name,
                      device_, operation, failed);
  }
}

void FilePump::fail_driver(Active& job, const char* operation, const DriverStatus& status) {
  if (!job.failed) {
    job.result.status = PumpStatus::kDriver;
    job.result.driver = status;
    job.result.operation = operation;
  }
  job.failed = true;
}

bool FilePump::begin(Active& job) {
  if (job.started) return !job.failed;
  job.started = true;
  if (!context_.ok()) {
    fail_driver(job, "cuCtxSetCurrent", context_);
    return false;
  }
  if (job.job.after != 0) {
    const DriverStatus status = driver_->stream_wait_event(device_, job.job.stream, job.job.after);
    if (!status.ok()) {
      fail_driver(job, "cuStreamWaitEvent", status);
      return false;
    }
  }
  if (job.job.timed) job.result.start_ns = steady_now_ns();
  if (job.job.start != 0) {
    const DriverStatus status = driver_->event_record(device_, job.job.start, job.job.stream);
    if (!status.ok()) {
      fail_driver(job, "cuEventRecord", status);
      return false;
    }
  }
  return true;
}

bool FilePump::free_buffer(Active& job, std::size_t buffer) {
  if (unsure_[buffer]) {
    // Its last copy was queued but its event not recorded: wait for everything.
    const DriverStatus status = context_.ok() ? driver_->synchronize(device_) : context_;
    if (!status.ok()) {
      fail_driver(job, "cuCtxSynchronize", status);
      return false;
    }
    unsure_[buffer] = false;
  } else if (recorded_[buffer]) {
    const DriverStatus status = driver_->event_synchronize(free_[buffer]);
    if (!status.ok()) {
      fail_driver(job, "cuEventSynchronize", status);
      return false;
    }
  }
  recorded_[buffer] = false;
  return true;
}

void FilePump::copy(Active& job, std::size_t piece, std::size_t buffer, std::size_t lead) {
  if (!begin(job)) return;
  const PumpPiece& what = job.job.pieces[piece];
  DriverStatus status =
      driver_->copy_from_host_async(device_, job.job.base + what.destination,
                                    ring_[buffer].address + lead, what.read.count, job.job.stream);
  if (!status.ok()) {
    fail_driver(job, "cuMemcpyHtoDAsync", status);
    return;
  }
  status = driver_->event_record(device_, free_[buffer], job.job.stream);
  if (status.ok()) {
    recorded_[buffer] = true;
  } else {
    unsure_[buffer] = true;
    fail_driver(job, "cuEventRecord", status);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  bytes_copied_ += what.read.count;
}

void FilePump::finish(Active& job) {
  if (job.job.held && !job.attached.load(std::memory_order_acquire)) {
    job.result.status = PumpStatus::kCancelled;  // a failed read of it is not reported
    job.failed = true;
  } else if (!job.failed && begin(job) && job.job.done != 0) {
    const DriverStatus status = driver_->event_record(device_, job.job.done, job.job.stream);
    if (!status.ok()) fail_driver(job, "cuEventRecord", status);
  }
  if (job.job.timed) {
    job.result.end_ns = steady_now_ns();
    if (job.result.start_ns == 0) job.result.start_ns = job.result.end_ns;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  job.ended = true;
  --unended_;
  ended_.notify_all();
}

void FilePump::hand_out(std::deque<Active*>& active) {
  while (reading_.size() < ring_.size()) {
    Active* job = nullptr;
    for (Active* candidate : active) {
      if (!candidate->exhausted) {
        job = candidate;
        break;
      }
    }
    if (job == nullptr) return;
    if (job->failed || job->cancelled.load(std::memory_order_acquire) ||
        job->next == job->job.pieces.size()) {
      job->exhausted = true;  // its pieces not read yet are dropped, if it failed
      continue;
    }
    const std::size_t piece = job->next++;
    // The ring is taken in order, each buffer once the read before it in the ring was
    // handed out: a buffer whose wait failed is tried again by the next piece (its job
    // fails), never skipped, or a later read could land in a buffer still being read.
    const std::size_t buffer = turn_;
    if (!free_buffer(*job, buffer)) continue;  // failed: the job's next turn exhausts it
    turn_ = (turn_ + 1) % ring_.size();
    ReadRequest request = job->job.pieces[piece].read;
    request.into = ring_[buffer].address;
    request.capacity = ring_[buffer].capacity;
    if (request.direct_fd >= 0 && refused_.count(request.direct_fd) != 0) request.direct_fd = -1;
    reading_.push_back({job, piece, buffer, {}});  // room first: a read queued is tracked
    ++job->reads;
    std::vector<std::uint64_t>& tickets = reading_.back().tickets;
    try {
      std::size_t part = request.count;
      if (split_ > 0 && request.direct_fd < 0) {
        // No more parts than readers: more could not be read at once, and each costs a
        // stamp check and a wake-up of its own.
        const std::size_t fewest = (request.count + readers_ - 1) / readers_;
        part = std::min(request.count, std::max(split_, fewest));
      }
      // Reserved first: once a part is queued, nothing here throws before it is tracked.
      tickets.reserve((request.count + part - 1) / part);
      for (std::size_t at = 0; at < request.count; at += part) {
        ReadRequest each = request;
        each.offset += static_cast<std::int64_t>(at);
        each.count = std::min(part, request.count - at);
        each.into += at;
        each.capacity -= at;
        tickets.push_back(reads_.submit(each));
      }
    } catch (...) {
      if (tickets.empty()) {  // else its parts queued are waited for as every read is
        --job->reads;
        reading_.pop_back();
      }
      throw;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ++pieces_read_;
    reads_handed_ += tickets.size();
  }
}

bool FilePump::wait_front() {
  for (const std::uint64_t ticket : reading_.front().tickets) {
    if (!reads_.wait(ticket)) return false;  // a part read already returns at once after
  }
  return true;
}

ReadResult FilePump::take_front() {
  const std::vector<std::uint64_t>& tickets = reading_.front().tickets;
  ReadResult whole = reads_.take(tickets.front());  // a piece read whole: its lead
  for (std::size_t part = 1; part < tickets.size(); ++part) {
    const ReadResult result = reads_.take(tickets[part]);  // parts: cached, no lead
    if (whole.status == ReadStatus::kDone && result.status != ReadStatus::kDone) whole = result;
  }
  return whole;
}

void FilePump::wait_for_attach(const Active& job) {
  std::unique_lock<std::mutex> lock(mutex_);
  work_.wait(lock, [&] { return !waits_for_attach(job) || closing_ || !queued_.empty(); });
}

void FilePump::finish_ended(std::deque<Active*>& active) {
  // Whether each piece of the job was handed out or dropped: hand_out marks it so only
  // when it looks for the next piece, which a full ring keeps it from doing.
  const auto handed = [](const Active& job) {
    return job.exhausted || job.failed || job.cancelled.load(std::memory_order_acquire) ||
           job.next == job.job.pieces.size();
  };
  while (!active.empty() && handed(*active.front()) && active.front()->reads == 0 &&
         !waits_for_attach(*active.front())) {
    Active* job = active.front();
    active.pop_front();
    job->exhausted = true;
    finish(*job);
  }
}

void FilePump::run() {
  ScopedDevice guard(*driver_, device_);  // for the pump's driver calls, all on this thread
  context_ = guard.status();
  std::deque<Active*> active;  // taken, not ended, in order
  while (true) {
    try {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (active.empty()) work_.wait(lock, [this] { return closing_ || !queued_.empty(); });
        while (!queued_.empty()) {
          active.push_back(queued_.front());
          queued_.pop_front();
        }
        if (active.empty()) return;  // closing, and every job ended
      }
      hand_out(active);
      if (!reading_.empty()) {
        if (!wait_front()) continue;  // poked: a job was queued
        if (waits_for_attach(*reading_.front().job)) {
          // Read ahead: its piece stays in its buffer until the job is attached (or
          // cancelled); a job queued meanwhile is taken, to be read into the ring's rest.
          // The jobs before it end first: the caller may be waiting for one of them
          // before it attaches this one.
          finish_ended(active);
          wait_for_attach(*reading_.front().job);
          continue;
        }
        const ReadResult result = take_front();
        const Reading read = std::move(reading_.front());
        reading_.pop_front();
        Active& job = *read.job;
        --job.reads;
        if (result.direct_refused) {
          const int fd = job.job.pieces[read.piece].read.direct_fd;
          refused_.insert(fd);
          job.result.refused_direct.push_back(fd);
        }
        if (result.status != ReadStatus::kDone) {
          if (!job.failed) {
            job.result.status = status_of(result.status);
            job.result.error = result.error;
            job.result.tensor = job.job.pieces[read.piece].tensor;
          }
          job.failed = true;
        } else if (!job.failed && !job.cancelled.load(std::memory_order_acquire)) {
          copy(job, read.piece, read.buffer, result.lead);
        }
      }
    } catch (...) {
      // Not a read's failure nor the driver's (those fail their job): memory, or a broken
      // invariant. Every job taken fails, once no reader writes into the ring any more.
      for (const Reading& read : reading_) {
        for (const std::uint64_t ticket : read.tickets) {
          try {
            while (!reads_.wait(ticket)) {
            }
            reads_.take(ticket);
          } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): ended already
          }
        }
        --read.job->reads;
      }
      reading_.clear();
      for (Active* job : active) {
        if (!job->failed) job->result.status = PumpStatus::kInternal;
        job->failed = true;
        job->exhausted = true;
      }
    }
    finish_ended(active);
    // Every piece read, and the first job not ended waits for attach() (or cancel()).
    if (reading_.empty() && !active.empty() && waits_for_attach(*active.front())) {
      wait_for_attach(*active.front());
    }
  }
}

}  // namespace aimdo
