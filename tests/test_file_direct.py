"""Reading the checkpoint past the page cache (O_DIRECT, issue 14): reads of any offset
and length give the same bytes as through the cache, from an aligned range around them;
a file system that refuses O_DIRECT is read through the cache; the choice follows the host
memory the page cache would have; an offload reading that way computes the same."""

from __future__ import annotations

import errno
import logging
import os
import time

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error
safetensors_torch = pytest.importorskip("safetensors.torch")

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo import _torch_stream, _torch_tiers  # noqa: E402
from aimdo._safetensors import read_checkpoint, stamp  # noqa: E402
from aimdo._torch_checkpoint import DIRECT_ALIGN, Reader  # noqa: E402
from aimdo._torch_offload import offloaded_by  # noqa: E402
from native_reads import NativeReads  # noqa: E402
from torch_support import new_manager, reference, stack, where  # noqa: E402


def odd_file(tmp_path):
    """A file whose tensors start at offsets that are not multiples of DIRECT_ALIGN."""
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randint(0, 255, (4099,), dtype=torch.uint8, generator=gen),
        "b": torch.randn(3, 2053, generator=gen),
        "c": torch.randint(0, 255, (12_289,), dtype=torch.uint8, generator=gen),
    }
    path = str(tmp_path / "odd.safetensors")
    safetensors_torch.save_file(tensors, path)
    found = read_checkpoint(path)
    assert any(t.offset % DIRECT_ALIGN for t in found.values())
    return path, found


def aligned_buffer(count: int) -> torch.Tensor:
    whole = torch.empty(count + 3 * DIRECT_ALIGN, dtype=torch.uint8)
    start = -whole.data_ptr() % DIRECT_ALIGN
    return whole[start : start + count + 2 * DIRECT_ALIGN]


