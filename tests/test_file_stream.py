"""The pipeline that copies blocks left in their checkpoint files (aimdo._torch_stream,
issue 14): pieces are read by several threads into a ring of buffers and copied in order;
no buffer takes a piece before the copy of the piece it last held; the reads of one block
do not wait for the block before it to finish; a failed read fails its own block only,
after every read of it has ended; no failure leaves a caller waiting forever."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
from aimdo import _torch_stream as stream  # noqa: E402
from aimdo._torch_checkpoint import CheckpointError  # noqa: E402

PIECE = 16  # bytes of a ring buffer here
WAIT = 10.0  # seconds: a test that waits longer has found a hang


def byte_of(name: str, start: int) -> int:
    return (sum(map(ord, name)) + start) % 251


class FakeFiles:
    """Stands in for the stream's Reader: fills a piece with a byte naming its tensor and
    offset, records when each read starts and ends, holds the reads named in `held`
    until released, and fails the reads named in `failing`. With `check_reuse`, a read
    into a buffer whose last piece is not copied yet fails the test (the stream's copies
    give the buffer back: see new_stream)."""

    def __init__(self, held=(), failing=(), check_reuse=True, unopenable=()):
        self.unopenable = set(unopenable)  # tensors whose file cannot be opened
        self.started: list[tuple[str, int]] = []
        self.ended: list[tuple[str, int]] = []
        self.held = {key: threading.Event() for key in held}
        self.failing = set(failing)
        self.check_reuse = check_reuse
        self.in_use: set[int] = set()  # buffers read into and not copied out yet
        self.reused = []  # pieces read into a buffer still in use
        self.lock = threading.Lock()

    def read(self, tensor, into, start=0):
        key = (tensor.name, start)
        with self.lock:
            self.started.append(key)
            if self.check_reuse:
                if into.data_ptr() in self.in_use:
                    self.reused.append(key)
                self.in_use.add(into.data_ptr())
        try:
            if key in self.held:
                assert self.held[key].wait(WAIT), "a held read was never released"
            if key in self.failing:
                raise CheckpointError(f"{tensor.path}: ends early (reading {tensor.name})")
            time.sleep(0.001)
            into.fill_(byte_of(tensor.name, start))
        finally:
            with self.lock:
                self.ended.append(key)

    def copied(self, buffer) -> None:
        with self.lock:
            self.in_use.discard(buffer.tensor.data_ptr())

    def close(self):
        pass


def block_of(name: str, pieces: int):
    tensor = SimpleNamespace(name=name, path=f"{name}.safetensors", offset=0, nbytes=PIECE * pieces)
    return SimpleNamespace(file_runs=[(0, tensor)], nbytes=tensor.nbytes)


def targets_of(*blocks) -> list[torch.Tensor]:
    """Zeroed storage for each block (no piece writes a zero byte: byte_of is 1 or more
    for these names)."""
    return [torch.zeros(block.nbytes, dtype=torch.uint8) for block in blocks]


def expected(name: str, pieces: int) -> torch.Tensor:
    return torch.tensor(
        [byte_of(name, p * PIECE) for p in range(pieces) for _ in range(PIECE)], dtype=torch.uint8
    )


def settled(pending):
    """The Pending's result, failing the test (not hanging it) if it never settles."""
    return pending.future.result(timeout=WAIT)


@pytest.fixture
def small_ring(monkeypatch):
    """A ring of 4 buffers of PIECE bytes, read by 2 threads whatever the host's CPUs."""
    monkeypatch.setattr(stream, "READERS", 2)
    monkeypatch.setattr(stream, "RING_BUFFERS", 4)
    monkeypatch.setattr(stream, "RING_BUFFER_BYTES", PIECE)
    monkeypatch.setattr(stream, "reader_threads", lambda: 2)


class FakeReads:
    """Stands in for the stream's NativeReads: each read runs `files.read` on one of
    `threads` Python threads; wait, poke and take behave as NativeReads' do."""

    def __init__(self, files: FakeFiles, threads: int):
        self.files = files
        self.pool = ThreadPoolExecutor(threads)
        self.changed = threading.Condition()
        self.poked = False

    def submit(self, tensor, into, start, count):
        if tensor.name in self.files.unopenable:  # as NativeReads.submit: it opens the file
            raise CheckpointError(f"{tensor.path}: cannot be read (no such file)")
        future = self.pool.submit(self.files.read, tensor, into[:count], start)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future):
        with self.changed:
            self.changed.notify_all()

    def wait(self, future) -> bool:
        with self.changed:
            while not future.done() and not self.poked:
                self.changed.wait()
            if future.done():
                return True
            self.poked = False
            return False

    def poke(self):
        with self.changed:
            self.poked = True
            self.changed.notify_all()

    def take(self, future) -> int:
        future.result()
        return 0

    def close(self):
        self.pool.shutdown(wait=True)


