// Copies of checkpoint bytes to a device with no Python in the loop (design.md §7, host
// tiers): aimdo.torch's FileStream queues one job per block, the pieces of its weights
// left in the files; a FilePump reads each piece into a buffer of a ring of pinned host
// memory (FileReads threads), queues its copy to the device on the job's stream, and
// records the buffer's event, so that the buffer is read into again only once that copy
// is done. One thread of its own queues the copies, in the order the jobs came, and
// keeps every buffer of the ring reading, from one job into the next.
//
// Before this, the copies were queued by a Python thread, which took the GIL from the
// forward's thread three times a piece (benchmarks/RESULTS.md: Qwen-Image's compute went
// from 407 to 495-555 ms a step at host_limit 8 GiB). The pump's threads never take it.
//
// Ordering, as on the stream before it (tests/test_file_stream.py states each rule):
// - pieces are read and copied in the order queued, job after job; at most as many
//   pieces are read at once as the ring has buffers (a piece split in parts counts once:
//   its copy is queued once every part is read, and a part that fails fails its job);
// - a job's first copy waits (on its stream) for its `after` event; its `done` event is
//   recorded after its last copy (after `after`, when it copies nothing);
// - a read that fails fails its own job, once that job's reads have ended; its pieces not
//   read yet are dropped; the jobs before and after it go on. A driver failure likewise
//   fails its own job only.
// - a held job (read-ahead: queued before its copies' destination is known) is read like
//   any other, but its pieces wait in the ring, and the jobs after it wait behind them,
//   until attach() gives it a destination, a stream and events; cancel() drops it (its
//   reads end, nothing is copied). drain() and close() cancel the held jobs not attached.
// Thread-safety: every method may be called from any thread.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "aimdo/driver.hpp"
#include "aimdo/file_reads.hpp"

namespace aimdo {

// One buffer of the ring: pinned host memory the caller owns and keeps alive until close()
// returns. With O_DIRECT reads, aligned, with room for two alignments more than a piece.
struct PumpBuffer {
  std::uintptr_t address = 0;
  std::size_t capacity = 0;
};

// One piece of a weight: what to read (`read.into` and `read.capacity` are the pump's to
// set), where its bytes go, and the caller's index of the tensor it is part of.
struct PumpPiece {
  ReadRequest read;
  DeviceAddress destination = 0;
  int tensor = -1;
};

struct PumpJob {
  std::vector<PumpPiece> pieces;  // each piece's destination is `base` + its own
  DeviceAddress base = 0;
  StreamHandle stream = 0;
  EventHandle after = 0;  // recorded already (0: none): the first copy waits for it
  EventHandle start = 0;  // recorded before the first copy (0: none)
  EventHandle done = 0;   // recorded after the last copy (0: none)
  bool timed = false;     // note the host clock at the first copy and at the end
  bool held = false;      // read ahead: copied once attach() gives the fields above
};

enum class PumpStatus {
  kDone,
  kChanged,    // a piece's file changed since its header was read (ReadStatus)
  kTruncated,  // a piece's file ends early
  kFailed,     // a read failed: `error` is its errno
  kInvalid,    // a read's request was wrong (an O_DIRECT buffer too small or misaligned)
  kDriver,     // the driver refused a copy or an event: `driver`, `operation`
  kInternal,   // the pump itself failed (memory, or a broken invariant): its jobs fail so
  kCancelled,  // a held job cancelled (or not attached by drain() or close()): nothing copied
};

struct PumpResult {
  PumpStatus status = PumpStatus::kDone;
  int error = 0;    // kFailed: errno
  int tensor = -1;  // a read's failure: the tensor of the piece read
  DriverStatus driver{};
  const char* operation = "";  // kDriver: the CUDA function refused
  // Timed: the host's steady clock (CLOCK_MONOTONIC, as Python's time.perf_counter) when
  // the first copy was queued and when the job ended, in nanoseconds.
  std::int64_t start_ns = 0;
  std::int64_t end_ns = 0;
  // O_DIRECT descriptors a read of this job found refused (EINVAL): the pump has read
  // their files through the page cache since; the caller may close them once closed.
  std::vector<int> refused_direct;
};

class FilePump {
 public:
  // Copies to `device` through `driver`, reading into `ring` with `readers` threads.
  // With `split` > 0, a piece read through the page cache that is larger than `split`
  // bytes is read as parts of `split` bytes (the last one shorter), in no more parts than
  // `readers` (larger ones then), each by whichever reader is free, its copy still one,
  // once every part is read: the readers then work on the first pieces of the ring
  // together, and a piece is ready in about the time of one part while readers are free,
  // where one reader alone takes the whole piece's (a reader copies a few GB/s from the
  // page cache). O_DIRECT reads are never split.
  // InvalidArgumentError for an empty ring, a buffer without memory, or readers < 1;
  // DriverError when the ring's events cannot be made (none is left made).
  FilePump(std::shared_ptr<Driver> driver, int device, std::vector<PumpBuffer> ring, int readers,
           std::size_t split = 0);
  ~FilePump();
  FilePump(const FilePump&) = delete;
  FilePump& operator=(const FilePump&) = delete;

