"""offload(..., checkpoint=...): a module built on the meta device takes its weights from
safetensors files, read straight into the host chunks, one copy in all; bad files are
refused before anything changes, naming file and tensor (issue 14, item 1)."""

from __future__ import annotations

import json
import logging
import os
import re
import struct

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error
safetensors_torch = pytest.importorskip("safetensors.torch")

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from conftest import PAGE  # noqa: E402
from torch_support import (  # noqa: E402
    count_copies,
    mixed_pages,
    new_manager,
    reference,
    stack,
    weight_bytes,
    where,
)


def on_meta(blocks: int = 6, width: int = 256) -> torch.nn.Module:
    with torch.device("meta"):
        return stack(blocks=blocks, width=width)


def save(model, path, **changes) -> dict:
    """Save the model's state dict (with `changes`: name -> tensor, or None to leave it
    out) as one safetensors file; returns what was saved."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    safetensors_torch.save_file(tensors, str(path))
    return tensors


def assert_untouched(model, manager) -> None:
    assert manager.vbar_count(0) == 0
    assert all(p.device.type == "meta" for p in model.parameters())
    assert "forward" not in model.__dict__


def info_logged(caplog, text: str) -> list[str]:
    """The messages logged at INFO by the logger ``aimdo`` that hold `text`."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aimdo" and r.levelno == logging.INFO and text in r.getMessage()
    ]


def test_a_meta_module_runs_on_the_checkpoints_weights_held_once(make_manager, tmp_path):
    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    save(real, tmp_path / "model.safetensors")
    model = on_meta()
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=tmp_path / "model.safetensors") as o:
        assert model[0].up.weight.device == where(0)  # a placeholder on the compute device
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
        # The chunks hold each weight once; the module holds none of its own.
        assert o.pinned_bytes == weight_bytes(real)
    # Undone: the module is as it was, on the meta device.
    assert all(p.device.type == "meta" for p in model.parameters())
    assert manager.vbar_count(0) == 0


def test_a_sharded_checkpoint_and_a_folder_are_read_the_same(make_manager, tmp_path):
    real = stack(blocks=4)
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    state = {k: v.contiguous() for k, v in real.state_dict().items()}
    names = sorted(state)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in shards.items():
        safetensors_torch.save_file({n: state[n] for n in part}, str(tmp_path / file))
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    manager = new_manager(make_manager, pages=4)
    for location in (tmp_path / "model.safetensors.index.json", tmp_path):
        model = on_meta(blocks=4)
        with atorch.offload(model, 0, manager=manager, checkpoint=location):
            assert torch.equal(model(x.to(where(0))), expected)


def test_host_weights_take_the_checkpoints_values_and_keep_them_after_undo(make_manager, tmp_path):
    source = stack(blocks=3, seed=1)
    x = torch.randn(2, 256)
    expected = reference(source, x, 0)
    save(source, tmp_path / "model.safetensors")
    model = stack(blocks=3, seed=2)  # real weights, other values
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=tmp_path / "model.safetensors"):
        assert torch.equal(model(x.to(where(0))), expected)
    for mine, theirs in zip(model.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_a_host_buffer_the_checkpoint_lacks_keeps_its_own_values(make_manager, tmp_path):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 64)
            self.register_buffer("scale", torch.full((64,), 3.0), persistent=False)

        def forward(self, x):
            return self.linear(x) * self.scale

    torch.manual_seed(0)
    real = Scaled()
    x = torch.randn(2, 64)
    expected = reference(real, x, 0)
    save(real, tmp_path / "model.safetensors")  # state_dict leaves the buffer out
    with torch.device("meta"):
        model = Scaled()
    model.scale = torch.full((64,), 3.0)  # made on the host, as a model's init would
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=tmp_path / "model.safetensors"):
        assert torch.equal(model(x.to(where(0))), expected)


def test_a_tied_weight_is_read_once_under_either_name(make_manager, tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 64)
            self.head = torch.nn.Linear(64, 100, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    real = Tied()
    ids = torch.randint(0, 100, (2, 5))
    expected = reference(real, ids, 0)
    manager = new_manager(make_manager, pages=4)
    weight = real.embed.weight.detach().contiguous()
    for saved in ({"head.weight": weight}, {"embed.weight": weight}):
        safetensors_torch.save_file(saved, str(tmp_path / "tied.safetensors"))
        with torch.device("meta"):
            model = Tied()
        with atorch.offload(
            model, 0, manager=manager, checkpoint=tmp_path / "tied.safetensors"
        ) as o:
            assert torch.equal(model(ids.to(where(0))), expected)
            assert o.pinned_bytes == weight.numel() * weight.element_size()


def cut(path, nbytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda p, m: cut(p, 100), r"tensor [\w.]+ ends at byte \d+, past the file's end"),
        (lambda p, m: p.write_bytes(b"\x10" + p.read_bytes()[1:]), "header is not JSON|claims"),
        (lambda p, m: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "claims"),
        (lambda p, m: p.write_bytes(b"abc"), "too short"),
        (lambda p, m: save(m, p, **{"0.up.weight": None}), "has no tensor 0.up.weight"),
        (lambda p, m: save(m, p, extra=torch.zeros(3)), "tensor extra is not a weight"),
        (
            lambda p, m: save(m, p, **{"1.down.bias": torch.zeros(256, dtype=torch.float16)}),
            r"tensor 1.down.bias is F16, the module's 1.down.bias is torch.float32",
        ),
        (
            lambda p, m: save(m, p, **{"2.norm.weight": torch.zeros(255)}),
            r"tensor 2.norm.weight has shape \[255\]",
        ),
    ],
)
def test_bad_checkpoints_are_refused_before_anything_changes(
    make_manager, tmp_path, spoil, message
):
    real = stack(blocks=3)
    path = tmp_path / "model.safetensors"
    save(real, path)
    spoil(path, real)
    model = on_meta(blocks=3)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(aimdo.CheckpointError, match=message) as raised:
        atorch.offload(model, 0, manager=manager, checkpoint=path)
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, aimdo.AimdoError) and isinstance(raised.value, ValueError)
    assert_untouched(model, manager)