def new_stream(files: FakeFiles, pin: bool = False) -> stream.FileStream:
    s = stream.FileStream({}, pin=pin)
    s.make_reads = lambda _reader, threads: FakeReads(files, threads)
    copy = s._copy

    def copy_then_give_back(job, offset, count, buffer, lead):
        copy(job, offset, count, buffer, lead)
        files.copied(buffer)

    s._copy = copy_then_give_back
    return s


def wait_until(condition, seconds: float = WAIT / 2) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_the_next_block_is_read_while_a_read_of_the_block_before_it_is_still_running(
    small_ring,
):
    files = FakeFiles(held=[("a", 0)])
    s = new_stream(files)
    a, b = block_of("a", 2), block_of("b", 2)
    into_a, into_b = targets_of(a, b)
    first = s.copy_ahead(a, into_a, None, None, False)
    # b is queued once the pump waits for a's first read (held): queueing must wake it.
    wait_until(lambda: ("a", PIECE) in files.ended)
    time.sleep(0.05)
    second = s.copy_ahead(b, into_b, None, None, False)
    # The ring (4 buffers) takes both of b's pieces while a's first is still read.
    wait_until(lambda: {("b", 0), ("b", PIECE)} <= set(files.started))
    assert not first.future.done() and not second.future.done()
    assert torch.count_nonzero(into_b) == 0  # b's copies wait for a's, in order
    files.held["a", 0].set()
    assert settled(first) == (None, None, None)
    assert settled(second) == (None, None, None)
    assert torch.equal(into_a, expected("a", 2)) and torch.equal(into_b, expected("b", 2))
    assert s.take_bytes_read() == a.nbytes + b.nbytes
    assert files.reused == []
    s.close()


def test_more_pieces_than_buffers_reuse_the_ring_in_order(small_ring):
    files = FakeFiles()
    s = new_stream(files)
    blocks = [block_of(name, 7) for name in ("a", "b", "c")]
    targets = targets_of(*blocks)
    pending = [s.copy_ahead(b, t, None, None, True) for b, t in zip(blocks, targets, strict=True)]
    marks = [settled(p) for p in pending]
    for block, target in zip(blocks, targets, strict=True):
        assert torch.equal(target, expected(block.file_runs[0][1].name, 7))
    # No buffer took a piece before the copy of the piece it held.
    assert len(files.started) == 21 and files.reused == []
    # Timed on the host clock: each copy starts at its first piece and ends after its last,
    # one block after the other.
    assert all(done is None and start <= end for done, start, end in marks)
    assert marks[0][2] <= marks[1][1] and marks[1][2] <= marks[2][1]
    assert s.nbytes == 4 * PIECE
    s.close()
    assert s.nbytes == 0 and s.worker is None and s.reads is None


def test_no_more_pieces_are_read_than_the_ring_has_buffers_free(small_ring):
    files = FakeFiles(held=[("a", 0)])
    s = new_stream(files)
    a = block_of("a", 7)
    (into_a,) = targets_of(a)
    pending = s.copy_ahead(a, into_a, None, None, False)
    # The first piece is held, so its buffer is not free: three more pieces fill the
    # other three buffers, and the fifth waits for the first's copy.
    wait_until(lambda: len(files.ended) == 3)
    time.sleep(0.05)
    assert sorted(files.started) == [("a", start * PIECE) for start in range(4)]
    files.held["a", 0].set()
    settled(pending)
    assert torch.equal(into_a, expected("a", 7)) and files.reused == []
    s.close()


