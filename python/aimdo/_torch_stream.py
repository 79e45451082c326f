"""Blocks whose weights stay in their checkpoint files (``offload(..., host_limit=...)``;
design.md §7): each copy reads them again, through a small ring of pinned buffers, the
pieces read in parallel and each copied to the device once read. Needs PyTorch; imported
by aimdo.torch only.

A FileStream is called from one thread at a time (its Offload's forward); the reads and
the copies run on the native threads of aimdo._core.FilePump, which never take the GIL:
the forward's thread hands it one job per block and never waits for their Python, nor
they for its.
"""

from __future__ import annotations

import collections
import contextlib
import os
import warnings
import weakref

import torch

from . import _core
from ._core import InvalidStateError
from ._torch_checkpoint import DIRECT_ALIGN, Reader, raise_for_read
from ._torch_host import pin_tensor

#: The ring: this many buffers of this many bytes (pinned on CUDA), and up to this many
#: native threads reading into them at once. Twice as many buffers as readers: while the
#: readers fill half of them, the copies of the pieces read before drain from the other
#: half. Larger buffers were slower (benchmarks/RESULTS.md, weights from disk). With the
#: copies queued natively, 12 readers against 8 took the 35 GiB synthetic model at
#: host_limit 8 GiB from 339 to 315 ms a step on an H200's 16-core host (16: 316 ms), and
#: Qwen-Image from 501 to 485 ms with 16 (benchmarks/RESULTS.md, the native pump). Beside
#: pinned copies, 12 readers take 14% of the copies' bandwidth and read no faster than 8
#: (benchmarks.dma_beside_reads), yet in the pipeline, where a block's reads start only
#: once its copy is queued, 12 still beat 8 (314.7 against 324.7 ms; ninth session).
READERS = 12
RING_BUFFERS = 2 * READERS
RING_BUFFER_BYTES = 16 << 20
#: More buffers for models with large blocks: the ring's bytes are at least this many times
#: the bytes of the largest block streamed, so that half of them (READ_AHEAD_SHARE, the
#: bytes read ahead) take two such blocks, in at most RING_MOST_BUFFERS buffers (1 GiB of
#: 16 MiB ones). Counted in bytes, not in pieces (a piece takes a whole buffer, and each
#: tensor's last piece is smaller), the ring holds a little less than four such blocks. With
#: 16 MiB buffers, blocks of up to 96 MiB keep the 24 buffers; the 35 GiB synthetic model's
#: 200 MiB blocks take 50 (800 MiB), Qwen-Image's 108 MiB ones 28 (448 MiB). On an H200,
#: rings of 768-800 MiB took the synthetic model's step at host_limit 8 GiB to a median
#: 1.082x the all-pinned one over seven runs, against 1.106x over eight for 384 MiB; counted
#: in pieces, Qwen-Image's ring (512 MiB) would have taken its peak RSS past host_limit +
#: 2 GiB, where 448 MiB left it 61 MB (benchmarks/RESULTS.md, twelfth session).
RING_BLOCKS = 4
RING_MOST_BUFFERS = 64
#: Cores left to the rest of the process (the forward's thread, the pump, PyTorch's own).
SPARE_CPUS = 4
#: Bytes of the parts a piece read through the page cache is read in (in no more parts
#: than the ring has readers), each part by whichever reader is free, so that the readers
#: work on the first pieces of the ring together (FilePump's `split`); 0: each piece whole,
#: by one reader. A reader copies a few GB/s from the page cache, so one 16 MiB piece takes
#: it about 4-5 ms, and the pieces being read at once (one a reader: twelve on an H200's
#: host) hold half of a 384 MiB ring. Off: on an H200, parts of 2 MiB took the synthetic
#: 35 GiB model at host_limit 8 GiB from 298.2 to 318.1 ms a step (median of two runs
#: each; benchmarks/RESULTS.md, twelfth session).
READ_SPLIT_BYTES = 0
#: Bytes of the blocks foreseen read ahead of their copies (FileStream.read_ahead_bytes:
#: None, the ring's bytes; 0, none; "auto", READ_AHEAD_SHARE of the ring's bytes while the
#: offload's prefetch window (FileStream.window) is at most READ_AHEAD_WINDOW copies, else
#: none). Read-ahead extends a shallow window's reads without staging memory, and competes
#: with a deep window's copies for the ring: a block read ahead holds its buffers until its
#: copy is queued, and the ring is taken in order. Measured on an H200, the 35 GiB
#: synthetic model at host_limit 8 GiB, one run (benchmarks/RESULTS.md, seventh session):
#: 192 MiB read ahead took prefetch 1 from 344.0 to 309.9 ms a step and prefetch 4 from
#: 328.5 to 343.3 ms (all pinned: 282.1 and 293.0); with the depth chosen (2), 294.6 ms
#: against 270.5 all pinned. The ring's whole 384 MiB ahead of every depth had taken
#: Qwen-Image from about 483 to 594 ms (sixth session).
READ_AHEAD_BYTES: int | str | None = "auto"
READ_AHEAD_WINDOW = 2
READ_AHEAD_SHARE = 0.5


