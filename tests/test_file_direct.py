"""Reading the checkpoint past the page cache (O_DIRECT, issue 14): reads of any offset
and length give the same bytes as through the cache, from an aligned range around them;
a file system that refuses O_DIRECT is read through the cache; the choice follows the host
memory the page cache would have; an offload reading that way computes the same."""

from __future__ import annotations

import errno
import logging
import os

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error
safetensors_torch = pytest.importorskip("safetensors.torch")

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo import _torch_handle, _torch_stream  # noqa: E402
from aimdo._safetensors import read_checkpoint, stamp  # noqa: E402
from aimdo._torch_checkpoint import DIRECT_ALIGN, Reader  # noqa: E402
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
                lead = direct.read_into(tensor, buffer, start, count)
                assert lead == (tensor.offset + start) % DIRECT_ALIGN
                assert torch.equal(buffer[lead : lead + count], want), (tensor.name, start)
        if not forced_aligned_path:
            # O_DIRECT where the file system has it, else (tmpfs) through the cache.
            assert (direct.direct_files[path] is not None) == o_direct_works(path)
    finally:
        direct.close()
        cached.close()
    assert direct.files == {} and direct.direct_files == {}


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_file_system_refusing_o_direct_is_read_through_the_cache(tmp_path, monkeypatch):
    path, found = odd_file(tmp_path)
    real_open = os.open

    def refusing(name, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    reader = Reader({path: stamp(path)}, direct=True)
    tensor = found["b"]
    buffer = aligned_buffer(tensor.nbytes)
    assert reader.read_into(tensor, buffer, 0, tensor.nbytes) == 0
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
        reader.read_into(last, aligned_buffer(last.nbytes), 0, last.nbytes)
    reader.close()


def test_a_direct_ring_has_aligned_buffers_with_room_for_the_alignment(monkeypatch):
    monkeypatch.setattr(_torch_stream, "RING_BUFFERS", 4)
    s = _torch_stream.FileStream({}, pin=False, largest=10_000, direct=True)
    ring = s._ring()
    assert all(b.tensor.data_ptr() % DIRECT_ALIGN == 0 for b in ring)
    assert all(b.tensor.numel() == 10_000 + 2 * DIRECT_ALIGN for b in ring)
    assert s.nbytes == 4 * (10_000 + 3 * DIRECT_ALIGN)
    s.close()


@pytest.mark.parametrize(
    ("available", "streamed", "pinned", "direct"),
    [(10 << 30, 4 << 30, 2 << 30, False), (10 << 30, 9 << 30, 2 << 30, True)],
)
def test_o_direct_is_chosen_when_the_page_cache_could_not_keep_the_files(
    monkeypatch, available, streamed, pinned, direct
):
    monkeypatch.setattr(_torch_stream, "available_host_bytes", lambda: available)
    chosen, why = _torch_stream.reads_direct(streamed, pinned)
    if not hasattr(os, "O_DIRECT"):
        assert (chosen, why) == (False, "through the page cache (no O_DIRECT here)")
        return
    assert chosen is direct
    assert why.startswith(
        "with O_DIRECT: the page cache could not keep them"
        if direct
        else ("through the page cache, which can keep them (8.00 GiB")
    )


def test_an_offload_reading_past_the_page_cache_computes_the_same(
    make_manager, tmp_path, monkeypatch, caplog
):
    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in real.state_dict().items()}, path)
    monkeypatch.setattr(
        _torch_handle, "reads_direct", lambda streamed, pinned: (True, "with O_DIRECT (test)")
    )
    caplog.set_level(logging.INFO, logger="aimdo")
    with torch.device("meta"):
        model = stack(blocks=6)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        assert o._stream.direct and o._stream.reader.direct
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
            assert o.last_stats.bytes_from_files > 0
    assert any("they are read with O_DIRECT (test)" in r.getMessage() for r in caplog.records)