def test_a_failed_read_fails_its_own_block_after_its_reads_end_and_the_others_land(small_ring):
    files = FakeFiles(held=[("b", 2 * PIECE)], failing=[("b", PIECE)], check_reuse=False)
    s = new_stream(files)
    blocks = [block_of("a", 2), block_of("b", 3), block_of("c", 2)]
    targets = targets_of(*blocks)
    pending = [s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks, targets, strict=True)]
    assert settled(pending[0]) == (None, None, None)
    # b's second piece failed while its third is held: b is not settled until that read ends.
    wait_until(lambda: ("b", PIECE) in files.ended and ("b", 2 * PIECE) in files.started)
    time.sleep(0.05)
    assert not pending[1].future.done()
    files.held["b", 2 * PIECE].set()
    with pytest.raises(CheckpointError, match="b.safetensors: ends early"):
        settled(pending[1])
    assert ("b", 2 * PIECE) in files.ended  # nothing of b writes into the ring after it
    assert settled(pending[2]) == (None, None, None)
    assert torch.equal(targets[0], expected("a", 2)) and torch.equal(targets[2], expected("c", 2))
    # b's first piece landed before the failure; nothing after it did.
    assert torch.equal(targets[1][:PIECE], expected("b", 1))
    assert torch.count_nonzero(targets[1][PIECE:]) == 0
    # The stream stays usable: the next copy of b reads again.
    files.failing.clear()
    s.copy_in(blocks[1], targets[1])
    assert torch.equal(targets[1], expected("b", 3))
    s.close()


def test_a_file_that_cannot_be_opened_fails_its_own_block_only(small_ring):
    files = FakeFiles(held=[("a", PIECE)], unopenable=["b"])
    s = new_stream(files)
    blocks = [block_of("a", 2), block_of("b", 2), block_of("c", 2)]
    targets = targets_of(*blocks)
    pending = [s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks, targets, strict=True)]
    # b is refused while a's second read is still held: a's pieces still land.
    wait_until(lambda: ("c", 0) in files.started)
    files.held["a", PIECE].set()
    assert settled(pending[0]) == (None, None, None)
    with pytest.raises(CheckpointError, match="b.safetensors: cannot be read"):
        settled(pending[1])
    assert settled(pending[2]) == (None, None, None)
    assert torch.equal(targets[0], expected("a", 2)) and torch.equal(targets[2], expected("c", 2))
    assert torch.count_nonzero(targets[1]) == 0
    files.unopenable.clear()  # the file is back: the next copy of b reads it
    s.copy_in(blocks[1], targets[1])
    assert torch.equal(targets[1], expected("b", 2))
    s.close()


def test_copy_in_waits_for_the_copies_queued_before_it(small_ring):
    files = FakeFiles(held=[("a", 0)])
    s = new_stream(files)
    a, b = block_of("a", 1), block_of("b", 1)
    into_a, into_b = targets_of(a, b)
    first = s.copy_ahead(a, into_a, None, None, False)
    done = threading.Event()

    def in_line():
        s.copy_in(b, into_b)
        done.set()

    thread = threading.Thread(target=in_line)
    thread.start()
    wait_until(lambda: ("b", 0) in files.started)
    assert not done.wait(0.05)  # b is read, but its copy waits for a's
    files.held["a", 0].set()
    thread.join(WAIT)
    assert done.is_set() and first.future.done()
    assert torch.equal(into_a, expected("a", 1)) and torch.equal(into_b, expected("b", 1))
    s.close()


def test_a_job_that_fails_as_it_finishes_is_failed_not_left_waiting(small_ring, monkeypatch):
    files = FakeFiles()
    s = new_stream(files)
    a, b = block_of("a", 2), block_of("b", 1)
    into_a, into_b = targets_of(a, b)
    finish = stream.FileStream._finish

    def failing(self, job):
        if job.storage is into_a:
            raise RuntimeError("recording the copy's end failed")
        return finish(self, job)

    monkeypatch.setattr(stream.FileStream, "_finish", failing)
    with pytest.raises(RuntimeError, match="recording the copy's end failed"):
        settled(s.copy_ahead(a, into_a, None, None, False))
    # The pump ended with the failure; the next job starts another.
    assert settled(s.copy_ahead(b, into_b, None, None, False)) == (None, None, None)
    assert torch.equal(into_b, expected("b", 1))
    s.close()