def test_bad_locations_are_refused(make_manager, tmp_path):
    model = on_meta(blocks=2)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(aimdo.CheckpointError, match="cannot be read"):
        atorch.offload(model, 0, manager=manager, checkpoint=tmp_path / "absent.safetensors")
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(aimdo.CheckpointError, match="name the index or the file"):
        atorch.offload(model, 0, manager=manager, checkpoint=tmp_path)
    index = tmp_path / "x.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"0.up.weight": "missing.safetensors"}}))
    with pytest.raises(aimdo.CheckpointError, match="missing.safetensors: cannot be read"):
        atorch.offload(model, 0, manager=manager, checkpoint=index)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        atorch.offload(model, 0, manager=manager, checkpoint=3)
    with pytest.raises(ValueError, match="on the meta device, with a checkpoint"):
        atorch.offload(model, 0, manager=manager)
    assert_untouched(model, manager)


def test_a_file_changed_after_its_header_was_read_is_refused(make_manager, tmp_path, monkeypatch):
    import aimdo._torch_handle as handle

    real = stack(blocks=2)
    path = tmp_path / "model.safetensors"
    save(real, path)
    place = handle.place

    def place_then_change(*args, **kwargs):  # between the header's read and the weights'
        os.utime(path, ns=(1, 1))
        return place(*args, **kwargs)

    monkeypatch.setattr(handle, "place", place_then_change)
    model = on_meta(blocks=2)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(aimdo.CheckpointError, match="changed since its header was read"):
        atorch.offload(model, 0, manager=manager, checkpoint=path)
    assert_untouched(model, manager)


def test_a_group_reads_the_checkpoint_once_for_every_member(make_manager, tmp_path):
    from test_torch_group import group_manager

    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = [reference(real, x, device) for device in (0, 1)]
    save(real, tmp_path / "model.safetensors")
    model = on_meta()
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(
        model, [0, 1], manager=manager, checkpoint=tmp_path / "model.safetensors"
    ) as group:
        for _ in range(2):
            for device in (0, 1):
                assert torch.equal(group[device](x.to(where(device))), expected[device])
        assert group.pinned_bytes == weight_bytes(real)


def params_to_meta(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its parameters on the meta device (ties kept) and its buffers as
    they were: what building under accelerate's init_empty_weights() gives."""
    made = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
                module._parameters[name] = made[id(param)]
    return model


def test_llama_from_its_saved_checkpoint_generates_the_same_tokens(make_manager, tmp_path):
    from test_torch_models import llama

    real = llama()  # tied embeddings: save_pretrained leaves lm_head out
    ids = torch.tensor([[3, 141, 59, 26, 535]])
    plain = reference(real, ids, 0)
    tokens = real.generate(ids, max_new_tokens=8, do_sample=False)
    real.save_pretrained(tmp_path)
    assert "lm_head.weight" not in safetensors_torch.load_file(tmp_path / "model.safetensors")
    model = params_to_meta(llama())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=tmp_path) as offloaded:
        assert torch.equal(model(ids.to(where(0))).logits, plain.logits)
        generated = model.generate(ids.to(where(0)), max_new_tokens=8, do_sample=False)
        assert torch.equal(generated.cpu(), tokens)
        weights = sum(
            t.numel() * t.element_size()
            for t in {id(t): t for t in list(real.parameters()) + list(real.buffers())}.values()
        )
        # Each weight once (the tied one once), runs aligned to 64 bytes in the chunks.
        padding = offloaded.pinned_bytes - weights
        assert 0 <= padding < 64 * len(offloaded.placement())


def test_qwen_image_from_its_saved_folder_runs_bit_for_bit(make_manager, tmp_path):
    from test_torch_models import build, qwen_image

    real, inputs = build(qwen_image)
    with torch.no_grad():
        expected = reference_call(real, inputs)
    real.save_pretrained(tmp_path)  # config.json and one safetensors file
    model, _ = build(qwen_image)
    params_to_meta(model)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, checkpoint=tmp_path):
        assert torch.equal(model(**inputs).sample, expected.sample)


