"""Blocks whose weights stay in their checkpoint files (``offload(..., host_limit=...)``;
design.md §7): each copy reads them again, through a small ring of pinned buffers, the
pieces read in parallel and each copied to the device once read. Needs PyTorch; imported
by aimdo.torch only.

A FileStream is called from one thread at a time (its Offload's forward); the copies are
queued by a thread of its own, and the reads run on native threads (NativeReads) that
never take the GIL.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ._core import InvalidStateError
from ._torch_checkpoint import DIRECT_ALIGN, NativeReads, Reader
from ._torch_host import pin_tensor

#: The ring: this many buffers of this many bytes (pinned on CUDA), and this many native
#: threads reading into them at once. Twice as many buffers as readers: while the readers fill
#: half of them, the copies of the pieces read before drain from the other half. Eight
#: readers of 16 MiB read the page cache at 35 GB/s on an H200's host, twice what four
#: did; larger buffers were slower (benchmarks/RESULTS.md, weights from disk).
READERS = 8
RING_BUFFERS = 2 * READERS
RING_BUFFER_BYTES = 16 << 20


def reader_threads() -> int:
    """The ring's reader threads: READERS, but at most half the CPUs this process may run
    on (at least one). A native reader copies from the page cache with the CPU and never
    waits for the GIL, so on a small host eight of them would take the cores the forward's
    thread runs on (benchmarks/RESULTS.md, native readers beside a busy Python thread)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(READERS, cpus // 2))


#: While a FileStream's pump runs, the interpreter's switch interval is lowered to this
#: many seconds, when it is longer; None (the default) leaves it alone. Why, and what it
#: did on an H200: aimdo.torch.set_reading_switch_interval.
DEFAULT_READING_SWITCH_INTERVAL = None
READING_SWITCH_INTERVAL: float | None = DEFAULT_READING_SWITCH_INTERVAL


class _SwitchInterval:
    """The switch interval lowered while any pump runs: the first to start lowers it, the
    last to end puts back what it was, unless someone set another meanwhile."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = None  # (what it was, what we set), while lowered

    def hold(self):
        """Count a pump in (lowering the interval if it is the first); returns its release,
        which counts it out once however often it is called."""
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._holders -= 1
                if self._holders or self._saved is None:
                    return
                before, ours = self._saved
                self._saved = None
                if sys.getswitchinterval() == ours:
                    sys.setswitchinterval(before)

        with self._lock:
            self._holders += 1
            wanted = READING_SWITCH_INTERVAL
            if self._holders == 1 and wanted is not None:
                current = sys.getswitchinterval()
                if current > wanted:
                    sys.setswitchinterval(wanted)
                    self._saved = (current, sys.getswitchinterval())
        return release


_switch = _SwitchInterval()


def set_reading_switch_interval(seconds: float | None) -> None:
    """See aimdo.torch.set_reading_switch_interval."""
    global READING_SWITCH_INTERVAL
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"the switch interval is seconds or None, got {seconds!r}")
        if not 0 < seconds < float("inf"):
            raise ValueError(f"the switch interval must be positive seconds, got {seconds!r}")
        seconds = float(seconds)
    READING_SWITCH_INTERVAL = seconds


class _Buffer:
    def __init__(self, whole: torch.Tensor, tensor: torch.Tensor, unpin):
        # The memory pinned, held here: its pinning ends when it dies (a view does not keep
        # it alive under torch.inference_mode).
        self.whole = whole
        self.tensor = tensor  # reads land here; with O_DIRECT, an aligned view of `whole`
        self.nbytes = whole.numel()  # bytes held (pinned on CUDA)
        self.unpin = unpin  # gives the pinning back (None on a simulator)
        self.free = None  # a CUDA event: the copy that last read it is done (None: free)


class Pending:
    """A block's copy queued on a FileStream (the Executor's token for it): `result()`
    waits until its pieces are read and their copies queued, and returns (the event the
    copy's end records on CUDA, else None; the start and end marks when timed, else None).
    A failed read raises there, in the forward's thread."""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future

    def result(self):
        return self.future.result()


class _Job:
    """One block's copy: its pieces still to read, where they go, and its Future."""

    __slots__ = ("pieces", "storage", "stream", "after", "timed", "future", "reads")
    __slots__ += ("exhausted", "started", "start", "error")

    def __init__(self, block, storage, stream, after, timed: bool, piece: int):
        self.pieces = iter(
            [
                (offset + start, tensor, start, min(piece, tensor.nbytes - start))
                for offset, tensor in block.file_runs
                for start in range(0, tensor.nbytes, piece)
            ]
        )
        self.storage, self.stream, self.after, self.timed = storage, stream, after, timed
        self.future = Future()
        self.reads = 0  # its pieces being read now
        self.exhausted = False  # every piece of it handed to a reader (or dropped)
        self.started = False  # its first copy queued (`after` waited for first)
        self.start = None  # timed: the mark its first copy starts at
        self.error = None  # the first read of it that failed


class FileStream:
    """Copies blocks from their checkpoint files (``TorchBlock.file_runs``) into device
    memory: each run cut into pieces of at most one buffer, read by READERS native threads
    into the ring's buffers (a buffer handed to a read once the copy that last read it is
    done), each piece's copy queued as soon as its read is done, in order.

    One pipeline for every block queued (design.md §7, host tiers): the blocks' copies are
    queued in order by one thread of the stream's own, which keeps the ring's buffers all
    reading, from one block into the next, so that no block's reads wait for the copies of
    the block before it to drain."""

    def __init__(self, stamps, pin: bool, largest: int | None = None, direct: bool = False):
        self.reader = Reader(stamps, direct)
        self.pin = pin
        self.direct = direct  # read with O_DIRECT (NativeReads), past the page cache
        # Each buffer: RING_BUFFER_BYTES, or the largest tensor read when that is smaller.
        self.buffer_bytes = (
            RING_BUFFER_BYTES if largest is None else min(RING_BUFFER_BYTES, max(1, largest))
        )
        self.buffers: list[_Buffer] = []
        self.reads = None  # the ring's reads, made with the ring
        self.make_reads = NativeReads  # (reader, threads): the ring's reads (a test's fake)
        self.turn = 0  # the buffer the next piece takes
        self.worker = None  # one thread: the pump, queueing the copies in order
        self._lock = threading.Lock()
        self._queued: deque[_Job] = deque()  # jobs the pump has not taken yet
        self._pumping = False  # a pump runs (or is submitted) and will take what is queued
        self.bytes_read = 0  # since the last take_bytes_read
        self.closed = False
        # A stream dropped without close (its module dropped without undo) still gives
        # its files back; its buffers unpin themselves as they die.
        weakref.finalize(self, self.reader.close)

    @property
    def nbytes(self) -> int:
        """Bytes of the ring's buffers held now."""
        return sum(buffer.nbytes for buffer in self.buffers)

    def _ring(self) -> list[_Buffer]:
        """The ring, made at the first copy: all of it, or (pinning failed) none of it."""
        if not self.buffers:
            made = []
            try:
                for _ in range(RING_BUFFERS):
                    # With O_DIRECT: room to align the start, and two alignments to read.
                    slack = 3 * DIRECT_ALIGN if self.direct else 0
                    whole = torch.empty(self.buffer_bytes + slack, dtype=torch.uint8)
                    unpin = pin_tensor(whole) if self.pin else None
                    tensor = whole
                    if self.direct:
                        start = -whole.data_ptr() % DIRECT_ALIGN
                        tensor = whole[start : start + self.buffer_bytes + 2 * DIRECT_ALIGN]
                    made.append(_Buffer(whole, tensor, unpin))
            except BaseException:
                for buffer in made:
                    if buffer.unpin is not None:
                        buffer.unpin()
                raise
            self.reads = self.make_reads(self.reader, reader_threads())
            self.buffers = made
        return self.buffers

    def copy_in(self, block, storage: torch.Tensor) -> None:
        """Queue the copy of `block`'s file runs into `storage` on the current stream and
        wait until its pieces are read and their copies queued (done, on a simulator). The
        jobs queued before it are handed their pieces first; on CUDA their copies are on
        their own streams, ordered with this one only by events the caller arranges.
        CheckpointError from a read (the file changed or ends early): the copies queued
        before it are left to finish. Interrupted or failed, it returns only once nothing
        queued still writes (as the Executor's _settled does for copies ahead)."""
        stream = torch.cuda.current_stream(storage.device) if storage.is_cuda else None
        pending = self._queue(_Job(block, storage, stream, None, False, self.buffer_bytes))
        try:
            pending.result()
        except BaseException:
            drain_after_failure(self.drain)
            raise

    def copy_ahead(self, block, storage: torch.Tensor, stream, after, timed: bool) -> Pending:
        """Queue the copy of `block`'s file runs into `storage` (on CUDA, on `stream`, or
        the current one when None, after the event `after`, or nothing), read and queued
        by the stream's own threads while the forward's thread goes on queueing compute.
        Blocks are copied in the order queued. Returns the Pending the block's compute
        waits for."""
        if storage.is_cuda and stream is None:
            stream = torch.cuda.current_stream(storage.device)
        return self._queue(_Job(block, storage, stream, after, timed, self.buffer_bytes))

    def _queue(self, job: _Job) -> Pending:
        if self.closed:
            raise InvalidStateError("this offload's checkpoint stream is closed (undone)")
        self._ring()
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="aimdo-files")
        with self._lock:
            self._queued.append(job)
            start = not self._pumping
            self._pumping = True
        self.reads.poke()  # a pump waiting on a read takes the job at once
        if start:
            release = None
            try:
                release = _switch.hold()  # the pump releases it as it ends
                self.worker.submit(self._pump, release)
            except BaseException:
                # No pump will run (an interrupt, or shutting down): take the job back,
                # so that the next job starts a pump and drain() waits for nothing. (Had
                # the pump been queued after all, its own release then counts nothing: a
                # release counts once.)
                with self._lock:
                    if job in self._queued:
                        self._queued.remove(job)
                    self._pumping = False
                if release is not None:
                    release()
                raise
        return Pending(job.future)

    def _pump(self, release) -> None:
        """Read and copy the queued jobs' pieces, as many at once as the ring has buffers,
        until nothing is queued or reading; then end (a new job starts a new pump), giving
        back its hold on the switch interval."""
        try:
            self._pump_jobs()
        finally:
            release()

    def _pump_jobs(self) -> None:
        ring = self.buffers
        reading: deque = deque()  # (job, offset in storage, bytes, buffer, read's ticket)
        jobs: deque[_Job] = deque()  # taken, not yet finished, in order
        try:
            while True:
                with self._lock:
                    jobs.extend(self._queued)
                    self._queued.clear()
                    if not jobs:  # every job finished (so none reading): done
                        self._pumping = False
                        return
                # Hand pieces to the readers, from the first job with pieces left.
                while len(reading) < len(ring):
                    job = next((job for job in jobs if not job.exhausted), None)
                    if job is None:
                        break
                    piece = next(job.pieces, None) if job.error is None else None
                    if piece is None:
                        job.exhausted = True
                        continue
                    offset, tensor, start, count = piece
                    buffer = ring[self.turn]
                    self.turn = (self.turn + 1) % len(ring)
                    self._wait_free(job, buffer)
                    try:
                        ticket = self.reads.submit(tensor, buffer.tensor, start, count)
                    except Exception as error:  # noqa: BLE001 - the job's (a file not opened)
                        job.error = job.error or error
                        job.exhausted = True  # its pieces not read yet are dropped
                        continue
                    job.reads += 1
                    reading.append((job, offset, count, buffer, ticket))
                if reading:
                    # Until the first read ends, or a job is queued (a poke).
                    if not self.reads.wait(reading[0][-1]):
                        continue  # hand the new job's pieces out first
                    job, offset, count, buffer, ticket = reading.popleft()
                    job.reads -= 1
                    lead = 0
                    try:
                        lead = self.reads.take(ticket)
                    except Exception as error:  # noqa: BLE001 - the job's, raised by take()
                        job.error = job.error or error
                        job.exhausted = True  # its pieces not read yet are dropped
                    if job.error is None:
                        self._copy(job, offset, count, buffer, lead)
                # Finish, in order, the jobs whose pieces are all read and copied (each
                # left in `jobs` until settled: a failure below still fails it).
                while jobs and jobs[0].exhausted and jobs[0].reads == 0:
                    self._finish(jobs[0])
                    jobs.popleft()
        except BaseException as error:
            # Not a read's failure (those fail their job): fail every job taken or queued,
            # once no reader writes into the ring any more.
            for entry in reading:
                while not self.reads.wait(entry[-1]):
                    pass  # a poke: the read is still running
                try:
                    self.reads.take(entry[-1])
                except Exception:  # noqa: BLE001, S110 - the jobs fail with `error` below
                    pass
            with self._lock:
                jobs.extend(self._queued)
                self._queued.clear()
                self._pumping = False
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)

    @staticmethod
    def _wait_free(job: _Job, buffer: _Buffer) -> None:
        """Before a piece is read into `buffer`: wait for the copy that last read it (it
        is queued already: pieces are copied in the order read, the ring reused in that
        order). Never waits on a job not finished: the copies ahead of it on the stream
        wait only for the compute of blocks whose jobs came first."""
        busy, buffer.free = buffer.free, None
        if busy is not None and not busy.query():
            with torch.cuda.device(job.storage.device):
                busy.synchronize()  # without the GIL

    def _copy(self, job: _Job, offset: int, count: int, buffer: _Buffer, lead: int) -> None:
        """Queue one piece's copy, from `buffer` (its bytes from `lead` on) into `job`'s
        storage at `offset`."""
        target = job.storage[offset : offset + count]
        source = buffer.tensor[lead : lead + count]
        if job.stream is None:  # a simulator: the copy is done when it returns
            if not job.started and job.timed:
                job.start = time.perf_counter()
            job.started = True
            target.copy_(source)
        else:
            with torch.cuda.device(job.storage.device), torch.cuda.stream(job.stream):
                self._begin(job)
                free = torch.cuda.Event()  # made first: once the copy is queued, it records
                target.copy_(source, non_blocking=True)
                buffer.free = free
                free.record(job.stream)
        with self._lock:
            self.bytes_read += count

    @staticmethod
    def _begin(job: _Job) -> None:
        """Before a job's first copy (on its stream, device current): wait for `after`,
        and mark the start when timed."""
        if job.started:
            return
        job.started = True
        if job.after is not None:
            job.stream.wait_event(job.after)
        if job.timed:
            job.start = torch.cuda.Event(enable_timing=True)
            job.start.record(job.stream)

    def _finish(self, job: _Job) -> None:
        """Settle `job`'s future: its error, or its end (an event recorded after its
        copies on CUDA) and, timed, its marks."""
        if job.error is not None:
            job.future.set_exception(job.error)
            return
        if job.stream is None:
            end = time.perf_counter() if job.timed else None
            start = job.start if job.start is not None else end
            job.future.set_result((None, start, end))
            return
        with torch.cuda.device(job.storage.device), torch.cuda.stream(job.stream):
            self._begin(job)  # nothing was copied: still after `after`
            done = torch.cuda.Event(enable_timing=job.timed)
            done.record(job.stream)
        if job.timed:
            start = job.start if job.start is not None else done
            job.future.set_result((done, start, done))
        else:
            job.future.set_result((done, None, None))

    def drain(self) -> None:
        """Return once every copy queued is queued on its stream (its reads done), failed
        or not."""
        if self.worker is not None:
            self.worker.submit(_nothing).result()

    def take_bytes_read(self) -> int:
        with self._lock:
            taken, self.bytes_read = self.bytes_read, 0
        return taken

    def close(self) -> None:
        """Wait for the copies that read the ring, stop the readers, give the ring and the
        files back; the stream takes no copy after. The caller has synchronized the device
        already, or does not mind. Every step is taken even if one fails; the first
        failure is raised at the end."""
        self.closed = True
        failure = None

        def step(action) -> None:
            nonlocal failure
            try:
                action()
            except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                failure = failure or error

        if self.worker is not None:
            step(lambda: self.worker.shutdown(wait=True))
            self.worker = None
        for buffer in self.buffers:
            if buffer.free is not None:
                step(buffer.free.synchronize)
            if buffer.unpin is not None:
                step(buffer.unpin)
        self.buffers = []
        if self.reads is not None:
            step(self.reads.close)
            self.reads = None
        step(self.reader.close)
        if failure is not None:
            raise failure


def drain_after_failure(drain) -> None:
    """After a copy failed or its wait was interrupted: `drain()` until the copies queued
    meanwhile are queued, so that nothing they write into is given back under them. An
    interrupt while draining drains again (bounded: the reads end); a failure of the
    drain itself is dropped, the first failure is the one raised."""
    while True:
        try:
            drain()
            return
        except KeyboardInterrupt:
            continue
        except Exception:  # noqa: BLE001 - the caller raises the first failure
            return


def _nothing() -> None:
    return None