class InterruptedOnce:
    """The stream's worker, its first submit interrupted (KeyboardInterrupt): before the
    pump is queued, or (`queued`) after, as it returns."""

    def __init__(self, queued: bool):
        self.real = ThreadPoolExecutor(1)
        self.queued = queued
        self.interrupts = [KeyboardInterrupt()]

    def submit(self, *args):
        if self.interrupts and not self.queued:
            raise self.interrupts.pop()
        future = self.real.submit(*args)
        if self.interrupts:
            raise self.interrupts.pop()
        return future

    def shutdown(self, wait=True):
        self.real.shutdown(wait=wait)


def test_an_interrupt_before_the_pump_starts_takes_the_job_back(small_ring, python_default):
    files = FakeFiles()
    s = new_stream(files)
    a = block_of("a", 1)
    (into_a,) = targets_of(a)
    s.worker = InterruptedOnce(queued=False)
    with pytest.raises(KeyboardInterrupt):
        s.copy_ahead(a, into_a, None, None, False)
    assert not s._queued and not s._pumping
    assert sys.getswitchinterval() == DEFAULT_SWITCH  # no pump holds it lowered
    s.drain()  # waits for nothing: no job is left without a pump
    assert torch.count_nonzero(into_a) == 0
    assert settled(s.copy_ahead(a, into_a, None, None, False)) == (None, None, None)
    assert torch.equal(into_a, expected("a", 1))
    s.close()


def test_a_ring_that_cannot_be_pinned_whole_is_given_back_and_made_again_later(
    small_ring, monkeypatch
):
    pinned, unpinned = [], []

    def pin(tensor):
        if len(pinned) == 2 and not unpinned:  # the third buffer of the first ring fails
            raise aimdo.OutOfMemoryError("pinning failed")
        pinned.append(tensor.data_ptr())
        return lambda: unpinned.append(tensor.data_ptr())

    monkeypatch.setattr(stream, "pin_tensor", pin)
    files = FakeFiles()
    s = new_stream(files, pin=True)
    a = block_of("a", 2)
    (into_a,) = targets_of(a)
    with pytest.raises(aimdo.OutOfMemoryError):
        s.copy_in(a, into_a)
    assert sorted(unpinned) == sorted(pinned) and s.buffers == [] and s.reads is None
    s.copy_in(a, into_a)  # a whole ring this time
    assert torch.equal(into_a, expected("a", 2))
    assert len(s.buffers) == stream.RING_BUFFERS
    s.close()
    assert len(unpinned) == 2 + stream.RING_BUFFERS


def test_a_closed_stream_refuses_copies():
    s = new_stream(FakeFiles())
    s.close()
    a = block_of("a", 1)
    with pytest.raises(aimdo.InvalidStateError, match="closed"):
        s.copy_in(a, *targets_of(a))
    assert s.buffers == [] and s.worker is None


@pytest.mark.parametrize(
    ("largest", "expected_bytes"),
    [(None, 16 << 20), (0, 1), (5, 5), (16 << 20, 16 << 20), (1 << 30, 16 << 20)],
)
def test_a_ring_buffer_is_no_larger_than_the_largest_tensor_read(largest, expected_bytes):
    assert stream.FileStream({}, pin=False, largest=largest).buffer_bytes == expected_bytes


DEFAULT_SWITCH = 0.005  # Python's own default switch interval, seconds
LOWERED = 0.0005  # seconds, as the tests set aimdo's reading switch interval