def reference_call(model, inputs):
    import copy

    return copy.deepcopy(model).to(where(0))(**inputs)


def checkpoint_of(real, tmp_path):
    path = tmp_path / "model.safetensors"
    save(real, path)
    return path


def saved_stack(make_manager, tmp_path):
    """A 6-block stack saved as one file in tmp_path, an input, the stack's plain output
    on device 0, the same model built on the meta device, and a Manager of 4 pages (8 of
    its 12 MiB of large blocks)."""
    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    path = checkpoint_of(real, tmp_path)
    return real, x, expected, path, on_meta(), new_manager(make_manager, pages=4)


def test_host_limit_zero_reads_every_block_from_the_files_at_each_copy(make_manager, tmp_path):
    import aimdo._torch_stream as stream

    # 8 of the 12 MiB fit: some blocks are copied at each forward.
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        assert o.streamed_bytes == sum(b.nbytes for b in o._blocks) and o.pinned_bytes == 0
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
            stats = o.last_stats
            assert stats.bytes_copied > 0 and stats.bytes_from_files == stats.bytes_copied
        # No chunk: only the ring the reads go through, its buffers no larger than the
        # largest tensor read (all far below RING_BUFFER_BYTES here).
        largest = max(t.numel() * t.element_size() for t in real.state_dict().values())
        assert largest < stream.RING_BUFFER_BYTES
        assert o.pinned_bytes == stream.RING_BUFFERS * largest
    assert o.pinned_bytes == 0


def test_the_ring_holds_four_of_the_largest_block_read_from_the_files(
    make_manager, tmp_path, monkeypatch
):
    import aimdo._torch_stream as stream

    monkeypatch.setattr(stream, "RING_BUFFERS", 2)  # fewer than four blocks' buffers
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        assert torch.equal(model(x.to(where(0))), expected)
        largest_block = max(sum(w.source.nbytes for w in b.weights) for b in o._blocks)
        largest = max(t.numel() * t.element_size() for t in real.state_dict().values())
        buffers = -(-4 * largest_block // largest)
        assert o._stream.largest_block == largest_block and buffers > 2
        assert o._stream.ring_buffers == buffers
        assert o.pinned_bytes == buffers * largest


def test_the_blocks_a_forward_copies_from_the_files_are_read_ahead(
    make_manager, tmp_path, monkeypatch
):
    import aimdo._torch_stream as stream

    monkeypatch.setattr(stream, "READ_AHEAD_BYTES", None)  # on: the ring's bytes
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0, prefetch=2) as o:
        used = []
        for _ in range(5):
            assert torch.equal(model(x.to(where(0))), expected)
            used.append(o._stream.read_ahead_used)
        # The first forward copies every block in line; the second, in the schedule's
        # order, learns it; the third sees it again and reads the next forward's blocks
        # ahead; from the fourth, each of its 5 copies finds its block read already.
        assert o.last_stats.offloaded_layers == 5 and o.last_stats.copied_layers == 0
        assert used == [0, 0, 0, 5, 10] and o._stream.read_ahead_dropped == 0


def test_by_default_the_files_are_read_ahead_while_the_prefetch_window_is_shallow(
    make_manager, tmp_path
):
    import aimdo._torch_stream as stream

    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0, prefetch=2) as o:
        s = o._stream
        ring = s.ring_buffers * s.buffer_bytes
        assert s.read_ahead_bytes == "auto" and s.window == 2
        assert s.read_ahead_limit() == int(ring * stream.READ_AHEAD_SHARE)
        for _ in range(4):
            assert torch.equal(model(x.to(where(0))), expected)
        assert s.read_ahead_used == 5  # the fourth forward's copies, as with the ring's bytes
        o._runner.schedule.set_prefetch(stream.READ_AHEAD_WINDOW + 1, 1 << 30)
        assert s.window == stream.READ_AHEAD_WINDOW + 1 and s.read_ahead_limit() == 0
        # The next forward uses the blocks read ahead before the change, and reads none.
        assert torch.equal(model(x.to(where(0))), expected)
        used = s.read_ahead_used
        assert used > 5 and not s._ahead
        assert torch.equal(model(x.to(where(0))), expected)
        assert s.read_ahead_used == used and s.read_ahead_dropped == 0


def placed_last_within(placed: list, sizes: dict, limit: int) -> set:
    """The names the placement rule pins within `limit` bytes: the blocks placed last
    first (`placed`: names in placement order; `sizes`: name -> bytes), each that fits."""
    left, pinned = limit, set()
    for name in reversed(placed):
        if sizes[name] <= left:
            left -= sizes[name]
            pinned.add(name)
    return pinned