def buffer_bytes_for(largest: int | None) -> int:
    """A ring buffer's bytes: RING_BUFFER_BYTES, or the largest tensor read (`largest`
    bytes) when that is smaller."""
    return RING_BUFFER_BYTES if largest is None else min(RING_BUFFER_BYTES, max(1, largest))


def ring_buffers(buffer_bytes: int, largest_block: int) -> int:
    """The ring's buffers of buffer_bytes each: RING_BUFFERS, or as many as RING_BLOCKS
    times the bytes of the largest block streamed (`largest_block`) where that is more, up
    to RING_MOST_BUFFERS."""
    wanted = -(-RING_BLOCKS * largest_block // buffer_bytes)
    return max(RING_BUFFERS, min(wanted, RING_MOST_BUFFERS))


def ring_bytes_for(largest: int | None, largest_block: int) -> int:
    """The bytes of the ring a FileStream given `largest` and `largest_block` pins at its
    first copy (FileStream.ring_bytes), known before it is made."""
    each = buffer_bytes_for(largest)
    return ring_buffers(each, largest_block) * each


def reader_threads() -> int:
    """The ring's reader threads: READERS, but no more than the CPUs this process may run
    on less SPARE_CPUS, nor than half of them where that is more (at least one). A native
    reader copies from the page cache with the CPU and never waits for the GIL, so on a
    small host many of them would take the cores the forward's thread runs on: on two
    cores, eight left a busy Python thread a quarter of its speed (benchmarks/RESULTS.md,
    native readers beside a busy Python thread)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(READERS, max(cpus // 2, cpus - SPARE_CPUS)))


def set_reading_switch_interval(seconds: float | None) -> None:
    """See aimdo.torch.set_reading_switch_interval: deprecated, does nothing."""
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"the switch interval is seconds or None, got {seconds!r}")
        if not 0 < seconds < float("inf"):
            raise ValueError(f"the switch interval must be positive seconds, got {seconds!r}")
    warnings.warn(
        "aimdo.torch.set_reading_switch_interval does nothing any more: the checkpoint's "
        "reads and copies run on native threads, which never take the GIL",
        DeprecationWarning,
        stacklevel=3,
    )


class _Buffer:
    def __init__(self, whole: torch.Tensor, tensor: torch.Tensor, unpin):
        # The memory pinned, held here: its pinning ends when it dies (a view does not keep
        # it alive under torch.inference_mode).
        self.whole = whole
        self.tensor = tensor  # reads land here; with O_DIRECT, an aligned view of `whole`
        self.nbytes = whole.numel()  # bytes held (pinned on CUDA)
        self.unpin = unpin  # gives the pinning back (None on a simulator)


class Pending:
    """A block's copy queued on a FileStream (the Executor's token for it): `result()`
    waits until its pieces are read and their copies queued, and returns (the event the
    copy's end records on CUDA, else None; the start and end marks when timed, else None).
    A failed read raises there, in the forward's thread: CheckpointError naming the file
    and the tensor, or DriverError when the driver refused a copy. Settled once; an
    interrupted wait (KeyboardInterrupt) leaves it unsettled, to be waited for again."""

    __slots__ = ("_stream", "_number", "_tensors", "_events", "_outcome")

    def __init__(self, stream, number, tensors, events, outcome=None):
        self._stream = stream  # the FileStream (None once settled)
        self._number = number  # the pump's job
        self._tensors = tensors  # the checkpoint tensors its pieces index
        self._events = events  # CUDA: (start or None, done); a simulator: None
        self._outcome = outcome  # (True, result) or (False, error), once settled

    def result(self):
        if self._outcome is None:
            stream = self._stream
            # Anything raised while waiting (Ctrl-C, or whatever a signal handler raises)
            # leaves the job unsettled: the pump keeps its result until it is forgotten.
            ended = stream._wait(self)
            try:
                outcome = (True, stream._settle(self, ended))
            except BaseException as error:  # noqa: BLE001 - raised below, and again later
                outcome = (False, error)
            self._outcome = outcome
            self._stream = self._tensors = self._events = None
            stream._forget(self._number)
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def __del__(self):
        # Dropped unsettled (a forward that failed after queueing it): the stream forgets
        # the job once it has ended.
        stream = getattr(self, "_stream", None)
        if stream is not None and self._outcome is None:
            stream._abandoned.append(self._number)


class FileStream:
    """Copies blocks from their checkpoint files (``TorchBlock.file_runs``) into device
    memory: each run cut into pieces of at most one buffer, read by the pump's native
    threads into the ring's buffers (a buffer read into again once the copy that last read
    it is done), each piece's copy queued as soon as its read is done, in order.

    One pipeline for every block queued (design.md §7, host tiers): the blocks' copies are
    queued in order by one native thread, which keeps the ring's buffers all reading, from
    one block into the next, so that no block's reads wait for the copies of the block
    before it to drain."""

    def __init__(
        self,
        stamps,
        pin: bool,
        largest: int | None = None,
        direct: bool = False,
        driver=None,
        device: int = 0,
        largest_block: int = 0,
    ):
        self.reader = Reader(stamps, direct)
        self.pin = pin
        self.direct = direct  # read with O_DIRECT, past the page cache
        self.driver = driver  # the backend's: the pump copies and records events through it
        self.device = device
        self.buffer_bytes = buffer_bytes_for(largest)
        self._held = _Held(self.reader)  # the pump and the ring, made at the first copy
        self.largest_block = largest_block  # bytes of the largest block streamed
        self.ring_buffers = ring_buffers(self.buffer_bytes, largest_block)
        self._pieces: dict[int, tuple] = {}  # id(block) -> (block, pieces, tensors)
        self._abandoned: list[int] = []  # jobs whose Pendings were dropped unsettled
        # Read-ahead: the block queued after each (id(block) -> (block, the next, whether
        # the same next followed it the time before too)), learned from the order blocks
        # were queued in; the held jobs reading the blocks foreseen before they are queued,
        # in order ((block, job, bytes)); at most read_ahead_limit() bytes of them
        # (read_ahead_bytes: None, the ring's bytes; 0, none; "auto", see READ_AHEAD_BYTES).
        self.read_ahead_bytes: int | str | None = READ_AHEAD_BYTES
        # The offload's prefetch depth (Schedule.set_prefetch keeps it), for "auto";
        # None (a stream no offload drives): no read-ahead under "auto".
        self.window: int | None = None
        self._next: dict[int, tuple] = {}
        self._last = None
        self._ahead: collections.deque = collections.deque()
        self.read_ahead_used = 0  # copies queued whose block was read ahead
        self.read_ahead_dropped = 0  # blocks read ahead and dropped (the order changed)
        self.closed = False
        # A stream dropped without close (its module dropped without undo) still stops
        # its pump, then gives its ring and its files back.
        weakref.finalize(self, self._held.close_quietly)

    @property
    def pump(self):
        """The native pump (aimdo._core.FilePump), or None before the first copy."""
        return self._held.pump

    @property
    def buffers(self) -> list[_Buffer]:
        return self._held.buffers

    @property
    def nbytes(self) -> int:
        """Bytes of the ring's buffers held now."""
        return sum(buffer.nbytes for buffer in self.buffers)

    def _ring(self):
        """The pump and its ring, made at the first copy: all of it, or (pinning failed)
        none of it."""
        if self.pump is None:
            if self.driver is None:
                raise InvalidStateError("this checkpoint stream has no driver to copy with")
            made = []
            try:
                for _ in range(self.ring_buffers):
                    # With O_DIRECT: room to align the start, and two alignments to read.
                    slack = 3 * DIRECT_ALIGN if self.direct else 0
                    whole = torch.empty(self.buffer_bytes + slack, dtype=torch.uint8)
                    unpin = pin_tensor(whole) if self.pin else None
                    tensor = whole
                    if self.direct:
                        start = -whole.data_ptr() % DIRECT_ALIGN
                        tensor = whole[start : start + self.buffer_bytes + 2 * DIRECT_ALIGN]
                    made.append(_Buffer(whole, tensor, unpin))
                ring = [(buffer.tensor.data_ptr(), buffer.tensor.numel()) for buffer in made]
                self._held.pump = _core.FilePump(
                    self.driver, self.device, ring, reader_threads(), READ_SPLIT_BYTES
                )
            except BaseException:
                for buffer in made:
                    if buffer.unpin is not None:
                        buffer.unpin()
                raise
            self._held.buffers = made
        return self.pump

    def _pieces_of(self, block):
        """The block's pieces as the pump takes them (each file opened once, here), and the
        checkpoint tensors they index. CheckpointError for a file that cannot be opened."""
        known = self._pieces.get(id(block))
        if known is not None and known[0] is block:
            return known[1], known[2]
        reader, piece = self.reader, self.buffer_bytes
        pieces, tensors = [], []
        for offset, tensor in block.file_runs:
            fd = reader._open(tensor)
            direct = reader._open_direct(tensor) if reader.direct else None
            expected = reader.stamps.get(tensor.path)
            # No stamp: the read fails as changed, as Reader._check has it.
            size, mtime_ns, inode = (
                (expected.size, expected.mtime_ns, expected.inode) if expected else (-1, 0, 0)
            )
            index = len(tensors)
            tensors.append(tensor)
            for start in range(0, tensor.nbytes, piece):
                count = min(piece, tensor.nbytes - start)
                pieces.append(
                    (
                        fd,
                        -1 if direct is None else direct,
                        tensor.offset + start,
                        count,
                        size,
                        mtime_ns,
                        inode,
                        offset + start,
                        index,
                    )
                )
        self._pieces[id(block)] = (block, pieces, tensors)
        return pieces, tensors

    def copy_in(self, block, storage: torch.Tensor) -> None:
        """Queue the copy of `block`'s file runs into `storage` on the current stream and
        wait until its pieces are read and their copies queued (done, on a simulator). The
        jobs queued before it are handed their pieces first; on CUDA their copies are on
        their own streams, ordered with this one only by events the caller arranges.
        CheckpointError from a read (the file changed or ends early): the copies queued
        before it are left to finish. Interrupted or failed, it returns only once nothing
        queued still writes (as the Executor's _settled does for copies ahead)."""
        stream = torch.cuda.current_stream(storage.device) if storage.is_cuda else None
        pending = self._queue(block, storage, stream, None, False)
        try:
            pending.result()
        except BaseException:
            drain_after_failure(self.drain)
            raise

    def copy_ahead(self, block, storage: torch.Tensor, stream, after, timed: bool) -> Pending:
        """Queue the copy of `block`'s file runs into `storage` (on CUDA, on `stream`, or
        the current one when None, after the event `after`, or nothing), read and queued
        by the pump's threads while the forward's thread goes on queueing compute.
        Blocks are copied in the order queued. Returns the Pending the block's compute
        waits for."""
        if storage.is_cuda and stream is None:
            stream = torch.cuda.current_stream(storage.device)
        return self._queue(block, storage, stream, after, timed)

    def _queue(self, block, storage: torch.Tensor, stream, after, timed: bool) -> Pending:
        if self.closed:
            raise InvalidStateError("this offload's checkpoint stream is closed (undone)")
        pump = self._ring()
        if self._abandoned:
            self._forget_abandoned()
        try:
            return self._queue_reading_ahead(pump, block, storage, stream, after, timed)
        except BaseException:
            # Interrupted anywhere (a held job may be queued and not yet in _ahead, or taken
            # from it and not attached): every held job not attached is dropped, so that
            # none is left holding up the jobs after it.
            with contextlib.suppress(Exception):
                while self._ahead:  # forgotten once ended
                    self._abandoned.append(self._ahead.popleft()[1])
                    self.read_ahead_dropped += 1
                pump.cancel_held()
            raise

    def _queue_reading_ahead(self, pump, block, storage, stream, after, timed) -> Pending:
        if self.read_ahead_bytes != 0:  # off: no order to learn (kept under "auto")
            self._learn(block)
        held = None
        at = next((i for i, (b, _, _) in enumerate(self._ahead) if b is block), None)
        if at is not None:  # read ahead already: attached below, the ones before dropped
            self._cancel_ahead(at)
            held = self._ahead.popleft()[1]
        else:
            self._cancel_ahead()  # not foreseen: the order changed
        try:
            pieces, tensors = self._pieces_of(block)
        except Exception as error:  # noqa: BLE001 - its own block's (a file not opened)
            if held is not None:
                pump.cancel(held)
                self._abandoned.append(held)
            return Pending(None, None, (), None, (False, error))
        try:
            pending = self._queued(pump, held, pieces, tensors, storage, stream, after, timed)
        except BaseException:
            if held is not None:  # attached or not (then _queue cancels it): forgotten once ended
                self._abandoned.append(held)
            raise
        if held is not None:
            self.read_ahead_used += 1
        self._read_ahead()
        return pending

    def _queued(self, pump, held, pieces, tensors, storage, stream, after, timed) -> Pending:
        """The block's job: the held one attached (read ahead), or one queued now."""

        def queue(*targets) -> int:
            if held is None:
                return pump.queue(pieces, *targets)
            pump.attach(held, *targets)
            return held

        if stream is None:  # a simulator: the device's memory is the host's
            # The pump keeps the storage alive until the job ends (and is forgotten).
            number = queue(storage.data_ptr(), 0, 0, 0, 0, timed, storage)
            return Pending(self, number, tensors, None)
        with torch.cuda.device(storage.device):
            # Recorded once here, so that PyTorch makes their CUDA events; the pump records
            # them again after (start: before) the block's copies. Nothing waits on them
            # before result() returns, which is after the pump's record.
            done = torch.cuda.Event(enable_timing=timed)
            done.record(stream)
            start = None
            if timed:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
        number = queue(
            storage.data_ptr(),
            stream.cuda_stream,
            0 if after is None else after.cuda_event,
            0 if start is None else start.cuda_event,
            done.cuda_event,
            timed,
            (storage, stream, after, start, done),  # alive until the job ends: the pump's
        )
        return Pending(self, number, tensors, (start, done))

    def _learn(self, block) -> None:
        """Note `block` as the one queued after the block queued before it."""
        last, self._last = self._last, block
        if last is not None:
            known = self._next.get(id(last))
            again = known is not None and known[0] is last and known[1] is block
            self._next[id(last)] = (last, block, again)

    def _foreseen(self, block):
        """The block queued after `block` the last two times it was queued, or None: an
        order seen once (a first forward, copying every block in line) is not read ahead."""
        known = self._next.get(id(block))
        return known[1] if known is not None and known[0] is block and known[2] else None

    @property
    def ring_bytes(self) -> int:
        """Bytes of the ring's buffers, made or not."""
        return self.ring_buffers * self.buffer_bytes

    def auto_read_ahead_bytes(self) -> int:
        """What "auto" reads ahead behind a window of at most READ_AHEAD_WINDOW copies."""
        return int(self.ring_bytes * READ_AHEAD_SHARE)

    def read_ahead_limit(self) -> int:
        """The bytes read ahead at most now (read_ahead_bytes, resolved)."""
        limit = self.read_ahead_bytes
        if limit is None:
            return self.ring_bytes
        if limit == "auto":
            window = self.window
            if window is None or window > READ_AHEAD_WINDOW:
                return 0
            return self.auto_read_ahead_bytes()
        return limit

    def _read_ahead(self) -> None:
        """Queue held jobs for the blocks foreseen after the last one queued, until they
        hold read_ahead_limit() (at most the ring's bytes: more could not be read ahead)
        or the order comes back to a block queued or held already."""
        limit = self.read_ahead_limit()
        if limit <= 0:
            return
        held = sum(nbytes for _, _, nbytes in self._ahead)
        block = self._ahead[-1][0] if self._ahead else self._last
        seen = {id(self._last)} | {id(b) for b, _, _ in self._ahead}
        while held < limit:
            block = self._foreseen(block)
            if block is None or id(block) in seen:
                return
            try:
                pieces, _ = self._pieces_of(block)
                number = self.pump.queue_held(pieces)
            except Exception:  # noqa: BLE001 - its own copy raises it, if it comes
                return
            nbytes = sum(piece[3] for piece in pieces)
            self._ahead.append((block, number, nbytes))
            seen.add(id(block))
            held += nbytes

    def _cancel_ahead(self, count: int | None = None) -> None:
        """Drop the first `count` held jobs (all by default)."""
        for _ in range(len(self._ahead) if count is None else count):
            self._drop_held(self._ahead.popleft()[1])

    def _drop_held(self, number: int) -> None:
        """Drop a held job taken from _ahead: its reads end, and it is forgotten once
        ended."""
        self.pump.cancel(number)
        self._abandoned.append(number)
        self.read_ahead_dropped += 1

    def _wait(self, pending: Pending):
        """Wait for the pending job (the GIL released): its (status, errno, tensor index,
        start ns, end ns, O_DIRECT descriptors refused), or the DriverError that ended it.
        Anything else raised here (an interrupt; the stream closed) leaves it unsettled."""
        if self.pump is None:
            raise InvalidStateError("this offload's checkpoint stream is closed (undone)")
        try:
            return self.pump.result(pending._number)
        except _core.DriverError as error:
            return error

    def _settle(self, pending: Pending, ended):
        """The ended job's result, or its error raised."""
        if isinstance(ended, BaseException):
            raise ended
        status, error, index, start_ns, end_ns, refused = ended
        for fd in refused:
            self.reader._retire_direct(fd)
        if status == "internal":
            raise MemoryError("aimdo's file pump failed queueing this copy (out of memory?)")
        if status != "done":
            raise_for_read(status, error, pending._tensors[index])
        if pending._events is None:  # a simulator: the host's clock, as time.perf_counter
            return (None, start_ns / 1e9, end_ns / 1e9) if end_ns else (None, None, None)
        start, done = pending._events
        return (done, start, done) if start is not None else (done, None, None)

    def _forget(self, number: int) -> None:
        """The pump's record of a settled job, and what it kept alive, let go."""
        if number is not None and self.pump is not None:
            self.pump.forget(number)

    def _forget_abandoned(self) -> None:
        """Forget the ended jobs whose Pendings were dropped unsettled."""
        pending, self._abandoned = self._abandoned, []
        for number in pending:
            if self.pump.ended(number):
                self._forget(number)
            else:
                self._abandoned.append(number)

    def drain(self) -> None:
        """Return once every copy queued is queued on its stream (its reads done), failed
        or not; the blocks read ahead are dropped."""
        if self.pump is not None:
            self._cancel_ahead()
            self.pump.drain()

    def leave(self, blocks) -> None:
        """`blocks` are no longer read through this stream (pinned after all; called
        between forwards): they leave the order learned for reading ahead (a block that
        one of them followed is now followed by the block after it, foreseen only if both
        links were seen twice), and what was read ahead for them is dropped; what was
        read ahead for the others stays."""
        gone = {id(block) for block in blocks}
        for key, (last, following, again) in list(self._next.items()):
            if key in gone:
                continue
            passed = set()
            while following is not None and id(following) in gone:
                if id(following) in passed:  # a loop of blocks gone: nothing follows
                    following = None
                    break
                passed.add(id(following))
                entry = self._next.get(id(following))
                if entry is None or entry[0] is not following:
                    following = None
                    break
                again = again and entry[2]
                following = entry[1]
            if following is None:
                del self._next[key]
            else:
                self._next[key] = (last, following, again)
        for key in gone:
            self._next.pop(key, None)
            self._pieces.pop(key, None)
        if self._last is not None and id(self._last) in gone:
            self._last = None
        kept = collections.deque()
        for entry in self._ahead:
            if id(entry[0]) in gone:
                self._drop_held(entry[1])
            else:
                kept.append(entry)
        self._ahead = kept

    def take_bytes_read(self) -> int:
        return 0 if self.pump is None else self.pump.take_bytes_copied()

    def close(self) -> None:
        """Wait for the copies that read the ring, stop the pump, give the ring and the
        files back; the stream takes no copy after. The caller has synchronized the device
        already, or does not mind. Every step is taken even if one fails; the first
        failure is raised at the end."""
        self.closed = True
        self._pieces.clear()
        self._next.clear()
        self.read_ahead_dropped += len(self._ahead)
        self._ahead.clear()  # the pump cancels them as it closes
        self._last = None
        self._held.close()


class _Held:
    """What a FileStream must give back in order: the pump (its jobs end, its threads stop,
    the copies reading the ring are waited for), then the ring, then the files."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.pump = None
        self.buffers: list[_Buffer] = []

    def close(self) -> None:
        """Every step is taken even if one fails; the first failure is raised at the end."""
        failure = None

        def step(action) -> None:
            nonlocal failure
            try:
                action()
            except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                failure = failure or error

        if self.pump is not None:
            step(self.pump.close)
            self.pump = None
        for buffer in self.buffers:
            if buffer.unpin is not None:
                step(buffer.unpin)
        self.buffers = []
        step(self.reader.close)
        if failure is not None:
            raise failure

    def close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - at collection, nothing to tell
            pass


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