@pytest.fixture
def python_default():
    """The switch interval at Python's default for the test, aimdo's lowering it to LOWERED
    while reading; both put back after."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(DEFAULT_SWITCH)
    stream.set_reading_switch_interval(LOWERED)
    yield
    sys.setswitchinterval(before)
    stream.set_reading_switch_interval(stream.DEFAULT_READING_SWITCH_INTERVAL)


def held_copy(s: stream.FileStream, files: FakeFiles, name: str):
    """Queue a one-piece block whose read `files` holds; return its Pending once the read
    has started (its pump runs)."""
    block = block_of(name, 1)
    pending = s.copy_ahead(block, targets_of(block)[0], None, None, False)
    wait_until(lambda: (name, 0) in files.started)
    return pending


def test_the_switch_interval_stays_lowered_until_the_last_of_two_pumps_ends(
    small_ring, python_default
):
    files_a, files_b = FakeFiles(held=[("a", 0)]), FakeFiles(held=[("b", 0)])
    s_a, s_b = new_stream(files_a), new_stream(files_b)
    first, second = held_copy(s_a, files_a, "a"), held_copy(s_b, files_b, "b")
    files_a.held["a", 0].set()
    settled(first)
    s_a.drain()  # a's pump has ended (its worker runs nothing else)
    assert sys.getswitchinterval() == LOWERED  # b still reads
    files_b.held["b", 0].set()
    settled(second)
    wait_until(lambda: sys.getswitchinterval() == DEFAULT_SWITCH)
    s_a.close()
    s_b.close()


def test_a_switch_interval_set_while_a_pump_reads_is_kept(small_ring, python_default):
    files = FakeFiles(held=[("a", 0)])
    s = new_stream(files)
    pending = held_copy(s, files, "a")
    sys.setswitchinterval(0.002)  # the user's own, set meanwhile
    files.held["a", 0].set()
    settled(pending)
    s.drain()  # the pump has ended
    assert sys.getswitchinterval() == 0.002
    s.close()


@pytest.mark.parametrize(
    ("setting", "interval", "during"),
    [
        ("default", DEFAULT_SWITCH, DEFAULT_SWITCH),  # aimdo's default: left alone
        (None, DEFAULT_SWITCH, DEFAULT_SWITCH),  # None: left alone
        (LOWERED, DEFAULT_SWITCH, LOWERED),  # lowered while the pump reads
        (LOWERED, 0.0001, 0.0001),  # already shorter: left alone
        (0.001, DEFAULT_SWITCH, 0.001),  # the user's choice of how short
    ],
)
def test_the_switch_interval_while_reading_follows_the_setting_and_is_put_back(
    small_ring, python_default, setting, interval, during
):
    aimdo_torch = pytest.importorskip("aimdo.torch")
    if setting == "default":
        setting = stream.DEFAULT_READING_SWITCH_INTERVAL
    aimdo_torch.set_reading_switch_interval(setting)
    sys.setswitchinterval(interval)
    files = FakeFiles(held=[("a", 0)])
    s = new_stream(files)
    pending = held_copy(s, files, "a")
    assert sys.getswitchinterval() == pytest.approx(during)
    files.held["a", 0].set()
    settled(pending)
    wait_until(lambda: not s._pumping)
    wait_until(lambda: sys.getswitchinterval() == pytest.approx(interval))
    s.close()


@pytest.mark.parametrize(
    ("seconds", "error"),
    [("0.001", TypeError), (True, TypeError), (0, ValueError), (-1.0, ValueError)]
    + [(float("inf"), ValueError), (float("nan"), ValueError)],
)
def test_a_bad_switch_interval_is_refused_and_the_setting_kept(python_default, seconds, error):
    aimdo_torch = pytest.importorskip("aimdo.torch")
    aimdo_torch.set_reading_switch_interval(0.001)
    with pytest.raises(error, match="switch interval"):
        aimdo_torch.set_reading_switch_interval(seconds)
    assert stream.READING_SWITCH_INTERVAL == 0.001


def test_a_pump_queued_though_its_submit_was_interrupted_releases_the_interval_once(
    small_ring, python_default
):
    files = FakeFiles()
    s = new_stream(files)
    a = block_of("a", 1)
    (into_a,) = targets_of(a)
    s.worker = worker = InterruptedOnce(queued=True)
    with pytest.raises(KeyboardInterrupt):
        s.copy_ahead(a, into_a, None, None, False)
    worker.real.submit(lambda: None).result(timeout=WAIT)  # the queued pump has run and ended
    assert sys.getswitchinterval() == DEFAULT_SWITCH
    # Counted out once: the next pump lowers the interval and puts it back again.
    files.held["a", 0] = threading.Event()
    with files.lock:
        files.started.clear()  # the queued pump may have read a already
    pending = s.copy_ahead(a, into_a, None, None, False)
    wait_until(lambda: ("a", 0) in files.started)
    assert sys.getswitchinterval() == LOWERED
    files.held["a", 0].set()
    settled(pending)
    s.drain()
    assert sys.getswitchinterval() == DEFAULT_SWITCH
    s.close()


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (6, 3), (16, 8), (64, 8)])
def test_the_ring_reads_with_at_most_half_the_cpus(monkeypatch, cpus, threads):
    monkeypatch.setattr(stream.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    made = []
    s = stream.FileStream({}, pin=False)
    s.make_reads = lambda _reader, n: made.append(n) or FakeReads(FakeFiles(), n)
    s._ring()
    assert made == [threads] and stream.READERS == 8
    s.close()