def test_host_limit_with_a_depth_given_pins_the_blocks_placed_last_and_streams_the_rest(
    make_manager, tmp_path, caplog
):
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    limit = 5 << 20  # the 6 norms (small, placed first) and 4 of the 12 large blocks
    caplog.set_level(logging.INFO, logger="aimdo")
    # A depth given: no forward is timed to choose it, so the tiers are chosen here.
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit="5MiB", prefetch=2
    ) as o:
        placed = [name for name, _, _ in o.placement()]  # by offset: placement order
        sizes = {block.name: block.nbytes for block in o._blocks}
        pinned = placed_last_within(placed, sizes, limit)
        streamed = {block.name for block in o._blocks if block.file_runs}
        assert streamed == set(placed) - pinned and len(streamed) == 8
        assert all(name.endswith(("up", "down")) for name in streamed)
        assert o.streamed_bytes == sum(sizes[name] for name in streamed)
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
        ring = o._stream.nbytes
        assert o.pinned_bytes - ring <= limit
        assert host_bytes_held(o) == o.pinned_bytes  # the count is what the tensors hold
    logged = info_logged(caplog, "stay in the checkpoint")
    assert len(logged) == 1 and "host_limit=5.00 MiB" in logged[0] and "8 blocks" in logged[0]
    assert "read ahead of their copies (up to " in logged[0]
    assert "ring) while the prefetch window is at most 2 copies" in logged[0]


def test_the_default_host_limit_pins_half_the_host_memory_available(
    make_manager, tmp_path, caplog, monkeypatch
):
    import aimdo._torch_tiers as tiers

    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    caplog.set_level(logging.INFO, logger="aimdo")
    # 10 MiB available: "auto" pins up to half of it, as host_limit="5MiB" does above.
    monkeypatch.setattr(tiers, "available_host_bytes", lambda: 10 << 20)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, prefetch=2) as o:
        placed = [name for name, _, _ in o.placement()]
        sizes = {block.name: block.nbytes for block in o._blocks}
        pinned = placed_last_within(placed, sizes, 5 << 20)
        streamed = {block.name for block in o._blocks if block.file_runs}
        assert streamed == set(placed) - pinned and len(streamed) == 8
        assert torch.equal(model(x.to(where(0))), expected)
        assert o.pinned_bytes - o._stream.nbytes <= 5 << 20
        assert host_bytes_held(o) == o.pinned_bytes
    logged = info_logged(caplog, "stay in the checkpoint")
    assert len(logged) == 1 and "8 blocks" in logged[0]
    assert "host_limit='auto': 50% of the 10.00 MiB of host memory available" in logged[0]
    # Room for twice the weights: every weight pinned, nothing read from the files.
    caplog.clear()
    weights = sum(sizes.values())
    monkeypatch.setattr(tiers, "available_host_bytes", lambda: 2 * weights)
    model = on_meta()
    with atorch.offload(model, 0, manager=manager, checkpoint=path, prefetch=2) as o:
        assert not any(block.file_runs for block in o._blocks) and o._stream is None
        assert o.pinned_bytes == weights == host_bytes_held(o) and o.streamed_bytes == 0
        assert torch.equal(model(x.to(where(0))), expected)
    logged = info_logged(caplog, "in host memory")
    assert len(logged) == 1 and "0 blocks (0 B) stay in the checkpoint" in logged[0]
    assert "host_limit='auto': the weights fit in 50% of the" in logged[0]


def host_bytes_held(o) -> int:
    """The host memory an offload's weights and ring hold, measured on the tensors
    themselves rather than taken from its own count: every distinct storage its blocks
    copy from, and every ring buffer's (all of it pinned on CUDA)."""
    storages = {}
    for block in o._blocks:
        for _, source in block.runs:
            storage = source.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    ring = o._stream.buffers if o._stream is not None else []
    return sum(storages.values()) + sum(b.whole.untyped_storage().nbytes() for b in ring)


def scripted_stalls(monkeypatch, per_byte: dict) -> None:
    """Make the forward timed block by block report, for each block it used, its bytes
    times per_byte[its name's last part] seconds of the compute waiting for it (the
    tiers' choice reads them)."""
    import aimdo._torch_handle as handle

    def stall_seconds(marks, elapsed):
        used = dict.fromkeys(block for _, block, _ in marks if block is not None)
        return {b: b.nbytes * per_byte[b.name.rsplit(".", 1)[-1]] for b in used}

    monkeypatch.setattr(handle, "stall_seconds", stall_seconds)


def copied_at_every_forward(o, manager) -> list:
    """The names of the blocks the budget leaves out (their end is beyond it: 8 MiB on
    the saved_stack's Manager), placed last first: the order the placement rule pins
    them in."""
    budget = manager.budget_bytes(0)
    placed = o.placement()  # (name, offset, bytes), by offset: the placement order
    return [name for name, at, nbytes in reversed(placed) if at + nbytes > budget]


