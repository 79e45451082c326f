// FileReads as Python sees it: a read's destination is a writable, contiguous buffer
// (a memoryview of a ring buffer), held from submit until its result is taken, so a read
// never writes into memory Python has let go. Waits and close release the GIL.
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>

#include "aimdo/errors.hpp"
#include "aimdo/file_reads.hpp"
#include "common.hpp"

namespace aimdo::bindings {
namespace {

// A Py_buffer released (GIL held) when it dies, once taken.
struct HeldBuffer {
  Py_buffer view{};
  bool taken = false;
  HeldBuffer() = default;
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;
  ~HeldBuffer() {
    if (taken) PyBuffer_Release(&view);
  }
};

// (status, errno, lead, direct_refused)
using ResultTuple = std::tuple<std::string, int, std::int64_t, bool>;

const char* status_name(ReadStatus status) {
  switch (status) {
    case ReadStatus::kDone: return "done";
    case ReadStatus::kChanged: return "changed";
    case ReadStatus::kTruncated: return "truncated";
    case ReadStatus::kFailed: return "failed";
    case ReadStatus::kInvalid: return "invalid";
  }
  return "invalid";
}

class PyFileReads {
 public:
  explicit PyFileReads(const IntArg& threads) {
    if (threads.overflow != 0 || threads.value < 1 || threads.value > 1024) {
      throw InvalidArgumentError("threads must be from 1 to 1024");
    }
    reads_ = std::make_unique<FileReads>(static_cast<int>(threads.value));
  }

  // Dropped with the GIL held (at worst at the interpreter's exit): the reads in flight
  // end, then their buffers are released. The readers never take the GIL.
  // In a child made by fork(), the reads are let go unfreed (see ~PyFilePump).
  ~PyFileReads() {
    reads_->close();
    if (static_cast<long>(::getpid()) != creator_) (void)reads_.release();
    held_.clear();
  }

  std::uint64_t submit(const IntArg& fd, const IntArg& direct_fd, const IntArg& offset,
                       const IntArg& count, nb::handle into, const IntArg& size,
                       const IntArg& mtime_ns, const IntArg& inode) {
    ReadRequest request;
    if (fd.overflow != 0 || fd.value < 0 || fd.value > INT32_MAX) {
      throw InvalidArgumentError("fd must be an open file descriptor");
    }
    if (direct_fd.overflow != 0 || direct_fd.value < -1 || direct_fd.value > INT32_MAX) {
      throw InvalidArgumentError("direct_fd must be a file descriptor or -1");
    }
    if (offset.overflow != 0 || offset.value < 0) {
      throw InvalidArgumentError("offset must not be negative");
    }
    if (size.overflow != 0 || mtime_ns.overflow != 0 || inode.overflow != 0 || inode.value < 0) {
      throw InvalidArgumentError("the stamp (size, mtime_ns, inode) is out of range");
    }
    request.fd = static_cast<int>(fd.value);
    request.direct_fd = static_cast<int>(direct_fd.value);
    request.offset = offset.value;
    request.count = to_size(count, "count");
    request.size = size.value;
    request.mtime_ns = mtime_ns.value;
    request.inode = static_cast<std::uint64_t>(inode.value);
    auto held = std::make_unique<HeldBuffer>();
    if (PyObject_GetBuffer(into.ptr(), &held->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw nb::type_error("into must be a writable, contiguous buffer");
    }
    held->taken = true;
    request.into = reinterpret_cast<std::uintptr_t>(held->view.buf);
    request.capacity = static_cast<std::size_t>(held->view.len);
    if (request.count > request.capacity) {
      throw InvalidArgumentError("count is larger than the buffer read into");
    }
    const std::uint64_t ticket = reads_->submit(request);
    held_.emplace(ticket, std::move(held));
    return ticket;
  }

  // A read done already is answered with the GIL held: letting it go would hand it to
  // the forward's thread, and taking it back can cost the caller a whole switch interval.
  bool wait(const IntArg& ticket) {
    const std::uint64_t t = ticket_of(ticket);
    if (reads_->done(t)) return true;
    nb::gil_scoped_release released;
    return reads_->wait(t);
  }

  void poke() { reads_->poke(); }

  ResultTuple take(const IntArg& ticket) {
    const std::uint64_t t = ticket_of(ticket);
    const ReadResult result = reads_->take(t);
    held_.erase(t);
    return {status_name(result.status), result.error, static_cast<std::int64_t>(result.lead),
            result.direct_refused};
  }

  void close() {
    nb::gil_scoped_release released;
    reads_->close();
  }

  bool closed() const { return reads_->closed(); }

 private:
  static std::uint64_t ticket_of(const IntArg& ticket) {
    if (ticket.overflow != 0 || ticket.value < 1) {
      throw InvalidArgumentError("not a ticket of these reads");
    }
    return static_cast<std::uint64_t>(ticket.value);
  }

  long creator_ = static_cast<long>(::getpid());
  std::unique_ptr<FileReads> reads_;
  std::unordered_map<std::uint64_t, std::unique_ptr<HeldBuffer>> held_;
};

}  // namespace

void bind_file_reads(nb::module_& m) {
  nb::class_<PyFileReads>(m, "FileReads",
                          "Reads of checkpoint files on threads that never take the GIL "
                          "(aimdo.torch's FileStream).")
      .def(nb::init<const IntArg&>(), "threads"_a)
      .def("submit", &PyFileReads::submit, "fd"_a, "direct_fd"_a, "offset"_a, "count"_a, "into"_a,
           "size"_a, "mtime_ns"_a, "inode"_a,
           "Queue a read of `count` bytes of the file from `offset` into the buffer `into` "
           "(with `direct_fd` >= 0: O_DIRECT, the aligned range around them, into an "
           "aligned buffer of count + 8192 bytes), after checking the file's stamp; "
           "returns its ticket.")
      .def("wait", &PyFileReads::wait, "ticket"_a,
           "Wait (GIL released) until the ticket's read is done (True) or poke() was "
           "called since the last wait returned (False). A read done already returns "
           "True at once, the GIL kept.")
      .def("poke", &PyFileReads::poke, "Wake the wait in progress, or the next one.")
      .def("take", &PyFileReads::take, "ticket"_a,
           "A done read's (status, errno, lead, direct_refused), forgotten once taken; "
           "status is 'done', 'changed', 'truncated', 'failed' or 'invalid'.")
      .def("close", &PyFileReads::close, "Read what is queued, then stop the threads.")
      .def_prop_ro("closed", &PyFileReads::closed);
}

}  // namespace aimdo::bindings
