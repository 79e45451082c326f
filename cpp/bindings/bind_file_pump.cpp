// FilePump as Python sees it (aimdo.torch's FileStream): the ring's buffers are addresses
// the caller keeps alive until close() returns. A job's destination and events are kept
// alive here (`keep`, any Python object holding them) until the job has ended and is
// forgotten, drained or closed: the pump writes and records them until it ends, whatever
// happens to the caller meanwhile (an interrupt, a Pending dropped). Waits and close
// release the GIL; a wait lets Ctrl-C through every few milliseconds, and its result
// stays until forget(), so an interrupted caller can ask again.
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "aimdo/errors.hpp"
#include "aimdo/file_pump.hpp"
#include "common.hpp"

namespace aimdo::bindings {
namespace {

// (fd, direct_fd or -1, file offset, bytes, file size, mtime_ns, inode, destination offset,
// tensor index)
using PieceTuple = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                              std::int64_t, std::int64_t, std::int64_t, std::int64_t>;
// (status, errno, tensor index, start ns, end ns, O_DIRECT descriptors refused)
using ResultTuple = std::tuple<std::string, int, int, std::int64_t, std::int64_t, std::vector<int>>;

// How long a wait holds the GIL released before it looks for a signal (Ctrl-C).
constexpr std::int64_t kSignalCheckNs = 20'000'000;

const char* status_name(PumpStatus status) {
  switch (status) {
    case PumpStatus::kDone: return "done";
    case PumpStatus::kChanged: return "changed";
    case PumpStatus::kTruncated: return "truncated";
    case PumpStatus::kFailed: return "failed";
    case PumpStatus::kInvalid: return "invalid";
    case PumpStatus::kDriver: return "driver";
    case PumpStatus::kInternal: return "internal";
    case PumpStatus::kCancelled: return "cancelled";
  }
  return "invalid";
}

int descriptor(std::int64_t value, bool may_be_none) {
  if (value < (may_be_none ? -1 : 0) || value > INT32_MAX) {
    throw InvalidArgumentError("a piece's file descriptor is out of range");
  }
  return static_cast<int>(value);
}

class PyFilePump {
 public:
  // In a child made by fork() the pump has no threads, and its locks may be held for ever.
  void require_creator() const {
    if (static_cast<long>(::getpid()) != creator_) {
      throw InvalidStateError("a file pump cannot be used in a child made by fork()");
    }
  }

  PyFilePump(std::shared_ptr<Driver> driver, const IntArg& device,
             const std::vector<std::tuple<std::uint64_t, std::int64_t>>& ring,
             const IntArg& readers, const IntArg& split)
      : device_(to_device(device)) {
    if (readers.overflow != 0 || readers.value < 1 || readers.value > 1024) {
      throw InvalidArgumentError("readers must be from 1 to 1024");
    }
    const std::size_t part = to_size(split, "split");
    std::vector<PumpBuffer> buffers;
    for (const auto& [address, capacity] : ring) {
      buffers.push_back({static_cast<std::uintptr_t>(address), to_size(capacity, "capacity")});
    }
    nb::gil_scoped_release released;
    pump_ = std::make_unique<FilePump>(std::move(driver), device_, std::move(buffers),
                                       static_cast<int>(readers.value), part);
  }

  // Dropped with the GIL held: the pump's threads never take it, so closing here is safe.
  // What the jobs kept alive goes after the pump has stopped.
  // In a child made by fork(), the pump is let go unfreed: its threads are the parent's,
  // and destroying its copies of their locks and condition variables can wait for ever.
  ~PyFilePump() {
    if (static_cast<long>(::getpid()) != creator_) {
      pump_->close();  // lets the threads' handles go, nothing more
      (void)pump_.release();
    } else {
      nb::gil_scoped_release released;
      pump_.reset();
    }
    let_go_of_kept();
  }

  std::uint64_t queue(const std::vector<PieceTuple>& pieces, std::uint64_t base,
                      std::uintptr_t stream, std::uintptr_t after, std::uintptr_t start,
                      std::uintptr_t done, bool timed, nb::object keep) {
    require_creator();
    PumpJob job = job_of(pieces);
    aim(job, base, stream, after, start, done, timed);
    return queued(std::move(job), std::move(keep));
  }

  // A held job: read ahead, its destination and events given later by attach().
  std::uint64_t queue_held(const std::vector<PieceTuple>& pieces) {
    require_creator();
    PumpJob job = job_of(pieces);
    job.held = true;
    return queued(std::move(job), nb::none());
  }