def pieces(tensor):
    """(start, count) pairs over a tensor: its whole, and pieces crossing alignment."""
    n = tensor.nbytes
    return [(0, n), (1, n - 1), (n - 5, 5), (n // 3, n // 3 + 1), (DIRECT_ALIGN - 1, 2)]


def read_into(reader: Reader, tensor, buffer, start: int, count: int) -> int:
    """A piece read as the ring reads it (NativeReads over `reader`); returns where in
    `buffer` its bytes begin."""
    reads = NativeReads(reader, 1)
    try:
        ticket = reads.submit(tensor, buffer, start, count)
        while not reads.wait(ticket):
            pass
        return reads.take(ticket)
    finally:
        reads.close()


def o_direct_works(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("forced_aligned_path", [False, True])
def test_direct_reads_give_the_bytes_of_reads_through_the_cache(
    tmp_path, monkeypatch, forced_aligned_path
):
    path, found = odd_file(tmp_path)
    direct = Reader({path: stamp(path)}, direct=True)
    cached = Reader({path: stamp(path)})
    if forced_aligned_path:
        # The aligned reads on a plain descriptor: the same arithmetic whatever the file
        # system says of O_DIRECT.
        monkeypatch.setattr(direct, "_open_direct", lambda tensor: direct._open(tensor))
    try:
        for tensor in found.values():
            for start, count in pieces(tensor):
                want = torch.empty(count, dtype=torch.uint8)
                cached.read(tensor, want, start)
                buffer = aligned_buffer(count)
                lead = read_into(direct, tensor, buffer, start, count)
                assert lead == (tensor.offset + start) % DIRECT_ALIGN
                assert torch.equal(buffer[lead : lead + count], want), (tensor.name, start)
        if not forced_aligned_path:
            # O_DIRECT where the file system has it, else (tmpfs) through the cache.
            assert (direct.direct_files[path] is not None) == o_direct_works(path)
    finally:
        direct.close()
        cached.close()
    assert direct.files == {} and direct.direct_files == {}


def refuse_o_direct(monkeypatch) -> None:
    """os.open refuses O_DIRECT, as tmpfs does."""
    real_open = os.open

    def refusing(name, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_file_system_refusing_o_direct_is_read_through_the_cache(tmp_path, monkeypatch):
    path, found = odd_file(tmp_path)
    refuse_o_direct(monkeypatch)
    reader = Reader({path: stamp(path)}, direct=True)
    tensor = found["b"]
    buffer = aligned_buffer(tensor.nbytes)
    assert read_into(reader, tensor, buffer, 0, tensor.nbytes) == 0
    assert reader.direct_files == {path: None}
    want = torch.empty(tensor.nbytes, dtype=torch.uint8)
    reader.read(tensor, want, 0)
    assert torch.equal(buffer[: tensor.nbytes], want)
    reader.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_truncated_file_read_directly_is_a_checkpoint_error(tmp_path, monkeypatch):
    path, found = odd_file(tmp_path)
    reader = Reader({path: stamp(path)}, direct=True)
    monkeypatch.setattr(reader, "_open_direct", lambda tensor: reader._open(tensor))
    last = max(found.values(), key=lambda t: t.offset)
    os.truncate(path, last.offset + 10)
    reader.stamps = {path: stamp(path)}  # the file as it is now: only its end is missing
    with pytest.raises(aimdo.CheckpointError, match="ends inside tensor c"):
        read_into(reader, last, aligned_buffer(last.nbytes), 0, last.nbytes)
    reader.close()


@pytest.mark.sim_only  # the device's memory is the host's
def test_a_split_pump_reads_a_cached_piece_in_parts_and_a_direct_one_whole(tmp_path):
    path, found = odd_file(tmp_path)
    tensor = found["c"]  # 12,289 bytes, four readers: three parts of 4,096 and one of 1
    sim = aimdo.SimBackend("1x1GiB", real_bytes=True)
    into = torch.zeros(2 * tensor.nbytes, dtype=torch.uint8)
    sim.adopt(0, into)
    ring = [aligned_buffer(tensor.nbytes) for _ in range(2)]
    fd = os.open(path, os.O_RDONLY)
    s = stamp(path)
    # The direct one on a plain descriptor: aligned reads all the same (tmpfs refuses
    # O_DIRECT itself).
    pieces = [
        (fd, direct, tensor.offset, tensor.nbytes, s.size, s.mtime_ns, s.inode, at, 0)
        for direct, at in ((-1, 0), (fd, tensor.nbytes))
    ]
    pump = aimdo._core.FilePump(sim.driver, 0, [(b.data_ptr(), b.numel()) for b in ring], 4, 4096)
    try:
        job = pump.queue(pieces, into.data_ptr(), 0, 0, 0, 0, False, into)
        deadline = time.monotonic() + 10.0  # a hang fails the test
        while not pump.ended(job):
            assert time.monotonic() < deadline, "the pump never ended the job"
            time.sleep(0.001)
        assert pump.result(job)[0] == "done"
        assert pump.pieces_read == 2 and pump.reads == 4 + 1
    finally:
        pump.close()
        os.close(fd)
    want = torch.empty(tensor.nbytes, dtype=torch.uint8)
    cached = Reader({path: s})
    try:
        cached.read(tensor, want, 0)
    finally:
        cached.close()
    assert torch.equal(into[: tensor.nbytes], want) and torch.equal(into[tensor.nbytes :], want)


def test_a_direct_ring_has_aligned_buffers_with_room_for_the_alignment(monkeypatch):
    monkeypatch.setattr(_torch_stream, "RING_BUFFERS", 4)
    sim = aimdo.SimBackend("1x1GiB", real_bytes=True)
    s = _torch_stream.FileStream(
        {}, pin=False, largest=10_000, direct=True, driver=sim.driver, device=0
    )
    s._ring()
    ring = s.buffers
    assert all(b.tensor.data_ptr() % DIRECT_ALIGN == 0 for b in ring)
    assert all(b.tensor.numel() == 10_000 + 2 * DIRECT_ALIGN for b in ring)
    assert s.nbytes == 4 * (10_000 + 3 * DIRECT_ALIGN)
    s.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize(
    ("every", "refused", "expected"),
    [
        (
            4 << 30,
            False,
            (
                False,
                "through the page cache, which can keep the 4.00 GiB read at every forward "
                "(8.00 GiB of host memory available beside the pinned bytes)",
            ),
        ),
        (
            9 << 30,
            False,
            (
                True,
                "with O_DIRECT: the page cache could not keep the 9.00 GiB read at every "
                "forward (the host has 8.00 GiB available beside the pinned bytes)",
            ),
        ),
        (9 << 30, True, (False, "through the page cache (its file system refuses O_DIRECT)")),
    ],
)
def test_o_direct_is_chosen_when_the_page_cache_could_not_keep_what_every_forward_reads(
    tmp_path, monkeypatch, every, refused, expected
):
    path, _ = odd_file(tmp_path)
    monkeypatch.setattr(_torch_tiers, "available_host_bytes", lambda: 10 << 30)
    if refused:
        refuse_o_direct(monkeypatch)
    assert _torch_tiers.reads_direct(every, 2 << 30, path) == expected


def test_without_o_direct_the_files_are_read_through_the_page_cache(monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert _torch_tiers.reads_direct(1 << 40, 0) == (
        False,
        "through the page cache (no O_DIRECT here)",
    )


@pytest.mark.parametrize("forced_aligned_path", [False, True])
def test_an_offload_reading_past_the_page_cache_computes_the_same(
    make_manager, tmp_path, monkeypatch, caplog, forced_aligned_path
):
    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in real.state_dict().items()}, path)
    if forced_aligned_path:
        # The aligned reads and the offsets into the ring, whatever the file system says.
        monkeypatch.setattr(Reader, "_open_direct", lambda self, tensor: self._open(tensor))
    caplog.set_level(logging.INFO, logger="aimdo")
    with torch.device("meta"):
        model = stack(blocks=6)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit=0, file_reads="direct"
    ) as o:
        assert o._stream.direct and o._stream.reader.direct
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
            assert o.last_stats.bytes_from_files > 0
        if not forced_aligned_path:
            reader = o._stream.reader
            assert (reader.direct_files[path] is not None) == o_direct_works(path)
    said = "they are read with O_DIRECT where the file system takes it (file_reads='direct')"
    assert any(said in r.getMessage() for r in caplog.records)


def test_a_group_reads_as_its_leader_chose(make_manager, tmp_path, monkeypatch):
    from test_torch_group import group_manager

    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = [reference(real, x, device) for device in (0, 1)]
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in real.state_dict().items()}, path)
    with torch.device("meta"):
        model = stack(blocks=6)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(
        model,
        [0, 1],
        manager=manager,
        checkpoint=path,
        host_limit=0,
        peers=False,
        file_reads="direct",
    ) as group:
        assert [o._stream.direct for o in group.offloads] == [True, True]
        for _ in range(2):
            for device in (0, 1):
                assert torch.equal(group[device](x.to(where(device))), expected[device])


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_file_changed_under_a_direct_read_is_a_checkpoint_error(tmp_path, monkeypatch):
    path, found = odd_file(tmp_path)
    reader = Reader({path: stamp(path)}, direct=True)
    monkeypatch.setattr(reader, "_open_direct", lambda tensor: reader._open(tensor))
    tensor = found["a"]
    read_into(reader, tensor, aligned_buffer(tensor.nbytes), 0, tensor.nbytes)
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(aimdo.CheckpointError, match="changed since its header was read"):
        read_into(reader, tensor, aligned_buffer(tensor.nbytes), 0, tensor.nbytes)
    reader.close()