@pytest.mark.sim_only  # the budget to the byte: the 4 pages of the simulator
def test_host_limit_pins_the_copied_blocks_the_compute_waited_for_most_once_timed(
    make_manager, tmp_path, caplog, monkeypatch
):
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    # The compute waited ten times as long per byte for the down projections as for the
    # ups (reads the compute around them could not hide).
    scripted_stalls(monkeypatch, {"norm": 0.0, "up": 1e-9, "down": 1e-8})
    caplog.set_level(logging.INFO, logger="aimdo")
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit="5MiB") as o:
        sizes = {block.name: block.nbytes for block in o._blocks}
        # Until a forward is timed every block is in the files, none pinned.
        assert o.streamed_bytes == sum(sizes.values())
        assert o.pinned_bytes == o._stream.nbytes
        copied = copied_at_every_forward(o, manager)
        downs = [name for name in copied if name.endswith("down")]
        ups = [name for name in copied if name.endswith("up")]
        norms = [name for name in sizes if name.endswith("norm")]
        assert len(downs) == 3 and len(ups) == 2  # ups 1 MiB + 4 KiB, downs 1 MiB + 1 KiB
        assert torch.equal(model(x.to(where(0))), expected)  # learns the order
        assert o.streamed_bytes == sum(sizes.values())
        assert torch.equal(model(x.to(where(0))), expected)  # timed block by block
        pinned = {block.name for block in o._blocks if not block.file_runs}
        # 5 MiB: the copied downs first, then the up placed last, then the norms; the
        # other copied up does not fit. The placement rule would have pinned both ups
        # and two of the downs (placed last first).
        assert pinned == {*downs, ups[0], *norms}
        assert sum(sizes[n] for n in pinned) + sizes[ups[1]] > 5 << 20
        assert o.pinned_bytes - o._stream.nbytes == sum(sizes[name] for name in pinned)
        assert host_bytes_held(o) == o.pinned_bytes
        assert o.streamed_bytes == sum(sizes.values()) - sum(sizes[name] for name in pinned)
        for _ in range(2):
            assert torch.equal(model(x.to(where(0))), expected)
    assert o.pinned_bytes == 0
    logged = info_logged(caplog, "it read from the files")
    assert len(logged) == 1 and "pins 10 blocks (4.02 MiB)" in logged[0]
    assert "4 (4.01 MiB) copied at every forward" in logged[0]
    assert "6 others; 8 blocks (8.02 MiB) stay in the files" in logged[0]


@pytest.mark.sim_only  # the budget to the byte: the 4 pages of the simulator
def test_host_limit_with_little_room_pins_the_copied_blocks_waited_for_most(
    make_manager, tmp_path, monkeypatch
):
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    scripted_stalls(monkeypatch, {"norm": 0.0, "up": 1e-9, "down": 1e-8})
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit="2MiB") as o:
        copied = copied_at_every_forward(o, manager)
        norms = {block.name for block in o._blocks if block.name.endswith("norm")}
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
        pinned = {block.name for block in o._blocks if not block.file_runs}
        # 2 MiB: one copied down (placed last of them; two are 2 KiB too many), then the
        # norms. The placement rule would have pinned the up placed last instead.
        first_down = next(name for name in copied if name.endswith("down"))
        assert copied[0].endswith("up")
        assert pinned == {first_down} | norms


@pytest.mark.sim_only  # the budget to the byte: the 4 pages of the simulator
def test_blocks_left_in_the_files_after_the_choice_are_still_read_ahead(
    make_manager, tmp_path, caplog, monkeypatch
):
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    scripted_stalls(monkeypatch, {"norm": 0.0, "up": 1e-9, "down": 1e-8})
    caplog.set_level(logging.INFO, logger="aimdo")
    kept = {"1.norm": "file"}  # forced into the files: counted among those left there
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit="2MiB", host_tiers=kept
    ) as o:
        s = o._stream
        s.read_ahead_bytes = None  # the ring's bytes at any depth the trials try
        for _ in range(2):  # learns the order; timed: one down and the norms pinned
            assert torch.equal(model(x.to(where(0))), expected)
        assert o._later is not None
        streamed = [block for block in o._blocks if block.file_runs]
        assert len(streamed) == 12 and any(block.name == "1.norm" for block in streamed)
        # The order learned in the timed forward stays, without the pinned block: the
        # second forward after it (the first that saw the order twice) finds the three
        # offloaded blocks left in the files after the first of them read ahead, as it
        # would have had nothing moved (the order forgotten, it would take one more).
        seen = []
        for _ in range(2):
            assert torch.equal(model(x.to(where(0))), expected)
            seen.append(s.read_ahead_used)
        assert seen == [0, 3]
    logged = info_logged(caplog, "it read from the files")
    assert len(logged) == 1 and "; 12 blocks (" in logged[0] and "stay in the files" in logged[0]


