"""The pipeline that copies blocks left in their checkpoint files (aimdo._torch_stream over
the native aimdo._core.FilePump, issue 14): pieces are read by several threads into a ring
of buffers and copied in order; no more pieces are read at once than the ring has buffers;
the reads of one block do not wait for the copies of the block before it; a failed read or
a refused copy fails its own block only; a wait can be interrupted; nothing is left over.

The device is a real-bytes simulator: its memory is host memory, and the copies go
through its driver (cuMemcpyHtoDAsync), which a test can hold or fail."""

from __future__ import annotations

import _thread
import collections
import os
import threading
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
from aimdo import _torch_stream as stream  # noqa: E402
from aimdo._safetensors import stamp  # noqa: E402
from aimdo._torch_checkpoint import CheckpointError  # noqa: E402

pytestmark = pytest.mark.sim_only  # holds and injected failures are the simulator's

PIECE = 16  # bytes of a ring buffer here
RING = 4  # buffers in the ring here
WAIT = 10.0  # seconds: a test that waits longer has found a hang
COPY = "cuMemcpyHtoDAsync"


def byte_of(name: str, at: int) -> int:
    return (sum(map(ord, name)) + at // PIECE) % 250 + 1  # never 0


#: Bytes of the parts a piece is read in, for the tests run with split reads, and the
#: readers of the small ring: 3 parts of 6, 6 and 4 bytes a piece (PART bytes each would
#: be 4 parts, more than the readers).
PART = 5
READERS = 3


@pytest.fixture(params=[0, PART], ids=["whole", "parts"])
def small_ring(monkeypatch, request):
    """A ring of RING buffers of PIECE bytes, read by READERS threads whatever the host's
    CPUs; each piece read whole, or in parts (READ_SPLIT_BYTES of PART): every rule of the
    pipeline holds either way."""
    monkeypatch.setattr(stream, "RING_BUFFERS", RING)
    monkeypatch.setattr(stream, "RING_BUFFER_BYTES", PIECE)
    monkeypatch.setattr(stream, "reader_threads", lambda: READERS)
    monkeypatch.setattr(stream, "READ_SPLIT_BYTES", request.param)
    return request.param


@pytest.fixture
def sim():
    return aimdo.SimBackend("1x1GiB", real_bytes=True, record=True)


class Files:
    """One file per block in a temporary folder, each piece filled with a byte naming its
    block and piece; `stamps` as a checkpoint's header reading would record them."""

    def __init__(self, folder):
        self.folder = folder
        self.stamps = {}

    def block(self, name: str, pieces: int, written: int | None = None):
        """A block of `pieces` pieces; its file holds only the first `written` of them
        (default: all), so a read past them finds the file truncated."""
        path = str(self.folder / f"{name}.safetensors")
        nbytes = PIECE * pieces
        data = bytes(byte_of(name, at) for at in range(nbytes))
        with open(path, "wb") as file:
            file.write(data[: PIECE * (pieces if written is None else written)])
        self.stamps[path] = stamp(path)
        tensor = SimpleNamespace(name=name, path=path, offset=0, nbytes=nbytes)
        return SimpleNamespace(file_runs=[(0, tensor)], nbytes=nbytes)


def expected(block) -> torch.Tensor:
    name = block.file_runs[0][1].name
    return torch.tensor([byte_of(name, at) for at in range(block.nbytes)], dtype=torch.uint8)


def targets_of(sim, *blocks) -> list[torch.Tensor]:
    """Zeroed storage for each block, taken as the device's memory (no piece writes a zero
    byte)."""
    made = []
    for block in blocks:
        target = torch.zeros(block.nbytes, dtype=torch.uint8)
        sim.adopt(0, target)
        made.append(target)
    return made


def new_stream(sim, files: Files, pin: bool = False, ahead: bool = False) -> stream.FileStream:
    """A stream over the files; `ahead`: reading ahead up to the ring's bytes (by
    default none here: no offload sets the stream's window)."""
    made = stream.FileStream(files.stamps, pin=pin, driver=sim.driver, device=0)
    if ahead:
        made.read_ahead_bytes = None
    return made


def settled(pending):
    """The Pending's result, failing the test (not hanging it) if it never settles."""
    settles = threading.Event()

    def wait() -> None:
        try:
            pending.result()
        except Exception:  # noqa: BLE001, S110 - raised again below, in the test's thread
            pass
        settles.set()

    threading.Thread(target=wait, daemon=True).start()
    assert settles.wait(WAIT), "a pending copy never settled"
    return pending.result()  # settled: its result, or its error raised again


def wait_until(condition, seconds: float = WAIT / 2) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_the_next_block_is_read_before_the_copies_of_the_block_before_it(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    z, a, b = files.block("z", 1), files.block("a", 2), files.block("b", 2)
    into_z, into_a, into_b = targets_of(sim, z, a, b)
    s = new_stream(sim, files)
    with sim.hold(COPY, 0) as first:
        held_z = s.copy_ahead(z, into_z, None, None, False)
        assert first.wait_arrived(WAIT)  # the pump is in z's copy: a and b queue behind it
        pending = [s.copy_ahead(a, into_a, None, None, False)]
        pending.append(s.copy_ahead(b, into_b, None, None, False))
        with sim.hold(COPY, 0) as second:
            first.release()
            assert second.wait_arrived(WAIT)  # a's first copy is in flight...
            # ...and the ring (4 buffers) has taken b's pieces as well as a's.
            assert s.pump.pieces_read == 1 + 4
            assert torch.count_nonzero(into_a) == 0 and torch.count_nonzero(into_b) == 0
    assert settled(held_z) == (None, None, None)
    assert [settled(p) for p in pending] == [(None, None, None)] * 2
    assert torch.equal(into_a, expected(a)) and torch.equal(into_b, expected(b))
    assert s.take_bytes_read() == z.nbytes + a.nbytes + b.nbytes
    assert s.take_bytes_read() == 0
    s.close()


def test_no_more_pieces_are_read_than_the_ring_has_buffers(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    a = files.block("a", 7)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files)
    with sim.hold(COPY, 0) as held:
        pending = s.copy_ahead(a, into_a, None, None, False)
        assert held.wait_arrived(WAIT)
        wait_until(lambda: s.pump.pieces_read == RING)
        time.sleep(0.05)
        # The first piece's buffer waits for its copy: the fifth piece is not read yet.
        assert s.pump.pieces_read == RING
    settled(pending)
    assert s.pump.pieces_read == 7
    assert torch.equal(into_a, expected(a))
    assert sim.call_count(COPY, 0) == 7
    s.close()


def test_more_pieces_than_buffers_reuse_the_ring_in_order_and_are_timed(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    blocks = [files.block(name, 7) for name in ("a", "b", "c")]
    targets = targets_of(sim, *blocks)
    s = new_stream(sim, files)
    pending = [s.copy_ahead(b, t, None, None, True) for b, t in zip(blocks, targets, strict=True)]
    marks = [settled(p) for p in pending]
    for block, target in zip(blocks, targets, strict=True):
        assert torch.equal(target, expected(block))
    # Timed on the host clock: each copy starts at its first piece and ends after its last,
    # one block after the other.
    assert all(done is None and start <= end for done, start, end in marks)
    assert marks[0][2] <= marks[1][1] and marks[1][2] <= marks[2][1]
    assert marks[0][1] > time.perf_counter() - 60  # time.perf_counter's clock
    assert s.nbytes == RING * PIECE
    s.close()
    assert s.nbytes == 0 and s.pump is None


def test_a_truncated_file_fails_its_own_block_and_the_others_land(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    blocks = [files.block("a", 2), files.block("b", 3, written=1), files.block("c", 2)]
    targets = targets_of(sim, *blocks)
    s = new_stream(sim, files)
    pending = [s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks, targets, strict=True)]
    assert settled(pending[0]) == (None, None, None)
    with pytest.raises(CheckpointError, match="b.safetensors: ends inside tensor b"):
        settled(pending[1])
    with pytest.raises(CheckpointError, match="ends inside tensor b"):
        pending[1].result()  # settled once: the same error again
    assert settled(pending[2]) == (None, None, None)
    assert torch.equal(targets[0], expected(blocks[0]))
    assert torch.equal(targets[2], expected(blocks[2]))
    # b's first piece landed; nothing after it did.
    assert torch.equal(targets[1][:PIECE], expected(blocks[1])[:PIECE])
    assert torch.count_nonzero(targets[1][PIECE:]) == 0
    s.close()


def test_a_piece_read_in_parts_is_copied_once_whole(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    blocks = [files.block("a", 3), files.block("b", 2)]
    targets = targets_of(sim, *blocks)
    s = new_stream(sim, files)
    pending = [s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks, targets, strict=True)]
    assert [settled(p) for p in pending] == [(None, None, None)] * 2
    for block, target in zip(blocks, targets, strict=True):
        assert torch.equal(target, expected(block))
    # One copy a piece, whether it was read whole or in parts (3 a piece: see PART).
    assert sim.call_count(COPY, 0) == s.pump.pieces_read == 5
    assert s.pump.reads == (5 * READERS if small_ring else 5)
    assert s.take_bytes_read() == 5 * PIECE
    s.close()


def test_a_file_ending_inside_a_piece_fails_its_block_and_copies_none_of_that_piece(
    small_ring, sim, tmp_path
):
    files = Files(tmp_path)
    a, b = files.block("a", 3), files.block("b", 1)
    path = a.file_runs[0][1].path
    os.truncate(path, PIECE + 8)  # inside the second piece: its second part (6-11) is cut
    files.stamps[path] = stamp(path)
    into_a, into_b = targets_of(sim, a, b)
    s = new_stream(sim, files)
    pending = [
        s.copy_ahead(a, into_a, None, None, False),
        s.copy_ahead(b, into_b, None, None, False),
    ]
    with pytest.raises(CheckpointError, match="a.safetensors: ends inside tensor a"):
        settled(pending[0])
    assert settled(pending[1]) == (None, None, None)
    assert torch.equal(into_b, expected(b))
    # The first piece landed; the second, read in part, was not copied, nor the third.
    assert torch.equal(into_a[:PIECE], expected(a)[:PIECE])
    assert torch.count_nonzero(into_a[PIECE:]) == 0
    s.close()


def test_a_file_changed_under_the_stream_fails_its_block_until_it_is_put_back(
    small_ring, sim, tmp_path
):
    files = Files(tmp_path)
    a = files.block("a", 2)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files)
    path = a.file_runs[0][1].path
    before = os.stat(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="a.safetensors: changed since its header"):
        s.copy_in(a, into_a)
    assert torch.count_nonzero(into_a) == 0
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    s.copy_in(a, into_a)  # the stream stays usable
    assert torch.equal(into_a, expected(a))
    s.close()


def test_a_file_that_cannot_be_opened_fails_its_own_block_only(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    blocks = [files.block("a", 2), files.block("b", 2), files.block("c", 2)]
    targets = targets_of(sim, *blocks)
    s = new_stream(sim, files)
    b_path = blocks[1].file_runs[0][1].path
    os.rename(b_path, b_path + ".away")
    pending = [s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks, targets, strict=True)]
    assert settled(pending[0]) == (None, None, None)
    with pytest.raises(CheckpointError, match="b.safetensors: cannot be read"):
        settled(pending[1])
    assert settled(pending[2]) == (None, None, None)
    assert torch.equal(targets[0], expected(blocks[0]))
    assert torch.equal(targets[2], expected(blocks[2]))
    assert torch.count_nonzero(targets[1]) == 0
    os.rename(b_path + ".away", b_path)  # the file is back: the next copy of b reads it
    s.copy_in(blocks[1], targets[1])
    assert torch.equal(targets[1], expected(blocks[1]))
    s.close()


@pytest.mark.parametrize("refused", [COPY, "cuEventRecord"])
def test_a_refused_copy_fails_its_own_block_with_a_driver_error(small_ring, sim, tmp_path, refused):
    files = Files(tmp_path)
    blocks = [files.block("a", 2), files.block("b", 2), files.block("c", 2)]
    targets = targets_of(sim, *blocks)
    s = new_stream(sim, files)
    settled(s.copy_ahead(blocks[0], targets[0], None, None, False))  # the ring made, a copied
    synchronized = sim.call_count("cuCtxSynchronize", 0)
    sim.fail(refused, device=0, error="error")
    pending = [
        s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks[1:], targets[1:], strict=True)
    ]
    with pytest.raises(aimdo.DriverError, match=refused) as raised:
        settled(pending[0])
    assert raised.value.injected and raised.value.device == 0
    assert settled(pending[1]) == (None, None, None)
    assert torch.equal(targets[2], expected(blocks[2]))
    if refused == "cuEventRecord":
        # b's first piece was copied but its buffer's event not recorded: the ring waits
        # for the whole device before that buffer is read into again.
        s.copy_in(blocks[0], targets[0])
        s.copy_in(blocks[0], targets[0])
        assert sim.call_count("cuCtxSynchronize", 0) == synchronized + 1
    s.copy_in(blocks[1], targets[1])
    assert torch.equal(targets[1], expected(blocks[1]))
    s.close()


def test_copy_in_waits_for_the_copies_queued_before_it(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    a, b = files.block("a", 1), files.block("b", 1)
    into_a, into_b = targets_of(sim, a, b)
    s = new_stream(sim, files)
    done = threading.Event()

    def in_line():
        s.copy_in(b, into_b)
        done.set()

    with sim.hold(COPY, 0) as held:
        first = s.copy_ahead(a, into_a, None, None, False)
        assert held.wait_arrived(WAIT)
        thread = threading.Thread(target=in_line)
        thread.start()
        assert not done.wait(0.1)  # b waits behind a's copy
        assert torch.count_nonzero(into_b) == 0
    thread.join(WAIT)
    assert done.is_set()
    assert settled(first) == (None, None, None)
    assert torch.equal(into_a, expected(a)) and torch.equal(into_b, expected(b))
    s.close()


def test_a_wait_can_be_interrupted_and_waited_again(small_ring, sim, tmp_path):
    import signal

    # Ctrl-C as Python handles it by default (a pytest-xdist worker may ignore SIGINT,
    # and then interrupt_main does nothing).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    files = Files(tmp_path)
    a = files.block("a", 1)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files)
    held = sim.hold(COPY, 0)
    # Never a hang: the copy is let go after WAIT whatever happens.
    watchdog = threading.Timer(WAIT, held.release)
    watchdog.start()
    try:
        pending = s.copy_ahead(a, into_a, None, None, False)
        assert held.wait_arrived(WAIT)
        timer = threading.Timer(0.05, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            pending.result()
        timer.join()
        assert watchdog.is_alive()  # interrupted, not released by the watchdog
    finally:
        held.release()
        watchdog.cancel()
        signal.signal(signal.SIGINT, previous)
    assert settled(pending) == (None, None, None)  # not settled by the interrupt
    assert torch.equal(into_a, expected(a))
    s.close()


def test_a_ring_that_cannot_be_pinned_whole_is_given_back_and_made_again_later(
    small_ring, sim, tmp_path, monkeypatch
):
    pinned, unpinned = [], []

    def pin(tensor):
        if len(pinned) == 2 and not unpinned:  # the third buffer of the first ring fails
            raise aimdo.OutOfMemoryError("pinning failed")
        pinned.append(tensor.data_ptr())
        return lambda: unpinned.append(tensor.data_ptr())

    monkeypatch.setattr(stream, "pin_tensor", pin)
    files = Files(tmp_path)
    a = files.block("a", 2)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files, pin=True)
    with pytest.raises(aimdo.OutOfMemoryError):
        s.copy_in(a, into_a)
    assert sorted(unpinned) == sorted(pinned) and s.buffers == [] and s.pump is None
    s.copy_in(a, into_a)  # a whole ring this time
    assert torch.equal(into_a, expected(a))
    assert len(s.buffers) == RING
    s.close()
    assert len(unpinned) == 2 + RING


def test_a_closed_stream_refuses_copies_and_leaves_nothing(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    a = files.block("a", 1)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files)
    s.copy_in(a, into_a)
    pump = s.pump
    s.close()
    assert pump.closed and s.pump is None and s.buffers == []
    assert s.reader.files == {}
    with pytest.raises(aimdo.InvalidStateError, match="closed"):
        s.copy_in(a, into_a)
    s.close()  # again: nothing to do
    # The ring's events were destroyed (the simulator reports live events as leaks).
    assert sim.leaks() == []


def test_a_stream_dropped_without_close_stops_its_pump(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    a = files.block("a", 3)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files)
    s.copy_ahead(a, into_a, None, None, False)
    pump = s.pump
    del s
    import gc

    gc.collect()
    assert pump.closed
    assert torch.equal(into_a, expected(a))  # the job queued ended before the pump stopped
    assert sim.leaks() == []


@pytest.mark.parametrize(
    ("largest", "expected_bytes"),
    [(None, 16 << 20), (0, 1), (5, 5), (16 << 20, 16 << 20), (1 << 30, 16 << 20)],
)
def test_a_ring_buffer_is_no_larger_than_the_largest_tensor_read(largest, expected_bytes):
    assert stream.FileStream({}, pin=False, largest=largest).buffer_bytes == expected_bytes


@pytest.mark.parametrize(
    ("largest_block", "buffers"),
    [
        (0, 24),
        (96 << 20, 24),  # four of them fill the 24 buffers of 16 MiB
        ((96 << 20) + 1, 25),
        (200 << 20, 50),  # the 35 GiB synthetic model's largest: 800 MiB
        (256 << 20, 64),
        (1 << 30, 64),  # never more than 64 buffers (1 GiB)
    ],
)
def test_the_ring_holds_four_of_the_largest_block_streamed(largest_block, buffers):
    s = stream.FileStream({}, pin=False, largest=1 << 30, largest_block=largest_block)
    assert (s.ring_buffers, s.ring_bytes) == (buffers, buffers * (16 << 20))
    # Half of it is read ahead: two of the largest blocks, where the ring could grow so.
    if 0 < largest_block <= (256 << 20):
        assert s.auto_read_ahead_bytes() >= 2 * largest_block
    assert (stream.RING_BLOCKS, stream.RING_MOST_BUFFERS) == (4, 64)


@pytest.mark.parametrize(
    ("cpus", "threads"), [(1, 1), (2, 1), (4, 2), (6, 3), (8, 4), (12, 8), (16, 12), (64, 12)]
)
def test_the_ring_reads_with_the_cpus_the_rest_of_the_process_can_spare(monkeypatch, cpus, threads):
    monkeypatch.setattr(stream.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert stream.reader_threads() == threads
    assert (stream.READERS, stream.RING_BUFFERS, stream.SPARE_CPUS) == (12, 24, 4)


def test_the_reading_switch_interval_is_deprecated_and_changes_nothing():
    import sys

    import aimdo.torch as aimdo_torch

    before = sys.getswitchinterval()
    with pytest.warns(DeprecationWarning, match="does nothing"):
        aimdo_torch.set_reading_switch_interval(0.0005)
    assert sys.getswitchinterval() == before
    with pytest.raises(TypeError):
        aimdo_torch.set_reading_switch_interval("1ms")
    with pytest.raises(ValueError, match="positive"):
        aimdo_torch.set_reading_switch_interval(0)


def test_the_pump_refuses_bad_arguments(sim):
    with pytest.raises(ValueError, match="at least one ring buffer"):
        aimdo._core.FilePump(sim.driver, 0, [], 1)
    buffer = torch.zeros(PIECE, dtype=torch.uint8)
    with pytest.raises(ValueError, match="readers"):
        aimdo._core.FilePump(sim.driver, 0, [(buffer.data_ptr(), PIECE)], 0)
    with pytest.raises(ValueError, match="split must not be negative"):
        aimdo._core.FilePump(sim.driver, 0, [(buffer.data_ptr(), PIECE)], 1, -1)
    pump = aimdo._core.FilePump(sim.driver, 0, [(buffer.data_ptr(), PIECE)], 1)
    try:
        with pytest.raises(ValueError, match="does not fit a ring buffer"):
            pump.queue([(0, -1, 0, PIECE + 1, 0, 0, 0, 0, 0)], 0, 0, 0, 0, 0, False)
        with pytest.raises(ValueError, match="out of range"):
            pump.queue([(-5, -1, 0, PIECE, 0, 0, 0, 0, 0)], 0, 0, 0, 0, 0, False)
        with pytest.raises(ValueError, match="not queued"):
            pump.result(12345)
    finally:
        pump.close()
    with pytest.raises(aimdo.InvalidStateError, match="closed"):
        pump.queue([], 0, 0, 0, 0, 0, False)


def test_a_failed_buffer_wait_fails_its_block_and_the_next_piece_waits_for_that_buffer(
    small_ring, sim, tmp_path
):
    files = Files(tmp_path)
    a, b = files.block("a", RING + 1), files.block("b", 1)
    into_a, into_b = targets_of(sim, a, b)
    s = new_stream(sim, files)
    # a's fifth piece takes buffer 0 again, after waiting for its first piece's copy: that
    # wait fails. b's piece must then wait for buffer 0 too, not take buffer 1, whose read
    # may still be running.
    sim.fail("cuEventSynchronize", device=0, error="error")
    first = s.copy_ahead(a, into_a, None, None, False)
    second = s.copy_ahead(b, into_b, None, None, False)
    with pytest.raises(aimdo.DriverError, match="cuEventSynchronize"):
        settled(first)
    assert settled(second) == (None, None, None)
    assert torch.equal(into_b, expected(b))
    waits = [line for line in sim.log().splitlines() if line.startswith("cuEventSynchronize")]
    assert len(waits) == 2 and waits[0].endswith("CUDA_ERROR_UNKNOWN")
    assert waits[1].split()[1] == waits[0].split()[1]  # the same buffer's event
    s.close()


def test_the_copies_wait_for_after_and_record_start_and_done_around_them(sim, tmp_path):
    files = Files(tmp_path)
    a = files.block("a", 2)
    (into_a,) = targets_of(sim, a)
    driver = sim.driver
    after, start, done = (driver.event_create(0) for _ in range(3))
    ring = [torch.zeros(PIECE, dtype=torch.uint8) for _ in range(2)]
    path = a.file_runs[0][1].path
    fd = os.open(path, os.O_RDONLY)
    pump = aimdo._core.FilePump(driver, 0, [(t.data_ptr(), PIECE) for t in ring], 1)
    try:
        s = files.stamps[path]
        pieces = [(fd, -1, at, PIECE, s.size, s.mtime_ns, s.inode, at, 0) for at in (0, PIECE)]
        job = pump.queue(pieces, into_a.data_ptr(), 0, after, start, done, True, into_a)
        wait_until(lambda: pump.ended(job))  # bounded: a hang fails the test
        status, _, _, start_ns, end_ns, _ = pump.result(job)
        assert status == "done" and 0 < start_ns <= end_ns
        assert pump.result(job)[0] == "done"  # asked again: the same, until forgotten
        pump.forget(job)
        with pytest.raises(ValueError, match="not queued"):
            pump.result(job)
        empty = pump.queue([], 0, 0, after, 0, done, False)  # nothing to copy: still ordered
        wait_until(lambda: pump.ended(empty))
        assert pump.result(empty)[0] == "done"
        pump.forget(empty)
        assert pump.kept == 0
    finally:
        pump.close()
        os.close(fd)
    assert torch.equal(into_a, expected(a))
    calls = [
        " ".join(line.split()[:1] + [w for w in line.split() if w.startswith("ev=")])
        for line in sim.log().splitlines()
        if line.startswith(("cuStreamWaitEvent", "cuEventRecord", "cuMemcpyHtoDAsync"))
    ]
    ring_events = {w for line in calls for w in line.split()[1:]} - {
        f"ev={e:#x}" for e in (after, start, done)
    }
    mine = [c for c in calls if not any(e in c for e in ring_events)]
    assert mine == [
        f"cuStreamWaitEvent ev={after:#x}",
        f"cuEventRecord ev={start:#x}",
        "cuMemcpyHtoDAsync",
        "cuMemcpyHtoDAsync",
        f"cuEventRecord ev={done:#x}",
        f"cuStreamWaitEvent ev={after:#x}",  # the empty job
        f"cuEventRecord ev={done:#x}",
    ]
    for event in (after, start, done):
        driver.event_destroy(event)


def test_a_settled_copy_lets_go_of_its_storage_and_a_dropped_one_is_kept_until_drained(
    small_ring, sim, tmp_path
):
    import gc
    import weakref

    files = Files(tmp_path)
    a, b = files.block("a", 2), files.block("b", 2)
    s = new_stream(sim, files)
    into_a, into_b = targets_of(sim, a, b)
    gone_a, gone_b = weakref.ref(into_a), weakref.ref(into_b)
    pending = s.copy_ahead(a, into_a, None, None, False)
    with sim.hold(COPY, 0) as held:
        dropped = s.copy_ahead(b, into_b, None, None, False)
        del into_b, dropped  # the caller let go while its copy is queued
        gc.collect()
        assert gone_b() is not None  # the pump still writes into it: kept alive
        assert held.wait_arrived(WAIT)
    assert settled(pending) == (None, None, None)
    del into_a  # the settled Pending is still here: it must not hold the storage
    gc.collect()
    assert gone_a() is None
    s.drain()
    gc.collect()
    assert gone_b() is None and s.pump.kept == 0
    # The dropped job is forgotten at the next copy queued, and so leaves the pump.
    (into_c,) = targets_of(sim, a)
    assert settled(s.copy_ahead(a, into_c, None, None, False)) == (None, None, None)
    assert s._abandoned == []
    s.close()


def test_a_forked_child_can_drop_a_stream_whose_pump_ran(small_ring, sim, tmp_path):
    files = Files(tmp_path)
    a = files.block("a", 2)
    (into_a,) = targets_of(sim, a)
    s = new_stream(sim, files)
    s.copy_in(a, into_a)
    pid = os.fork()
    if pid == 0:  # the child: its copy of the pump has no threads
        try:
            # Threads of the child's own first: glibc may give them the stacks (and so the
            # handles) of the parent's threads, which the inherited pump must not touch.
            ticker = threading.Thread(target=time.sleep, args=(0.2,))
            ticker.start()
            own = new_stream(sim, files)
            own_target = torch.zeros(a.nbytes, dtype=torch.uint8)
            with pytest.raises(aimdo.InvalidStateError, match="fork"):
                s.copy_in(a, own_target)  # the inherited pump refuses work in the child
            s.close()
            del own, own_target
            ticker.join()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any failure is the child's exit code
            os._exit(1)
    deadline = time.monotonic() + WAIT
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child hung dropping its stream")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    s.copy_in(a, into_a)  # the parent's pump runs on
    assert torch.equal(into_a, expected(a))
    s.close()


def round_of(s, blocks, targets) -> None:
    """Queue each block's copy, in order, and see each land."""
    for block, target in zip(blocks, targets, strict=True):
        assert settled(s.copy_ahead(block, target, None, None, False)) == (None, None, None)
        assert torch.equal(target, expected(block))


def order_learned(sim, tmp_path, pieces: int):
    """A stream reading ahead, and blocks a, b and c of `pieces` pieces each, copied in
    that order twice: the order is learned, nothing read ahead yet."""
    files = Files(tmp_path)
    blocks = [files.block(name, pieces) for name in "abc"]
    s = new_stream(sim, files, ahead=True)
    for _ in range(2):
        round_of(s, blocks, targets_of(sim, *blocks))
    return s, blocks


def test_the_blocks_foreseen_are_read_ahead_and_copied_once_queued(small_ring, sim, tmp_path):
    s, blocks = order_learned(sim, tmp_path, pieces=1)
    assert s.pump.pieces_read == 6 and not s._ahead
    a, b, c = blocks
    into_a, into_b, into_c = targets_of(sim, *blocks)
    settled(s.copy_ahead(a, into_a, None, None, False))
    # b and c, foreseen after a, are read (the ring holds 4 pieces), not copied.
    wait_until(lambda: s.pump.pieces_read == 6 + 1 + 2)
    assert [block for block, _, _ in s._ahead] == [b, c]
    time.sleep(0.05)
    assert torch.count_nonzero(into_b) == 0 and torch.count_nonzero(into_c) == 0
    assert s.take_bytes_read() == 7 * PIECE  # copied: two rounds and a
    pending = s.copy_ahead(b, into_b, None, None, False)  # b's job, read already, attached
    assert settled(pending) == (None, None, None)
    assert torch.equal(into_b, expected(b))
    # Then a, foreseen after c (the next round), is read ahead too.
    wait_until(lambda: s.pump.pieces_read == 6 + 1 + 2 + 1)
    assert [block for block, _, _ in s._ahead] == [c, a]
    assert settled(s.copy_ahead(c, into_c, None, None, False)) == (None, None, None)
    assert torch.equal(into_c, expected(c))
    wait_until(lambda: s.pump.pieces_read == 11)  # and b, foreseen after a
    assert [block for block, _, _ in s._ahead] == [a, b]
    assert s.take_bytes_read() == 2 * PIECE
    assert (s.read_ahead_used, s.read_ahead_dropped) == (2, 0)
    s.drain()  # the reads ahead of a and b are dropped
    assert s._ahead == collections.deque() and s.pump.kept == 0
    assert (s.read_ahead_used, s.read_ahead_dropped) == (2, 2)
    s.close()


def test_a_block_not_foreseen_drops_the_blocks_read_ahead_before_it(small_ring, sim, tmp_path):
    s, blocks = order_learned(sim, tmp_path, pieces=1)
    a, b, c = blocks
    into_a, into_b, into_c = targets_of(sim, *blocks)
    settled(s.copy_ahead(a, into_a, None, None, False))
    wait_until(lambda: len(s._ahead) == 2 and s.pump.pieces_read == 9)
    (_, dropped, _), _ = s._ahead
    # c comes before b this time: b, read ahead before c, is dropped; c's read is used.
    assert settled(s.copy_ahead(c, into_c, None, None, False)) == (None, None, None)
    assert torch.equal(into_c, expected(c)) and torch.count_nonzero(into_b) == 0
    wait_until(lambda: [block for block, _, _ in s._ahead] == [a] and s.pump.pieces_read >= 10)
    assert s.pump.pieces_read == 10  # a read ahead again, c not read again
    assert (s.read_ahead_used, s.read_ahead_dropped) == (1, 1)
    assert s.pump.result(dropped)[0] == "cancelled"
    assert s.take_bytes_read() == 7 * PIECE + PIECE  # b copied nothing
    # Learned now: c after a, and a after c (from the round before): a is foreseen, and
    # b, coming instead, drops it and is read.
    assert settled(s.copy_ahead(b, into_b, None, None, False)) == (None, None, None)
    assert torch.equal(into_b, expected(b))
    assert (s.read_ahead_used, s.read_ahead_dropped) == (1, 2)
    s.drain()
    assert not s._ahead and s.pump.kept == 0
    s.close()


def test_a_failed_read_ahead_fails_its_block_when_queued_and_no_other(small_ring, sim, tmp_path):
    s, blocks = order_learned(sim, tmp_path, pieces=1)
    a, b, c = blocks
    into_a, into_b, into_c = targets_of(sim, *blocks)
    path = b.file_runs[0][1].path
    before = os.stat(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    settled(s.copy_ahead(a, into_a, None, None, False))
    wait_until(lambda: s.pump.pieces_read == 9)  # b's read ahead fails: nothing says so yet
    with pytest.raises(CheckpointError, match="b.safetensors: changed since its header"):
        settled(s.copy_ahead(b, into_b, None, None, False))
    assert torch.count_nonzero(into_b) == 0
    assert settled(s.copy_ahead(c, into_c, None, None, False)) == (None, None, None)
    assert torch.equal(into_c, expected(c))
    # Read ahead and dropped (c before b), its failure is never raised.
    settled(s.copy_ahead(a, into_a, None, None, False))
    wait_until(lambda: [block for block, _, _ in s._ahead] == [b, c])
    assert settled(s.copy_ahead(c, into_c, None, None, False)) == (None, None, None)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert settled(s.copy_ahead(b, into_b, None, None, False)) == (None, None, None)
    assert torch.equal(into_b, expected(b))
    s.close()


@pytest.mark.parametrize(
    "window, ahead, blocks_ahead",
    [
        (None, "auto", 0),
        (0, "auto", 2),
        (1, "auto", 2),
        (2, "auto", 2),
        (3, "auto", 0),
        (1, 0, 0),
        (3, None, 4),
    ],
)
def test_by_default_a_shallow_window_reads_ahead_half_the_ring(
    small_ring, sim, tmp_path, window, ahead, blocks_ahead
):
    # Blocks of 1 piece, a ring of 4: half the ring holds two blocks, the whole ring four.
    files = Files(tmp_path)
    blocks = [files.block(name, 1) for name in "abcde"]
    s = new_stream(sim, files)
    assert stream.READ_AHEAD_BYTES == s.read_ahead_bytes == "auto"
    s.read_ahead_bytes, s.window = ahead, window
    for _ in range(2):  # the order learned, nothing read ahead yet
        round_of(s, blocks, targets_of(sim, *blocks))
    assert s.pump.pieces_read == 10 and not s._ahead
    a, *after = blocks
    settled(s.copy_ahead(a, targets_of(sim, a)[0], None, None, False))
    wait_until(lambda: s.pump.pieces_read == 10 + 1 + blocks_ahead)
    time.sleep(0.05)  # and no more
    assert s.pump.pieces_read == 10 + 1 + blocks_ahead
    assert [block for block, _, _ in s._ahead] == after[:blocks_ahead]
    assert s.read_ahead_used == 0
    s.close()


def test_a_stream_holding_blocks_read_ahead_closes(small_ring, sim, tmp_path):
    s, blocks = order_learned(sim, tmp_path, pieces=2)
    settled(s.copy_ahead(blocks[0], targets_of(sim, blocks[0])[0], None, None, False))
    wait_until(lambda: s.pump.pieces_read == 12 + 2 + 4)  # b's and c's fill the ring
    assert len(s._ahead) == 2 and s.read_ahead_dropped == 0
    pump = s.pump
    closed = threading.Event()
    threading.Thread(target=lambda: (s.close(), closed.set()), daemon=True).start()
    assert closed.wait(WAIT), "a stream holding blocks read ahead never closed"
    assert pump.closed and pump.kept == 0 and s.read_ahead_dropped == 2
    assert sim.leaks() == []


def test_the_pump_holds_a_job_until_attached_and_refuses_bad_attaches(sim, tmp_path):
    files = Files(tmp_path)
    a, b = files.block("a", 1), files.block("b", 1)
    into_a, into_b = targets_of(sim, a, b)
    ring = [torch.zeros(PIECE, dtype=torch.uint8) for _ in range(4)]
    pump = aimdo._core.FilePump(sim.driver, 0, [(r.data_ptr(), PIECE) for r in ring], 2)
    s = new_stream(sim, files, ahead=True)
    try:
        pieces_a, _ = s._pieces_of(a)
        pieces_b, _ = s._pieces_of(b)
        held = pump.queue_held(pieces_a)
        after = pump.queue(pieces_b, into_b.data_ptr(), 0, 0, 0, 0, False, into_b)
        wait_until(lambda: pump.pieces_read == 2)
        time.sleep(0.05)
        # b, queued after the held a, waits behind it; nothing is copied.
        assert not pump.ended(held) and not pump.ended(after)
        assert torch.count_nonzero(into_a) == 0 and torch.count_nonzero(into_b) == 0
        with pytest.raises(ValueError, match="not a held job"):
            pump.attach(after, into_a.data_ptr(), 0, 0, 0, 0, False)
        with pytest.raises(ValueError, match="not a held job"):
            pump.cancel(after)
        pump.attach(held, into_a.data_ptr(), 0, 0, 0, 0, False, into_a)
        assert pump.result(held)[0] == "done" and pump.result(after)[0] == "done"
        assert torch.equal(into_a, expected(a)) and torch.equal(into_b, expected(b))
        with pytest.raises(ValueError, match="attached or cancelled already"):
            pump.attach(held, into_a.data_ptr(), 0, 0, 0, 0, False)
        with pytest.raises(ValueError, match="was attached"):
            pump.cancel(held)
        dropped = pump.queue_held(pieces_a)
        pump.cancel(dropped)
        pump.cancel(dropped)  # again: nothing
        assert pump.result(dropped)[0] == "cancelled"
        with pytest.raises(ValueError, match="attached or cancelled already"):
            pump.attach(dropped, into_a.data_ptr(), 0, 0, 0, 0, False)
        for number in (held, after, dropped):
            pump.forget(number)
        assert pump.kept == 0 and pump.take_bytes_copied() == 2 * PIECE
        unattached = pump.queue_held(pieces_b)
    finally:
        pump.close()
        s.close()
    assert pump.ended(unattached)  # closing cancelled it


def test_a_block_ends_before_the_pump_waits_for_the_one_read_ahead_after_it(
    small_ring, sim, tmp_path, monkeypatch
):
    # One buffer: a's only piece fills the ring, so nothing marks a's pieces all handed
    # out until b's piece (read ahead) is handed out after it. The pump must still end a
    # before it waits for b's attach: the forward waits for a before it queues b.
    monkeypatch.setattr(stream, "RING_BUFFERS", 1)
    files = Files(tmp_path)
    a, b = files.block("a", 1), files.block("b", 1)
    s = new_stream(sim, files, ahead=True)
    for _ in range(2):
        round_of(s, [a, b], targets_of(sim, a, b))
    into_a, into_b = targets_of(sim, a, b)
    with sim.hold(COPY, 0) as copying:
        pending = s.copy_ahead(a, into_a, None, None, False)
        assert [block for block, _, _ in s._ahead] == [b]  # held before a's copy is queued
        assert copying.wait_arrived(WAIT)
    assert settled(pending) == (None, None, None)
    assert torch.equal(into_a, expected(a))
    assert settled(s.copy_ahead(b, into_b, None, None, False)) == (None, None, None)
    assert torch.equal(into_b, expected(b)) and s.read_ahead_used == 1
    s.close()


class InterruptedAfterQueueHeld:
    """A pump whose queue_held raises KeyboardInterrupt once the job is queued (a signal
    landing just after the native call, before the stream notes the job)."""

    def __init__(self, pump):
        self._pump = pump

    def __getattr__(self, name):
        return getattr(self._pump, name)

    def queue_held(self, pieces):
        self._pump.queue_held(pieces)
        raise KeyboardInterrupt


def test_an_interrupt_while_reading_ahead_leaves_no_held_job_behind(small_ring, sim, tmp_path):
    # (Found by review: the held job, queued and not noted, held up every copy after it.)
    s, blocks = order_learned(sim, tmp_path, pieces=1)
    a, b, c = blocks
    into_a, into_b, into_c = targets_of(sim, *blocks)
    real = s.pump
    s._held.pump = InterruptedAfterQueueHeld(real)
    try:
        with pytest.raises(KeyboardInterrupt):
            s.copy_in(a, into_a)  # in line: nothing drains after it
    finally:
        s._held.pump = real
    assert not s._ahead
    assert settled(s.copy_ahead(c, into_c, None, None, False)) == (None, None, None)
    assert torch.equal(into_c, expected(c))
    s.close()


def test_the_pump_drops_held_jobs_on_drain_and_reads_no_more_of_one_cancelled(
    small_ring, sim, tmp_path
):
    files = Files(tmp_path)
    a = files.block("a", 3)
    ring = [torch.zeros(PIECE, dtype=torch.uint8)]  # one buffer: one piece read at a time
    ring_arguments = [(r.data_ptr(), PIECE) for r in ring]
    pump = aimdo._core.FilePump(sim.driver, 0, ring_arguments, READERS, small_ring)
    s = new_stream(sim, files)
    try:
        pieces, _ = s._pieces_of(a)
        copies = len([line for line in sim.log().splitlines() if line.startswith(COPY)])
        first = pump.queue_held(pieces)
        wait_until(lambda: pump.pieces_read == 1)  # its first piece waits in the buffer
        pump.cancel(first)
        assert pump.result(first)[0] == "cancelled"
        assert pump.pieces_read == 1  # the other two never read
        second = pump.queue_held(pieces)
        third = pump.queue_held(pieces)
        pump.cancel_held()  # both, though the caller named neither
        assert [pump.result(n)[0] for n in (second, third)] == ["cancelled"] * 2
        fourth = pump.queue_held(pieces)
        pump.drain()  # returns: the held job not attached is cancelled
        assert pump.result(fourth)[0] == "cancelled"
        for number in (first, second, third, fourth):
            pump.forget(number)
        assert pump.kept == 0 and pump.take_bytes_copied() == 0
        assert len([line for line in sim.log().splitlines() if line.startswith(COPY)]) == copies
    finally:
        pump.close()
        s.close()
