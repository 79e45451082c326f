"""Checkpoint reads on native threads (aimdo._core.FileReads, and NativeReads of
tests/native_reads.py, which gives them a Reader's descriptors, stamps and errors; issue
14): the bytes read are the file's,
through the page cache or with the aligned arithmetic of O_DIRECT; a changed, truncated or
unreadable file comes back as the Reader's CheckpointError; bad requests are refused with
a clear error before anything is read; close reads what is queued and refuses more."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import threading

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
from aimdo import _core  # noqa: E402
from aimdo._safetensors import Tensor, stamp  # noqa: E402
from aimdo._torch_checkpoint import DIRECT_ALIGN, Reader  # noqa: E402
from native_reads import NativeReads  # noqa: E402
from test_file_direct import aligned_buffer, odd_file  # noqa: E402

FILE_BYTES = 3 * DIRECT_ALIGN + 123


@pytest.fixture
def data_file(tmp_path):
    """A file of FILE_BYTES known bytes, open: (its descriptor, its bytes, its stamp as a
    tuple). The descriptor is closed after the test (unless the test closed it)."""
    path = tmp_path / "data.bin"
    data = bytes((i * 7 + 3) % 256 for i in range(FILE_BYTES))
    path.write_bytes(data)
    s = stamp(str(path))
    fd = os.open(path, os.O_RDONLY)
    yield fd, data, (s.size, s.mtime_ns, s.inode)
    with contextlib.suppress(OSError):
        os.close(fd)


@pytest.fixture
def new_reads():
    """FileReads(threads), each closed after the test."""
    made = []

    def make(threads: int):
        made.append(_core.FileReads(threads))
        return made[-1]

    yield make
    for reads in made:
        reads.close()


def read_now(reads, *args):
    ticket = reads.submit(*args)
    assert reads.wait(ticket)
    return reads.take(ticket)


def test_reads_through_the_cache_give_the_files_bytes(data_file, new_reads):
    fd, data, file_stamp = data_file
    reads = new_reads(3)
    spans = [(0, 1), (5, 4096), (4000, 200), (FILE_BYTES - 17, 17), (0, FILE_BYTES)]
    buffers = [bytearray(count) for _, count in spans]
    tickets = [
        reads.submit(fd, -1, offset, count, memoryview(buffer), *file_stamp)
        for (offset, count), buffer in zip(spans, buffers, strict=True)
    ]
    for ticket in reversed(tickets):  # taken in any order
        assert reads.wait(ticket)
        assert reads.take(ticket) == ("done", 0, 0, False)
    for (offset, count), buffer in zip(spans, buffers, strict=True):
        assert bytes(buffer) == data[offset : offset + count]


def test_aligned_reads_put_the_bytes_at_their_lead_in_an_aligned_buffer(data_file, new_reads):
    # A plain descriptor as the direct one: the O_DIRECT arithmetic, whatever the file
    # system says of O_DIRECT.
    fd, data, file_stamp = data_file
    reads = new_reads(2)
    for offset, count in [(0, 10), (4095, 2), (4097, 4096), (FILE_BYTES - 100, 100)]:
        area = mmap.mmap(-1, count + 2 * DIRECT_ALIGN)  # page-aligned
        status, _, lead, refused = read_now(reads, fd, fd, offset, count, area, *file_stamp)
        assert (status, lead, refused) == ("done", offset % DIRECT_ALIGN, False)
        assert area[lead : lead + count] == data[offset : offset + count]
        area.close()


@pytest.mark.parametrize(
    "change",
    [
        lambda st: (st[0] + 1, st[1], st[2]),  # another size
        lambda st: (st[0], st[1] + 1, st[2]),  # another modification time
        lambda st: (st[0], st[1], st[2] + 1),  # another file (inode)
        lambda st: (-1, 0, 0),  # no stamp
    ],
)
def test_a_read_of_a_file_unlike_its_stamp_is_refused_unread(data_file, new_reads, change):
    fd, _, file_stamp = data_file
    reads = new_reads(1)
    buffer = bytearray(16)
    assert read_now(reads, fd, -1, 0, 16, memoryview(buffer), *change(file_stamp))[0] == "changed"
    assert buffer == bytearray(16)


def test_a_file_written_while_it_is_read_is_refused(tmp_path, new_reads):
    # Each read lands in a shared, writable mapping of a page of the file itself: the
    # kernel's copy into it is a write to the file, made during the read, after the
    # check before it. The file's mtime is set far back first, so that write moves it.
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * (4 * DIRECT_ALIGN // 256))
    fd = os.open(path, os.O_RDWR)
    try:

        def written_page(page: int):
            os.utime(path, ns=(1, 1))
            area = mmap.mmap(fd, DIRECT_ALIGN, offset=page * DIRECT_ALIGN)
            return area, stamp(str(path))

        area, before = written_page(2)
        status = read_now(new_reads(1), fd, -1, 0, 64, area, *dataclasses.astuple(before))[0]
        if os.stat(fd).st_mtime_ns == before.mtime_ns:
            pytest.skip("this file system does not time writes made through a mapping")
        assert status == "changed"
        area.close()
        # The Python reader (a pinned chunk's reads at offload) checks after reading too.
        area, before = written_page(3)
        tensor = Tensor("t", str(path), 0, 64, "U8", (64,))
        reader = Reader({str(path): before})
        with pytest.raises(aimdo.CheckpointError, match=r"changed since .*\(reading tensor t\)"):
            reader.read(tensor, torch.frombuffer(area, dtype=torch.uint8)[:64])
        reader.close()
        area.close()
    finally:
        os.close(fd)


def test_reads_past_the_end_are_truncated_and_a_closed_file_fails(data_file, new_reads):
    fd, _, file_stamp = data_file
    reads = new_reads(1)
    past = read_now(reads, fd, -1, FILE_BYTES - 4, 8, bytearray(8), *file_stamp)
    assert past[0] == "truncated"
    area = mmap.mmap(-1, 8 + 2 * DIRECT_ALIGN)
    assert read_now(reads, fd, fd, FILE_BYTES - 4, 8, area, *file_stamp)[0] == "truncated"
    area.close()
    os.close(fd)
    failed = read_now(reads, fd, -1, 0, 8, bytearray(8), *file_stamp)  # fd closed now
    assert failed[:2] == ("failed", errno.EBADF)


def test_an_aligned_read_into_a_buffer_unaligned_or_too_small_is_invalid(data_file, new_reads):
    fd, _, file_stamp = data_file
    reads = new_reads(1)
    area = mmap.mmap(-1, 4 * DIRECT_ALIGN)
    with memoryview(area) as whole:
        unaligned, small = whole[1:], whole[:DIRECT_ALIGN]
        assert read_now(reads, fd, fd, 0, 100, unaligned, *file_stamp)[0] == "invalid"
        # 100 bytes from 4090 span two blocks: 8192 bytes, more than it holds.
        assert read_now(reads, fd, fd, 4090, 100, small, *file_stamp)[0] == "invalid"
        unaligned.release()
        small.release()
    area.close()


def test_bad_requests_are_refused_before_anything_is_read(data_file, new_reads):
    fd, _, file_stamp = data_file
    reads = new_reads(1)
    buffer = bytearray(8)
    with pytest.raises(ValueError, match="fd"):
        reads.submit(-1, -1, 0, 8, buffer, *file_stamp)
    with pytest.raises(ValueError, match="direct_fd"):
        reads.submit(fd, -2, 0, 8, buffer, *file_stamp)
    with pytest.raises(ValueError, match="offset"):
        reads.submit(fd, -1, -1, 8, buffer, *file_stamp)
    with pytest.raises(ValueError, match="count is larger"):
        reads.submit(fd, -1, 0, 9, buffer, *file_stamp)
    with pytest.raises(TypeError, match="writable"):
        reads.submit(fd, -1, 0, 8, b"readonly", *file_stamp)
    with pytest.raises(TypeError):
        reads.submit(True, -1, 0, 8, buffer, *file_stamp)
    for bad in (0, 4096 * 4096):
        with pytest.raises(ValueError, match="threads"):
            _core.FileReads(bad)
    with pytest.raises(ValueError, match="not queued"):
        reads.wait(12345)
    with pytest.raises(ValueError, match="not done"):
        reads.take(12345)


def test_close_reads_what_is_queued_then_refuses_more(data_file, new_reads):
    fd, data, file_stamp = data_file
    reads = new_reads(2)
    buffers = [bytearray(64) for _ in range(50)]
    tickets = [
        reads.submit(fd, -1, i, 64, memoryview(buffer), *file_stamp)
        for i, buffer in enumerate(buffers)
    ]
    del buffers[:25]  # their reads hold them until taken
    reads.close()
    assert reads.closed
    with pytest.raises(aimdo.InvalidStateError):
        reads.submit(fd, -1, 0, 8, bytearray(8), *file_stamp)
    for ticket in tickets:
        assert reads.wait(ticket) and reads.take(ticket)[0] == "done"
    assert all(bytes(b) == data[i + 25 : i + 25 + 64] for i, b in enumerate(buffers))
    reads.close()  # again: nothing happens


def zero_stamp() -> tuple[int, int, int]:
    status = os.stat("/dev/zero")
    return status.st_size, status.st_mtime_ns, status.st_ino


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_poke_ends_a_wait_for_a_read_not_done_once(data_file, new_reads):
    fd, _, file_stamp = data_file
    zero = os.open("/dev/zero", os.O_RDONLY)
    reads = new_reads(1)  # one thread: the reads run one after the other
    big = bytearray(128 << 20)
    ahead = [reads.submit(zero, -1, 0, len(big), big, *zero_stamp()) for _ in range(16)]
    ticket = reads.submit(fd, -1, 0, 8, bytearray(8), *file_stamp)  # behind 2 GiB of zeros
    stop = threading.Event()

    def poke_until_stopped():
        while not stop.wait(0.005):
            reads.poke()

    poker = threading.Thread(target=poke_until_stopped)
    poker.start()
    try:
        assert not reads.wait(ticket)  # poked while the reads ahead ran
        while not reads.wait(ticket):  # each wait ended by one poke, until it is read
            pass
        assert reads.take(ticket)[0] == "done"
    finally:
        stop.set()
        poker.join()
    for t in ahead:
        assert reads.wait(t) and reads.take(t)[0] == "done"
    with pytest.raises(ValueError, match="not queued"):
        reads.wait(ticket)  # taken
    reads.close()
    os.close(zero)


def test_closes_from_two_threads_both_return_once_the_reads_are_done(data_file, new_reads):
    fd, data, file_stamp = data_file
    reads = new_reads(2)
    buffers = [bytearray(FILE_BYTES) for _ in range(64)]
    tickets = [reads.submit(fd, -1, 0, FILE_BYTES, b, *file_stamp) for b in buffers]
    other = threading.Thread(target=reads.close)
    other.start()
    reads.close()
    other.join()
    # Both closes returned: every queued read is done (take refuses one that is not).
    assert all(reads.take(t)[0] == "done" for t in tickets)
    assert all(bytes(b) == data for b in buffers)


def test_native_reads_raise_the_readers_errors(tmp_path):
    path, found = odd_file(tmp_path)
    tensor = max(found.values(), key=lambda t: t.offset)
    reader = Reader({path: stamp(path)})
    reads = NativeReads(reader, 1)
    buffer = aligned_buffer(tensor.nbytes)
    with pytest.raises(ValueError, match="past tensor"):
        reads.submit(tensor, buffer, 1, tensor.nbytes)
    os.truncate(path, tensor.offset + 1)
    reader.stamps = {path: stamp(path)}  # the file as it is now: only its end is missing
    with pytest.raises(aimdo.CheckpointError, match=f"ends inside tensor {tensor.name}"):
        read_now(reads, tensor, buffer, 0, tensor.nbytes)
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(aimdo.CheckpointError, match="changed since its header was read"):
        read_now(reads, tensor, buffer, 0, tensor.nbytes)
    reads.close()
    reader.close()


def test_a_read_the_direct_descriptor_refused_retires_it(tmp_path):
    path, found = odd_file(tmp_path)
    reader = Reader({path: stamp(path)}, direct=True)
    direct_fd = os.open(path, os.O_RDONLY)  # stands in for an O_DIRECT descriptor
    reader.direct_files[path] = direct_fd
    reads = NativeReads(reader, 1)
    tensor = found["b"]

    class Refusing:  # the native answer to a read the O_DIRECT descriptor refused
        def take(self, ticket):
            return ("done", 0, 0, True)

        def close(self):
            pass

    native, reads.reads = reads.reads, Refusing()
    assert reads.take((1, tensor, direct_fd)) == 0
    assert reader.direct_files[path] is None and reader.retired == [direct_fd]
    native.close()
    reader.close()
    with pytest.raises(OSError):
        os.fstat(direct_fd)  # closed with the reader
