"""Blocks whose weights stay in their checkpoint files (``offload(..., host_limit=...)``;
design.md §7): each copy reads them again, through a small ring of pinned buffers, the
pieces read in parallel and each copied to the device once read. Needs PyTorch; imported
by aimdo.torch only.

Not thread-safe: one Offload's copies only, from its forward's thread, or (copy_ahead)
from the stream's own background thread, never both at once.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from ._sizes import format_size
from ._torch_checkpoint import Reader
from ._torch_host import pin_tensor

#: The ring: this many buffers of this many bytes (pinned on CUDA), and this many threads
#: reading into them at once. Twice as many buffers as readers: while the readers fill
#: half of them, the copies of the pieces read before drain from the other half.
READERS = 4
RING_BUFFERS = 2 * READERS
RING_BUFFER_BYTES = 16 << 20


class _Buffer:
    def __init__(self, tensor: torch.Tensor, unpin):
        self.tensor = tensor
        self.unpin = unpin  # gives the pinning back (None on a simulator)
        self.free = None  # a CUDA event: the copy that last read it is done (None: free)


class Pending:
    """A copy a FileStream queues from its background thread (the Executor's token for
    it): `result()` waits for the reads and returns (the event the copy's end records on
    CUDA, else None; the start and end marks when timed, else None). A failed read raises
    there, in the forward's thread."""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future

    def result(self):
        return self.future.result()


class FileStream:
    """Copies blocks from their checkpoint files (``TorchBlock.file_runs``) into device
    memory: each run cut into pieces of at most one buffer, read by READERS threads into
    the ring's buffers (each waiting first for the copy that last read its buffer), then
    copied to the device on the current stream, in order."""

    def __init__(self, stamps, pin: bool):
        self.reader = Reader(stamps)
        self.pin = pin
        self.buffers: list[_Buffer] = []
        self.pool = None
        self.turn = 0  # the buffer the next piece takes
        self.worker = None  # one thread: the copies queued ahead (copy_ahead), in order
        self.bytes_read = 0  # since the last take_bytes_read
        # A stream dropped without close (its module dropped without undo) still gives
        # its files back; its buffers unpin themselves as they die.
        weakref.finalize(self, self.reader.close)

    @property
    def nbytes(self) -> int:
        """Bytes of the ring's buffers held now."""
        return sum(buffer.tensor.numel() for buffer in self.buffers)

    def _ring(self) -> list[_Buffer]:
        if not self.buffers:
            for _ in range(RING_BUFFERS):
                tensor = torch.empty(RING_BUFFER_BYTES, dtype=torch.uint8)
                self.buffers.append(_Buffer(tensor, pin_tensor(tensor) if self.pin else None))
            self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="aimdo-read")
        return self.buffers

    def copy_in(self, block, storage: torch.Tensor, starting=None) -> None:
        """Queue the copy of `block`'s file runs into `storage` on the current stream
        (done when this returns on a simulator); `starting()`, if given, is called right
        before the first piece's copy is queued. CheckpointError from a read (the file
        changed or ends early): the copies queued before it are left to finish.

        A pipeline, not waves: as many pieces are read at once as the ring has buffers
        (READERS at a time), and each piece's copy is queued, in order, as soon as its read
        is done; the buffer it frees takes the next piece, whose reader first waits for
        that copy to finish. No reader waits for the others."""
        pieces = [
            (offset + start, tensor, start, min(RING_BUFFER_BYTES, tensor.nbytes - start))
            for offset, tensor in block.file_runs
            for start in range(0, tensor.nbytes, RING_BUFFER_BYTES)
        ]
        ring = self._ring()
        cuda = storage.device if storage.device.type == "cuda" else None
        reading = deque()  # (offset in storage, bytes, buffer, the read's future), in order
        waiting = iter(pieces)

        def read_next() -> None:
            piece = next(waiting, None)
            if piece is None:
                return
            offset, tensor, start, count = piece
            buffer = ring[self.turn]
            self.turn = (self.turn + 1) % len(ring)
            busy, buffer.free = buffer.free, None  # the reader waits for it
            future = self.pool.submit(self._read, cuda, busy, tensor, buffer.tensor[:count], start)
            reading.append((offset, count, buffer, future))

        for _ in range(len(ring)):
            read_next()
        try:
            while reading:
                offset, count, buffer, future = reading[0]
                future.result()
                reading.popleft()
                self.bytes_read += count
                if starting is not None:
                    starting()
                    starting = None
                storage[offset : offset + count].copy_(buffer.tensor[:count], non_blocking=True)
                if cuda is not None:
                    buffer.free = torch.cuda.Event()
                    buffer.free.record(torch.cuda.current_stream(cuda))
                read_next()
        except BaseException:
            wait([future for *_, future in reading])  # none writes into the ring later
            raise

    def _read(self, device, busy, tensor, into: torch.Tensor, start: int) -> None:
        """A reader's job: wait for the copy that last read `into`'s buffer (`busy`, a CUDA
        event of `device`, or None), then read `tensor`'s bytes from `start` into it."""
        if busy is not None:
            with torch.cuda.device(device):
                busy.synchronize()  # without the GIL
        self.reader.read(tensor, into, start)

    def copy_ahead(self, block, storage: torch.Tensor, stream, after, timed: bool) -> Pending:
        """copy_in, from a thread of this stream's own, so that the forward's thread goes
        on queueing compute while the files are read: on `stream` (CUDA), after the event
        `after` (or nothing). Jobs run one at a time, in the order queued; every use of the
        ring is theirs from then on. Returns the Pending the block's compute waits for."""
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="aimdo-files")
        device = storage.device

        def job():
            # Timed, the copy starts where its first piece is queued (its reads done).
            start = []
            if device.type != "cuda":
                mark = (lambda: start.append(time.perf_counter())) if timed else None
                self.copy_in(block, storage, mark)
                if not timed:
                    return None, None, None
                end = time.perf_counter()
                return None, start[0] if start else end, end
            with torch.cuda.device(device), torch.cuda.stream(stream):
                if after is not None:
                    stream.wait_event(after)

                def starting():
                    event = torch.cuda.Event(enable_timing=True)
                    event.record(stream)
                    start.append(event)

                self.copy_in(block, storage, starting if timed else None)
                done = torch.cuda.Event(enable_timing=timed)
                done.record(stream)
            if timed and not start:  # nothing to copy: an empty span at the end
                start.append(done)
            return done, start[0] if start else None, done if timed else None

        return Pending(self.worker.submit(job))

    def drain(self) -> None:
        """Return once every copy queued ahead is queued (its reads done), failed or not."""
        if self.worker is not None:
            self.worker.submit(_nothing).result()

    def take_bytes_read(self) -> int:
        taken, self.bytes_read = self.bytes_read, 0
        return taken

    def close(self) -> None:
        """Wait for the copies that read the ring, stop the readers, give the ring and the
        files back. The caller has synchronized the device already, or does not mind."""
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None
        for buffer in self.buffers:
            if buffer.free is not None:
                buffer.free.synchronize()
            if buffer.unpin is not None:
                buffer.unpin()
        self.buffers = []
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.reader.close()