def test_a_direct_ring_stays_pinned_under_inference_mode(monkeypatch):
    import gc
    import weakref

    unpinned = []

    def pin(tensor):
        return weakref.finalize(tensor, unpinned.append, tensor.data_ptr())

    monkeypatch.setattr(_torch_stream, "pin_tensor", pin)
    monkeypatch.setattr(_torch_stream, "RING_BUFFERS", 4)
    sim = aimdo.SimBackend("1x1GiB", real_bytes=True)
    s = _torch_stream.FileStream(
        {}, pin=True, largest=10_000, direct=True, driver=sim.driver, device=0
    )
    with torch.inference_mode():  # views there keep no reference to their base
        s._ring()
    gc.collect()
    assert unpinned == []
    s.close()
    assert len(unpinned) == 4


def test_file_reads_forces_either_way_and_bad_values_change_nothing(make_manager, tmp_path, caplog):
    real = stack(blocks=6)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in real.state_dict().items()}, path)
    with torch.device("meta"):
        model = stack(blocks=6)
    manager = new_manager(make_manager, pages=4)
    for bad, error, match in [
        ("fast", ValueError, "file_reads must be one of"),
        (True, ValueError, "file_reads must be one of"),
    ]:
        with pytest.raises(error, match=match):
            atorch.offload(model, 0, manager=manager, checkpoint=path, file_reads=bad)
    with pytest.raises(ValueError, match="it needs checkpoint="):
        atorch.offload(real, 0, manager=manager, file_reads="cached")
    assert manager.vbar_count(0) == 0 and offloaded_by(model) is None
    caplog.set_level(logging.INFO, logger="aimdo")
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit=0, file_reads="cached"
    ) as o:
        assert not o._stream.direct
    said = "they are read through the page cache (file_reads='cached')"
    assert any(said in r.getMessage() for r in caplog.records)


def test_the_choice_of_o_direct_counts_the_ring_as_pinned(make_manager, tmp_path, monkeypatch):
    import aimdo._torch_handle as handle

    real = stack(blocks=6)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in real.state_dict().items()}, path)
    asked = []
    choose = handle.reads_direct
    monkeypatch.setattr(
        handle,
        "reads_direct",
        lambda every, pinned, *rest: asked.append(pinned) or choose(every, pinned, *rest),
    )
    with torch.device("meta"):
        model = stack(blocks=6)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        # No weight pinned: only the ring, made at the first copy, is.
        assert asked == [o._stream.ring_buffers * o._stream.buffer_bytes] and asked[0] > 0
        model(torch.randn(2, 256).to(where(0)))
        assert o.pinned_bytes == asked[0]