@pytest.mark.sim_only  # the budget to the byte: the 4 pages of the simulator
def test_an_interrupted_choice_of_the_pinned_blocks_is_made_at_the_next_timed_forward(
    make_manager, tmp_path, monkeypatch
):
    import aimdo._torch_handle as handle

    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    scripted_stalls(monkeypatch, {"norm": 0.0, "up": 1e-9, "down": 1e-8})
    move_in = handle.HostWeights.move_in
    calls = []

    def interrupted_once(self):
        calls.append(self)
        if len(calls) == 1:
            raise KeyboardInterrupt
        move_in(self)

    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit="2MiB") as o:
        monkeypatch.setattr(handle.HostWeights, "move_in", interrupted_once)
        total = o.streamed_bytes
        assert torch.equal(model(x.to(where(0))), expected)  # learns the order
        with pytest.raises(KeyboardInterrupt):
            model(x.to(where(0)))  # timed; its choice interrupted
        assert o.streamed_bytes == total and o.pinned_bytes == o._stream.nbytes
        assert torch.equal(model(x.to(where(0))), expected)  # timed again: chosen
        assert len(calls) == 2 and o._later is not None
        pinned = {block.name for block in o._blocks if not block.file_runs}
        assert len(pinned) == 7 and sum(1 for n in pinned if n.endswith("down")) == 1
        for _ in range(2):
            assert torch.equal(model(x.to(where(0))), expected)


def test_pinning_chosen_blocks_that_fails_leaves_them_in_the_files(
    make_manager, tmp_path, caplog, monkeypatch
):
    import aimdo._torch_handle as handle

    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    scripted_stalls(monkeypatch, {"norm": 0.0, "up": 1e-9, "down": 1e-8})
    caplog.set_level(logging.INFO, logger="aimdo")
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit="5MiB") as o:
        total = o.streamed_bytes

        def refused(self):
            raise aimdo.OutOfMemoryError("no host memory (scripted)")

        monkeypatch.setattr(handle.HostWeights, "move_in", refused)
        for _ in range(4):
            assert torch.equal(model(x.to(where(0))), expected)
        assert o.streamed_bytes == total and o.pinned_bytes == o._stream.nbytes
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no host memory (scripted)" in warned[0]
    assert "leaves 4.02 MiB of weights in the files" in warned[0]


def test_the_tiers_choice_takes_the_copied_blocks_waited_for_most_per_byte_first():
    from aimdo._torch_tiers import STALL_FLOOR, pinned_by_stall

    class B:
        def __init__(self, name, nbytes):
            self.name, self.nbytes = name, nbytes

    a, b, c, d, e = B("a", 4), B("b", 4), B("c", 2), B("d", 4), B("e", 1)
    candidates = [a, b, c, d, e]  # the placement rule's order: placed last first
    every = {a, b, c, d}
    ms = 1e-3
    stalls = {b: 4 * ms, c: 4 * ms, d: STALL_FLOOR / 2, e: 9 * ms}  # per byte: c, b
    # c then b (most waiting per byte), then a and d (no stall: candidates' order); e is
    # not copied at every forward, so after them all.
    assert pinned_by_stall(candidates, every, stalls, 6) == [b, c]
    assert pinned_by_stall(candidates, every, stalls, 9) == [b, c, e]
    assert pinned_by_stall(candidates, every, stalls, 10) == [a, b, c]
    assert pinned_by_stall(candidates, every, stalls, 3) == [c, e]
    assert pinned_by_stall(candidates, every, {}, 5) == [a, e]  # no stall: the order
    assert pinned_by_stall(candidates, set(), stalls, 5) == [a, e]
    assert pinned_by_stall(candidates, every, stalls, 0) == []


def test_blocks_in_the_files_are_read_and_copied_by_native_threads_ahead_of_the_compute(
    make_manager, tmp_path, monkeypatch
):
    import threading

    import aimdo._torch_stream as stream

    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    calls = []  # (how the forward queued a block's copy, from which thread)
    originals = {name: getattr(stream.FileStream, name) for name in ("copy_in", "copy_ahead")}

    def recording(name):
        def call(self, *args):
            calls.append((name, threading.current_thread().name))
            return originals[name](self, *args)

        return call

    for name in originals:
        monkeypatch.setattr(stream.FileStream, name, recording(name))
    forward_thread = threading.current_thread().name
    python_threads = set(threading.enumerate())
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        assert torch.equal(model(x.to(where(0))), expected)
        # The first forward learns the order and copies in line: its thread waits.
        assert calls and set(calls) == {("copy_in", forward_thread)}
        calls.clear()
        for _ in range(2):
            read = o._stream.pump.pieces_read
            assert torch.equal(model(x.to(where(0))), expected)
            assert o.last_stats.bytes_from_files > 0
            assert o._stream.pump.pieces_read > read
        # Then the copies are queued ahead, the forward going on; the pump's native
        # threads read the pieces and queue their copies: no Python thread of its own.
        assert calls and set(calls) == {("copy_ahead", forward_thread)}
        assert set(threading.enumerate()) == python_threads
    assert o._stream is None or o._stream.pump is None