#: host_limit="auto" pins at most this fraction of the host memory available when the
#: module is offloaded (MemAvailable), leaving the rest to the process and the page cache.
AUTO_HOST_FRACTION = 0.5


def available_host_bytes() -> int:
    """The host memory available now (Linux: MemAvailable), or the free pages' bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_limit_bytes(host_limit, weights: int) -> tuple[int, str]:
    """The bytes of weights to pin for `host_limit` (None: all; "auto"; bytes), and why."""
    if host_limit is None:
        return weights, "host_limit=None pins every weight"
    if host_limit == "auto":
        available = available_host_bytes()
        limit = int(available * AUTO_HOST_FRACTION)
        if weights <= limit:
            return weights, (
                f"host_limit='auto': the weights fit in {AUTO_HOST_FRACTION:.0%} of the "
                f"{format_size(available)} of host memory available"
            )
        return limit, (
            f"host_limit='auto': {AUTO_HOST_FRACTION:.0%} of the {format_size(available)} of "
            "host memory available"
        )
    return host_limit, f"host_limit={format_size(host_limit)}"


#: Bytes read to measure how fast the checkpoint's files read (in reads of PROBE_READ).
PROBE_BYTES = 64 << 20
PROBE_READ = 8 << 20


def read_bandwidth(blocks) -> float | None:
    """Bytes a second that reading `blocks`' sources from their files gives now (from the
    page cache where the files are there, else the disk): PROBE_BYTES of the largest
    tensor's file, read in order from that tensor's first byte. None when nothing reads."""
    sources = [w.source for block in blocks for w in block.weights if w.source is not None]
    if not sources:
        return None
    largest = max(sources, key=lambda t: t.nbytes)
    want = min(PROBE_BYTES, largest.nbytes)
    try:
        fd = os.open(largest.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        began, done = time.perf_counter(), 0
        while done < want:
            got = len(os.pread(fd, min(PROBE_READ, want - done), largest.offset + done))
            if got == 0:
                break
            done += got
        seconds = time.perf_counter() - began
    except OSError:
        return None
    finally:
        os.close(fd)
    return done / seconds if done and seconds > 0 else None


def streamable(block) -> bool:
    """Whether every weight of `block` is a meta weight with a checkpoint source."""
    return bool(block.weights) and all(
        w.source is not None and w.tensor.device.type == "meta" for w in block.weights
    )


def left_in_files(placed: list, limit: int, forced=None) -> list:
    """The blocks (of `placed`, in placement order) that stay in their files for a pinned
    budget of `limit` bytes: the blocks that cannot stream, or are forced pinned
    (`forced`: {block: "pinned" or "file"}), are pinned first, and those forced into the
    files stay there; then those placed last, which the VBAR offloads first and so are
    copied at every forward, are pinned while they fit; the rest (placed first: resident
    in VRAM, read again only after an eviction) stream. ValueError for a block forced
    into the files that cannot stream."""
    forced = forced or {}
    for block, tier in forced.items():
        if tier == "file" and not streamable(block):
            raise ValueError(
                f"host_tiers: {block.name or 'the root module'!r} cannot stay in the files: "
                "a weight of it is the module's own, not read from the checkpoint"
            )
    pinned = [b for b in placed if not streamable(b) or forced.get(b) == "pinned"]
    left = limit - sum(block.nbytes for block in pinned)
    files = []
    for block in reversed(placed):
        tier = forced.get(block)
        if not streamable(block) or tier == "pinned":
            continue
        if tier == "file":
            files.append(block)
        elif block.nbytes <= left:
            left -= block.nbytes
        else:
            files.append(block)
    return files[::-1]


def _nothing() -> None:
    return None