  void attach(std::uint64_t number, std::uint64_t base, std::uintptr_t stream, std::uintptr_t after,
              std::uintptr_t start, std::uintptr_t done, bool timed, nb::object keep) {
    require_creator();
    PumpJob targets;
    aim(targets, base, stream, after, start, done, timed);
    const auto found = kept_.find(number);  // made when it was queued: nothing allocated
    if (found == kept_.end()) {
      throw InvalidArgumentError("job " + std::to_string(number) + " is not a held job queued");
    }
    nb::object before = std::exchange(found->second, std::move(keep));
    try {
      pump_->attach(number, targets);
    } catch (...) {
      std::swap(found->second, before);  // not attached: it keeps nothing new
      throw;
    }
  }

  void cancel(std::uint64_t number) {
    require_creator();
    pump_->cancel(number);
  }

  void cancel_held() {
    require_creator();
    pump_->cancel_held();
  }

 private:
  // Where a job's copies go and what orders them (queue's and attach's arguments).
  static void aim(PumpJob& job, std::uint64_t base, std::uintptr_t stream, std::uintptr_t after,
                  std::uintptr_t start, std::uintptr_t done, bool timed) {
    job.base = base;
    job.stream = stream;
    job.after = after;
    job.start = start;
    job.done = done;
    job.timed = timed;
  }

  static PumpJob job_of(const std::vector<PieceTuple>& pieces) {
    PumpJob job;
    job.pieces.reserve(pieces.size());
    for (const auto& [fd, direct, offset, count, size, mtime, inode, at, tensor] : pieces) {
      PumpPiece piece;
      piece.read.fd = descriptor(fd, false);
      piece.read.direct_fd = descriptor(direct, true);
      if (offset < 0 || count <= 0 || at < 0 || inode < 0 || tensor < 0 || tensor > INT32_MAX) {
        throw InvalidArgumentError("a piece's offset, bytes, inode or tensor is out of range");
      }
      piece.read.offset = offset;
      piece.read.count = static_cast<std::size_t>(count);
      piece.read.size = size;
      piece.read.mtime_ns = mtime;
      piece.read.inode = static_cast<std::uint64_t>(inode);
      piece.destination = static_cast<std::uint64_t>(at);
      piece.tensor = static_cast<int>(tensor);
      job.pieces.push_back(piece);
    }
    return job;
  }

  std::uint64_t queued(PumpJob job, nb::object keep) {
    // Everything keeping `keep` may need is allocated before the job is queued: once it is,
    // nothing may fail to hold what the pump writes into.
    std::unordered_map<std::uint64_t, nb::object> made;
    made.emplace(0, std::move(keep));
    auto node = made.extract(made.begin());
    kept_.reserve(kept_.size() + 1);
    const std::uint64_t number = pump_->queue(std::move(job));
    node.key() = number;
    kept_.insert(std::move(node));
    return number;
  }

 public:
  // Waits until the job ended (the GIL released unless it has), then its result, as often
  // as asked until forget(): a driver's refusal is raised as DriverError, a read's
  // failure is returned.
  ResultTuple result(std::uint64_t job) {
    require_creator();
    while (!pump_->wait(job, 0)) {
      bool ended = false;
      {
        nb::gil_scoped_release released;
        ended = pump_->wait(job, kSignalCheckNs);
      }
      if (ended) break;
      if (PyErr_CheckSignals() != 0) throw nb::python_error();
    }
    PumpResult result = pump_->result(job);
    if (result.status == PumpStatus::kDriver) {
      throw DriverError(std::string("copying checkpoint bytes to device ") +
                            std::to_string(device_) + ": " + result.operation + " failed with " +
                            result.driver.name,
                        device_, result.operation, result.driver);
    }
    return {status_name(result.status),
            result.error,
            result.tensor,
            result.start_ns,
            result.end_ns,
            std::move(result.refused_direct)};
  }

  // Forget an ended job: its result, and what it kept alive.
  void forget(std::uint64_t job) {
    require_creator();
    pump_->forget(job);
    const auto found = kept_.find(job);
    if (found != kept_.end()) {
      nb::object gone = std::move(found->second);  // dropped after the map is consistent
      kept_.erase(found);
    }
  }

  bool ended(std::uint64_t job) {
    require_creator();
    return pump_->ended(job);
  }

  // Waits until every job queued so far has ended; lets go of what they kept alive (their
  // results stay until forgotten).
  void drain() {
    require_creator();
    {
      nb::gil_scoped_release released;
      pump_->drain();
    }
    release_ended();
  }

  std::size_t kept() const { return kept_.size(); }

  std::size_t take_bytes_copied() { return pump_->take_bytes_copied(); }
  std::uint64_t pieces_read() const { return pump_->pieces_read(); }
  std::uint64_t reads() const { return pump_->reads(); }

  // Every job has ended once the pump is closed: nothing writes or records any more.
  void close() {
    try {
      nb::gil_scoped_release released;
      pump_->close();
    } catch (...) {
      let_go_of_kept();
      throw;
    }
    let_go_of_kept();
  }

  bool closed() const { return static_cast<long>(::getpid()) != creator_ || pump_->closed(); }