def test_host_tiers_force_blocks_into_the_files_or_into_pinned_memory(
    make_manager, tmp_path, caplog
):
    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    path = checkpoint_of(real, tmp_path)
    manager = new_manager(make_manager, pages=4)
    caplog.set_level(logging.INFO, logger="aimdo")
    # Everything would be pinned (host_limit=None) but two blocks are forced to the files.
    model = on_meta()
    tiers = {"0.up": "file", model[3].down: "file"}
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit=None, host_tiers=tiers
    ) as o:
        assert {b.name for b in o._blocks if b.file_runs} == {"0.up", "3.down"}
        assert o.streamed_bytes == sum(b.nbytes for b in o._blocks if b.name in ("0.up", "3.down"))
        assert o.streamed_bytes == real[0].up.weight.nbytes + real[0].up.bias.nbytes + (
            real[3].down.weight.nbytes + real[3].down.bias.nbytes
        )
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
    logged = info_logged(caplog, "stay in the checkpoint")
    assert "host_tiers forces 0 blocks pinned and 2 in the files" in logged[-1]
    # Everything would stream (host_limit=0) but two blocks are forced pinned.
    model = on_meta()
    tiers = {"1.up": "pinned", "4.down": "pinned"}
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit=0, host_tiers=tiers
    ) as o:
        streamable = {b.name for b in o._blocks}
        assert {b.name for b in o._blocks if not b.file_runs} == {"1.up", "4.down"}
        assert {b.name for b in o._blocks if b.file_runs} == streamable - set(tiers)
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)


@pytest.mark.parametrize(
    "tiers, error, match",
    [
        ({"9.up": "file"}, ValueError, "'9.up' is no module of this model"),
        ({"0.up": "disk"}, ValueError, "a tier is one of"),
        ({3: "file"}, TypeError, "keys are modules or names"),
        (["0.up"], TypeError, "host_tiers must map"),
    ],
)
def test_host_tiers_refuse_bad_input_before_anything_changes(
    make_manager, tmp_path, tiers, error, match
):
    real = stack(blocks=6)
    path = checkpoint_of(real, tmp_path)
    model = on_meta()
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(error, match=match):
        atorch.offload(model, 0, manager=manager, checkpoint=path, host_tiers=tiers)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not manager.vbars(0)


def test_host_tiers_need_a_checkpoint(make_manager):
    model = stack(blocks=2)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(ValueError, match="it needs checkpoint="):
        atorch.offload(model, 0, manager=manager, host_tiers={"0.up": "file"})


def test_a_file_changed_under_a_running_model_is_refused_and_nothing_is_lost(
    make_manager, tmp_path
):
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    before = os.stat(path)
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0):
        assert torch.equal(model(x.to(where(0))), expected)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
        with pytest.raises(aimdo.CheckpointError, match="changed since its header was read") as e:
            model(x.to(where(0)))
        named = re.search(r"\(reading tensor (\S+)\)", str(e.value))
        assert str(path) in str(e.value) and named and named.group(1) in real.state_dict()
        # The file as it was: the module runs again, nothing lost.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        for _ in range(2):
            assert torch.equal(model(x.to(where(0))), expected)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert manager.vbar_count(0) == 0