  // Queue a job; returns its number. InvalidStateError once closed; InvalidArgumentError
  // for a piece larger than a buffer.
  std::uint64_t queue(PumpJob job);
  // Give a held job what its copies need (the job's base, stream, after, start, done and
  // timed), so that its pieces are copied, those read already first. InvalidArgumentError
  // for a job not queued held, or attached or cancelled already; InvalidStateError once
  // closed.
  void attach(std::uint64_t job, const PumpJob& targets);
  // Drop a held job not attached: its reads in flight end, nothing is copied, and it ends
  // as kCancelled (a failed read of it is not reported). Nothing for one cancelled already;
  // InvalidArgumentError for a job not queued held, or attached.
  void cancel(std::uint64_t job);
  // cancel() every held job not attached, those the caller lost track of too.
  void cancel_held();
  // Wait up to `timeout_ns` until the job has ended: true when it has. InvalidArgumentError
  // for a job not queued or forgotten already.
  bool wait(std::uint64_t job, std::int64_t timeout_ns);
  // Whether the job has ended (true too for a job forgotten or never queued).
  bool ended(std::uint64_t job) const;
  // The result of an ended job, as often as asked until forget(). InvalidArgumentError for
  // a job not ended, not queued or forgotten.
  PumpResult result(std::uint64_t job) const;
  // Forget an ended job and its result. InvalidArgumentError for a job not ended, not
  // queued or forgotten already.
  void forget(std::uint64_t job);
  // Return once every job queued so far has ended (its copies queued, or failed), the held
  // jobs not attached cancelled.
  void drain();
  // Bytes copied (queued) since the last call.
  std::size_t take_bytes_copied();
  // Pieces handed to the readers so far (for tests: the ring bounds them).
  std::uint64_t pieces_read() const;
  // Reads handed to the readers so far: one a piece, or one a part of a piece split.
  std::uint64_t reads() const;
  // End the jobs queued, stop the threads, wait until the copies that read the ring are
  // done and destroy its events: then the caller may give the ring back. Idempotent.
  // DriverError for the first of those driver calls that failed (the others are made).
  // In a child made by fork() (whose copy of the pump has no threads, and whose copy of
  // a lock may be held for ever) it only lets the threads' handles go; while the process
  // exits, it makes no driver call.
  void close();
  bool closed() const;

 private:
  struct Active;
  void run();
  void hand_out(std::deque<Active*>& active);
  void copy(Active& job, std::size_t piece, std::size_t buffer, std::size_t lead);
  bool begin(Active& job);
  void finish(Active& job);
  bool free_buffer(Active& job, std::size_t buffer);
  void fail_driver(Active& job, const char* operation, const DriverStatus& status);
  void cancel_unattached();                        // with mutex_ held
  void wait_for_attach(const Active& job);         // or for a job queued, or closing
  void finish_ended(std::deque<Active*>& active);  // the first jobs whose pieces are all done
  static bool waits_for_attach(const Active& job);

  std::shared_ptr<Driver> driver_;
  const int device_;
  const std::vector<PumpBuffer> ring_;
  const std::size_t split_;    // the largest part of a cached piece read alone (0: whole)
  const std::size_t readers_;  // the reader threads: the most parts a piece is read in
  FileReads reads_;

  // The queuer's own (touched by the queuer thread only, and by close() once it ended).
  std::vector<EventHandle> free_;  // per buffer: its copy's event
  std::vector<bool> recorded_;     // its event records its last copy
  std::vector<bool> unsure_;       // its last copy's event could not be recorded
  std::size_t turn_ = 0;           // the buffer the next piece takes
  struct Reading {
    Active* job;
    std::size_t piece;
    std::size_t buffer;
    std::vector<std::uint64_t> tickets;  // the reads of its parts, in order (one: whole)
  };
  // Whether every part of the first piece being read is read (false: poked meanwhile).
  bool wait_front();
  // The first piece's parts' results taken, as one: the first that failed, else done.
  ReadResult take_front();
  std::deque<Reading> reading_;
  std::set<int> refused_;  // O_DIRECT descriptors refused: read through the cache since

  DriverStatus context_{};  // the queuer's making the device current

  std::mutex close_mutex_;  // held through close(): a second close waits for the first
  mutable std::mutex mutex_;
  std::condition_variable work_;   // a job queued, or closing
  std::condition_variable ended_;  // a job ended
  std::deque<Active*> queued_;     // not taken by the queuer yet (jobs_ owns them)
  std::unordered_map<std::uint64_t, std::unique_ptr<Active>> jobs_;  // not forgotten
  std::uint64_t next_ = 1;
  std::size_t unended_ = 0;  // jobs queued and not ended
  std::size_t bytes_copied_ = 0;
  std::uint64_t pieces_read_ = 0;
  std::uint64_t reads_handed_ = 0;
  bool closing_ = false;
  bool closed_ = false;
  std::thread queuer_;
  const long creator_;  // the process that made the pump (getpid)
};

}  // namespace aimdo