 private:
  // What the ended jobs kept alive, let go. The objects are dropped once the map is
  // consistent again: dropping one may run Python, which may call this pump.
  void release_ended() {
    std::vector<nb::object> gone;
    for (auto it = kept_.begin(); it != kept_.end();) {
      if (pump_->ended(it->first)) {
        gone.push_back(std::move(it->second));
        it = kept_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void let_go_of_kept() {
    std::unordered_map<std::uint64_t, nb::object> gone;
    gone.swap(kept_);
  }

  int device_;
  long creator_ = static_cast<long>(::getpid());
  std::unique_ptr<FilePump> pump_;
  std::unordered_map<std::uint64_t, nb::object> kept_;  // job -> what it keeps alive
};

}  // namespace

void bind_file_pump(nb::module_& m) {
  nb::class_<PyFilePump>(m, "FilePump",
                         "Reads checkpoint pieces into a ring of pinned buffers and queues "
                         "their copies to a device, on threads that never take the GIL "
                         "(aimdo.torch's FileStream).")
      .def(nb::init<std::shared_ptr<Driver>, const IntArg&,
                    const std::vector<std::tuple<std::uint64_t, std::int64_t>>&, const IntArg&,
                    const IntArg&>(),
           "driver"_a, "device"_a, "ring"_a, "readers"_a, "split"_a = IntArg{0, 0},
           "Copies to `device` through `driver`, reading into the ring's (address, bytes) "
           "buffers with `readers` threads; the caller keeps the ring alive until close(). "
           "`split` > 0: a piece read through the page cache larger than that many bytes "
           "is read in parts of that many (in no more parts than `readers`), by the readers "
           "at once.")
      .def("queue", &PyFilePump::queue, "pieces"_a, "base"_a, "stream"_a, "after"_a, "start"_a,
           "done"_a, "timed"_a, "keep"_a = nb::none(),
           "Queue one job: its pieces (fd, direct fd or -1, file offset, bytes, the file's "
           "size, mtime_ns and inode, offset from `base` of the destination, tensor index), "
           "copied on `stream` after the event `after` (0: none), `start` recorded before "
           "the first copy and `done` after the last (0: none); `keep` is held until the "
           "job has ended and is forgotten, drained or closed; returns its number.")
      .def("queue_held", &PyFilePump::queue_held, "pieces"_a,
           "Queue a held job (read ahead): its pieces (as queue's, their destinations "
           "offsets from the base attach gives) are read into the ring, where they and the "
           "jobs after them wait until attach() or cancel(); returns its number.")
      .def("attach", &PyFilePump::attach, "job"_a, "base"_a, "stream"_a, "after"_a, "start"_a,
           "done"_a, "timed"_a, "keep"_a = nb::none(),
           "Give a held job its destination `base`, stream and events (as queue's): its "
           "pieces are copied, those read already first. ValueError for a job not queued "
           "held, or attached or cancelled already.")
      .def("cancel", &PyFilePump::cancel, "job"_a,
           "Drop a held job not attached: its reads end, nothing is copied, and its result "
           "is 'cancelled'. ValueError for a job not queued held, or attached.")
      .def("result", &PyFilePump::result, "job"_a,
           "Wait until the job ended, then its (status, errno, tensor index, start ns, end ns, "
           "O_DIRECT descriptors refused); status is 'done', 'changed', 'truncated', "
           "'failed', 'invalid', 'internal' or 'cancelled'. DriverError when the driver refused "
           "its copy "
           "or events. Answered again until forget().")
      .def("forget", &PyFilePump::forget, "job"_a,
           "Forget an ended job: its result and what it kept alive.")
      .def("ended", &PyFilePump::ended, "job"_a,
           "Whether the job has ended (True for one forgotten or never queued).")
      .def_prop_ro("kept", &PyFilePump::kept, "Jobs whose `keep` is still held.")
      .def("cancel_held", &PyFilePump::cancel_held,
           "Cancel every held job not attached (as cancel() each); returns at once.")
      .def("drain", &PyFilePump::drain,
           "Return once every job queued so far has ended, letting go of what they kept; the "
           "held jobs not attached are cancelled.")
      .def("take_bytes_copied", &PyFilePump::take_bytes_copied,
           "Bytes whose copies were queued since the last call.")
      .def_prop_ro("pieces_read", &PyFilePump::pieces_read)
      .def_prop_ro("reads", &PyFilePump::reads,
                   "Reads handed to the readers so far: one a piece, or one a part of a piece "
                   "read in parts (`split`).")
      .def("close", &PyFilePump::close,
           "End the jobs queued, stop the threads, wait for the copies reading the ring and "
           "destroy its events; then the ring may be given back.")
      .def_prop_ro("closed", &PyFilePump::closed);
}

}  // namespace aimdo::bindings