def threads_now() -> int:
    """The process's threads, the native ones included (Linux)."""
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_no_thread_is_left_once_a_streaming_module_is_undone_or_refused(
    make_manager, tmp_path, monkeypatch
):
    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    # One whole cycle first: the threads PyTorch and the driver start once and keep are
    # running before the count, so the count sees what one offload leaves behind.
    warm = on_meta()
    with atorch.offload(warm, 0, manager=manager, checkpoint=path, host_limit=0):
        assert torch.equal(warm(x.to(where(0))), expected)
    before = threads_now()
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        assert torch.equal(model(x.to(where(0))), expected)
        assert threads_now() > before and o._stream is not None  # its readers run
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        with pytest.raises(aimdo.CheckpointError, match="changed since its header was read"):
            model(x.to(where(0)))
    assert threads_now() == before
    # Refused while reading the pinned weights, its ring made: nothing is left running.
    import aimdo._torch_handle as handle

    place = handle.place

    def place_then_change(*args, **kwargs):
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        return place(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(handle, "place", place_then_change)
        with pytest.raises(aimdo.CheckpointError, match="changed since its header was read"):
            atorch.offload(
                on_meta(), 0, manager=manager, checkpoint=path, host_limit="5MiB", prefetch=2
            )
    assert threads_now() == before
    assert manager.vbar_count(0) == 0


def test_host_limit_is_checked(make_manager, tmp_path):
    model = stack(blocks=2)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(ValueError, match="needs checkpoint="):
        atorch.offload(model, 0, manager=manager, host_limit=0)
    with pytest.raises(ValueError, match="host_limit must be"):
        atorch.offload(model, 0, manager=manager, checkpoint=tmp_path, host_limit=-1)
    with pytest.raises(ValueError):
        atorch.offload(model, 0, manager=manager, host_limit="lots")
    assert manager.vbar_count(0) == 0


def test_a_group_streams_through_a_ring_per_member(make_manager, tmp_path):
    from test_torch_group import group_manager

    real = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = [reference(real, x, device) for device in (0, 1)]
    path = checkpoint_of(real, tmp_path)
    model = on_meta()
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(
        model, [0, 1], manager=manager, checkpoint=path, host_limit=0, peers=False
    ) as group:
        for _ in range(3):
            for device in (0, 1):
                assert torch.equal(group[device](x.to(where(device))), expected[device])
        streams = [offload._stream for offload in group.offloads]
        assert streams[0] is not streams[1] and all(s.nbytes for s in streams)
        # The same ring for each: its buffers' size, and their count from the leader's
        # largest block (here the default 24: the blocks are small).
        rings = {(s.largest_block, s.ring_buffers, s.buffer_bytes) for s in streams}
        assert len(rings) == 1 and streams[0].largest_block > 0


def test_the_default_prefetch_is_chosen_when_blocks_stay_in_the_files(make_manager, tmp_path):
    from aimdo._torch_tune import START

    real, x, expected, path, model, manager = saved_stack(make_manager, tmp_path)
    # Blocks in the files: the depth is chosen (prefetch="auto", the default).
    with atorch.offload(model, 0, manager=manager, checkpoint=path, host_limit=0) as o:
        assert o.streamed_bytes > 0
        assert o.prefetch == START and o.prefetch_choosing
        for _ in range(2):  # learns the order; times it and predicts
            assert torch.equal(model(x.to(where(0))), expected)
        assert o.prefetch_predictions is not None
    # A depth given is kept, files or not.
    with atorch.offload(
        on_meta(), 0, manager=manager, checkpoint=path, host_limit=0, prefetch=3
    ) as o:
        assert o.prefetch == 3 and not o.prefetch_choosing


@pytest.mark.sim_only  # which copies ride: the schedule's bookkeeping, on the CPU
def test_blocks_read_from_the_files_ride_in_the_room_of_a_staging_buffer(
    make_manager, tmp_path, monkeypatch
):
    # Every block in the files, none resident, prefetch 1: the one-page blocks after a
    # one-page block read into the room its three-page staging buffer has left, through
    # the file stream, and the outputs stay the model's.
    torch.manual_seed(0)
    real = mixed_pages()
    x = torch.randn(2, 256)
    expected = reference(real, x, 0)
    path = checkpoint_of(real, tmp_path)
    with torch.device("meta"):
        model = mixed_pages()
    manager = new_manager(make_manager, pages=0, headroom=PAGE)
    counted = count_copies(monkeypatch)
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit=0, prefetch=1
    ) as offloaded:
        for _ in range(4):
            assert torch.equal(model(x.to(where(0))), expected)
        assert offloaded.last_stats.bytes_from_files == offloaded.last_stats.bytes_copied
    assert counted.get(("file", True), 0) > 0
    assert set(counted) <= {("file", True), ("file", False)}


def test_the_tier_plan_streams_the_blocks_placed_first_and_defers_the_choice_when_asked():
    from types import SimpleNamespace

    from aimdo._torch_tiers import plan_tiers

    meta = torch.empty(0, device="meta")

    class Block:  # hashed by identity, as the layout's blocks are
        def __init__(self, name, nbytes, streams):
            self.name, self.nbytes = name, nbytes
            self.weights = [SimpleNamespace(source=object() if streams else None, tensor=meta)]

    def block(name, nbytes, streams=True):
        return Block(name, nbytes, streams)

    own, a, b, c = block("own", 2, streams=False), block("a", 4), block("b", 4), block("c", 4)
    order = [own, a, b, c]  # placement order; a VRAM budget of 6 bytes holds own and a
    # 6 bytes pinned: own (cannot stream), then c (placed last); a and b stream, b beyond
    # the budget, so read at every forward.
    plan = plan_tiers(order, 6, {}, 6, defer=False)
    assert (plan.files, plan.every, plan.pinned, plan.deferred) == ([a, b], 4, 6, None)
    assert plan.said.startswith("pins 6 B of its 14 B of weights in host memory (host_limit=6 B)")
    # Deferred: everything that can stream is read from the files until the timed forward,
    # then 4 bytes are pinned among the candidates (placed last first).
    plan = plan_tiers(order, 6, {}, 6, defer=True)
    assert (plan.files, plan.every, plan.pinned) == ([a, b, c], 4, 6)
    assert plan.deferred == ([c, b, a], 4) and "pins 2 B of its 14 B" in plan.said
    # c forced into the files: b is pinned instead, and c is no candidate.
    plan = plan_tiers(order, 6, {c: "file"}, 6, defer=True)
    assert plan.deferred == ([b, a], 4) and plan.files == [a, b, c]
    assert "host_tiers forces 0 blocks pinned and 1 in the files" in plan.said
    plan = plan_tiers(order, 6, {c: "file"}, 6, defer=False)
    assert (plan.files, plan.every, plan.deferred) == ([a, c], 4, None)
    # Everything pinned: nothing to defer.
    plan = plan_tiers(order, None, {}, 6, defer=True)
    assert (plan.files, plan.every, plan.pinned, plan.deferred) == ([], 0, 14, None)
