"""The pipeline that copies blocks left in their checkpoint files (aimdo._torch_stream,
issue 14): pieces are read by several threads into a ring of buffers and copied in order;
the reads of one block do not wait for the block before it to finish; a failed read fails
its own block only, after every read of it has ended."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

from aimdo import _torch_stream as stream  # noqa: E402
from aimdo._torch_checkpoint import CheckpointError  # noqa: E402

PIECE = 16  # bytes of a ring buffer here


def byte_of(name: str, start: int) -> int:
    return (sum(map(ord, name)) + start) % 251


class FakeFiles:
    """Stands in for the stream's Reader: fills a piece with a byte naming its tensor and
    offset, records when each read starts, holds the reads named in `held` until
    released, and fails the reads named in `failing`."""

    def __init__(self, held=(), failing=()):
        self.started: list[tuple[str, int]] = []
        self.held = {key: threading.Event() for key in held}
        self.failing = set(failing)
        self.running = 0
        self.lock = threading.Lock()

    def read(self, tensor, into, start=0):
        key = (tensor.name, start)
        with self.lock:
            self.started.append(key)
            self.running += 1
        try:
            if key in self.held:
                assert self.held[key].wait(10), "a held read was never released"
            if key in self.failing:
                raise CheckpointError(f"{tensor.path}: ends early (reading {tensor.name})")
            time.sleep(0.001)
            into.fill_(byte_of(tensor.name, start))
        finally:
            with self.lock:
                self.running -= 1

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


@pytest.fixture
def small_ring(monkeypatch):
    monkeypatch.setattr(stream, "READERS", 2)
    monkeypatch.setattr(stream, "RING_BUFFERS", 4)
    monkeypatch.setattr(stream, "RING_BUFFER_BYTES", PIECE)


def new_stream(files: FakeFiles) -> stream.FileStream:
    s = stream.FileStream({}, pin=False)
    s.reader = files
    return s


def wait_until(condition, seconds: float = 10.0) -> None:
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
    second = s.copy_ahead(b, into_b, None, None, False)
    # a's first piece is held; the ring (4 buffers) takes a's second piece and both of b's.
    wait_until(lambda: {("b", 0), ("b", PIECE)} <= set(files.started))
    assert not first.future.done() and not second.future.done()
    assert torch.count_nonzero(into_b) == 0  # b's copies wait for a's, in order
    files.held["a", 0].set()
    assert first.result() == (None, None, None)
    assert second.result() == (None, None, None)
    assert torch.equal(into_a, expected("a", 2)) and torch.equal(into_b, expected("b", 2))
    assert s.take_bytes_read() == a.nbytes + b.nbytes
    s.close()


def test_more_pieces_than_buffers_reuse_the_ring_in_order(small_ring):
    files = FakeFiles()
    s = new_stream(files)
    blocks = [block_of(name, 7) for name in ("a", "b", "c")]
    targets = targets_of(*blocks)
    pending = [s.copy_ahead(b, t, None, None, True) for b, t in zip(blocks, targets, strict=True)]
    marks = [p.result() for p in pending]
    for block, target in zip(blocks, targets, strict=True):
        assert torch.equal(target, expected(block.file_runs[0][1].name, 7))
    # Timed on the host clock: each copy starts at its first piece and ends after its last,
    # one block after the other.
    assert all(done is None and start <= end for done, start, end in marks)
    assert marks[0][2] <= marks[1][1] and marks[1][2] <= marks[2][1]
    assert s.nbytes == 4 * PIECE
    s.close()
    assert s.nbytes == 0 and s.worker is None and s.pool is None


def test_a_failed_read_fails_its_own_block_after_its_reads_end_and_the_others_land(small_ring):
    files = FakeFiles(held=[("b", 2 * PIECE)], failing=[("b", PIECE)])
    s = new_stream(files)
    blocks = [block_of("a", 2), block_of("b", 3), block_of("c", 2)]
    targets = targets_of(*blocks)
    pending = [s.copy_ahead(b, t, None, None, False) for b, t in zip(blocks, targets, strict=True)]
    assert pending[0].result() == (None, None, None)
    # b's second piece failed while its third is held: b is not settled until that read ends.
    wait_until(lambda: ("b", 2 * PIECE) in files.started)
    time.sleep(0.05)
    assert not pending[1].future.done()
    files.held["b", 2 * PIECE].set()
    with pytest.raises(CheckpointError, match="b.safetensors: ends early"):
        pending[1].result()
    assert files.running == 0  # nothing writes into the ring after the failure is raised
    assert pending[2].result() == (None, None, None)
    assert torch.equal(targets[0], expected("a", 2)) and torch.equal(targets[2], expected("c", 2))
    # b's first piece landed before the failure; nothing after it did.
    assert torch.equal(targets[1][:PIECE], expected("b", 1))
    assert torch.count_nonzero(targets[1][PIECE:]) == 0
    # The stream stays usable: the next copy of b reads again.
    files.failing.clear()
    s.copy_in(blocks[1], targets[1])
    assert torch.equal(targets[1], expected("b", 3))
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
    thread.join(10)
    assert done.is_set() and first.future.done()
    assert torch.equal(into_a, expected("a", 1)) and torch.equal(into_b, expected("b", 1))
    s.close()
