"""aimdo.torch.offload in place: what the module becomes while offloaded, what its outputs
are, what the host holds, and what undo gives back."""

from __future__ import annotations

import copy
import threading
import weakref
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from conftest import BACKEND, PAGE  # noqa: E402
from torch_support import new_manager, reference, stack, weight_bytes, where  # noqa: E402


def test_the_module_runs_in_place_and_reports_the_compute_device(make_manager):
    model = stack(blocks=3)
    plain = copy.deepcopy(model).to(where(0))
    x = torch.randn(2, 256).to(where(0))
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=64)
    offloaded = atorch.offload(model, 0, manager=manager)
    assert offloaded.module is model and offloaded.device == where(0)
    assert {p.device for p in model.parameters()} == {where(0)}  # model.device, for libraries
    # Outside a forward a module holds placeholders: its weights' shapes and dtypes, NaN.
    weight = model[0].up.weight
    assert weight.shape == (1024, 256) and weight.dtype == torch.float32
    assert torch.isnan(weight).all()
    for _ in range(2):
        assert torch.equal(model(x), expected)
    # A module called on its own runs its own block, without prefetch or learning (a
    # module without weights calls each of its own on its own).
    with torch.no_grad():
        assert torch.equal(model[1].up(x), plain[1].up(x))
        assert torch.equal(model[2](x), plain[2](x))
    assert offloaded.last_stats.layers == 1
    assert torch.equal(model(x), expected)
    assert offloaded.last_stats.layers == 9 and offloaded.last_stats.hits == 9


def test_undo_restores_the_modules_own_objects_forwards_and_hooks(make_manager):
    model = stack(blocks=2)
    x = torch.randn(2, 256).to(where(0))
    expected = reference(model, x, 0)
    with torch.no_grad():
        on_host = model(x.cpu())  # after undo the model runs on the host again, as here
    calls = []
    model[0].register_forward_hook(lambda module, args, output: calls.append(1))

    def custom_forward(x):  # a forward set on the instance before offload
        return type(model[1]).forward(model[1], x) * 1

    model[1].forward = custom_forward
    parameters = {name: (p, p.detach().clone(), p.stride()) for name, p in model.named_parameters()}
    manager = new_manager(make_manager, pages=64)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        assert torch.equal(model(x), expected)
        assert calls == [1]  # the user's hook still runs
    assert offloaded.undone and offloaded.pinned_bytes == 0 and offloaded.staging_bytes == 0
    assert model[1].forward is custom_forward
    assert "forward" not in model[0].__dict__ and "forward" not in model.__dict__
    for name, p in model.named_parameters():
        original, values, stride = parameters[name]
        assert p is original and p.requires_grad and p.device.type == "cpu", name
        assert torch.equal(p, values) and p.stride() == stride, name
        # In pageable memory of its own again: nothing of the chunks is kept.
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    with torch.no_grad():
        assert torch.equal(model(x.cpu()), on_host)
    assert calls == [1, 1]
    offloaded.undo()  # a second undo does nothing
    assert manager.vbar_count(0) == 0


def test_weights_are_held_once_on_the_host_in_few_exact_chunks(make_manager, monkeypatch):
    model = stack(blocks=4)
    originals = list(model.parameters())
    total = weight_bytes(model)  # every tensor a multiple of 512 bytes: no padding at all
    manager = new_manager(make_manager, pages=64)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        assert offloaded.pinned_bytes == total
        # The module's own tensors view one chunk of exactly those bytes: no second copy.
        storages = {p.untyped_storage().data_ptr() for p in originals}
        assert len(storages) == 1
        assert originals[0].untyped_storage().nbytes() == total
        model(torch.randn(1, 256).to(where(0)))
    assert offloaded.pinned_bytes == 0
    # Chunks are filled in order up to HOST_CHUNK_BYTES, a block never split: with two
    # Linear(256, 1024) blocks' worth, each layer's norm, up and down fill one chunk.
    largest = 256 * 1024 * 4 + 1024 * 4
    monkeypatch.setattr("aimdo._torch_host.HOST_CHUNK_BYTES", 2 * largest)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        assert offloaded.pinned_bytes == total
        assert len({p.untyped_storage().data_ptr() for p in originals}) == 4


def test_a_dropped_module_frees_everything_without_the_garbage_collector(make_manager):
    manager = new_manager(make_manager, pages=64)
    model = stack(blocks=2)
    offloaded = atorch.offload(model, 0, manager=manager)
    model(torch.randn(1, 256).to(where(0)))
    alive = weakref.ref(model)
    del model, offloaded  # no undo: the module and its offload go together, no cycle
    assert alive() is None
    assert manager.vbar_count(0) == 0


def test_a_tensor_held_by_two_modules_is_placed_and_copied_once(make_manager):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(1024, 256)
            self.head = torch.nn.Linear(256, 1024, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.tensor([[1, 5, 7]]).to(where(0))
    expected = reference(model, ids, 0)
    shared = model.embed.weight
    manager = new_manager(make_manager, pages=64)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        assert [name for name, _, _ in offloaded.placement()] == ["embed"]
        assert offloaded.pinned_bytes == 1024 * 256 * 4
        assert model.head.weight is model.embed.weight  # one placeholder for both
        assert torch.equal(model(ids), expected)
        stats = offloaded.last_stats
        # Faulted for each module, copied once: the head finds it in place.
        assert (stats.layers, stats.copied_layers, stats.hits) == (2, 1, 1)
        assert stats.bytes_copied == 1024 * 256 * 4
    assert model.head.weight is shared and model.embed.weight is shared


@pytest.mark.sim_only  # exact staging bytes: on CUDA the buffers move the budget
def test_a_module_used_twice_per_forward_is_prefetched_at_both_uses(make_manager):
    torch.manual_seed(0)
    shared = torch.nn.Linear(256, 256)
    model = torch.nn.Sequential(shared, torch.nn.Linear(256, 256), shared).eval()
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=0, headroom=PAGE)  # nothing resident
    with atorch.offload(model, 0, manager=manager, prefetch=1) as offloaded:
        for _ in range(3):
            assert torch.equal(model(x), expected)
        # The order has three uses; the first block is staged at each of its two.
        assert len(offloaded._runner.schedule.order) == 3
        stats = offloaded.last_stats
        assert (stats.layers, stats.offloaded_layers) == (3, 3)
        assert offloaded.staging_bytes == 2 * (256 * 256 * 4 + 1024)


class Pair(NamedTuple):
    table: torch.Tensor
    scaled: torch.Tensor


class Labelled(dict):  # a dict subclass, as transformers' ModelOutput is
    pass


class Table(torch.nn.Module):
    """Returns, in the structure asked for, a slice of its own buffer (which aliases its
    weights) or a new tensor, and remembers the object it made."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(4096.0).reshape(16, 256))
        self.made = None

    def forward(self, x, kind: str):
        rows, fresh = self.table[: x.shape[0]], x * 2
        made = {
            "tuple": (fresh, fresh + 1),
            "pair": Pair(rows, fresh),
            "list": [rows, fresh],
            "labelled": Labelled(rows=rows, fresh=fresh),
        }[kind]
        self.made = made
        return made


def test_outputs_are_the_objects_the_module_made_with_only_aliases_copied(make_manager):
    model = Table().eval()
    manager = new_manager(make_manager, pages=64)
    x = torch.ones(3, 256).to(where(0))
    rows = torch.arange(768.0).reshape(3, 256).to(where(0))
    with atorch.offload(model, 0, manager=manager):
        out = model(x, "tuple")  # nothing aliases the weights: the very object made
        assert out is model.made
        out = model(x, "list")  # the same list, its alias replaced by a copy
        assert out is model.made and torch.equal(out[0], rows)
        pair = model(x, "pair")  # a tuple is made again, of its own type, only then
        assert type(pair) is Pair and pair is not model.made
        assert pair.scaled is model.made.scaled and torch.equal(pair.table, rows)
        labelled = model(x, "labelled")
        assert labelled is model.made and type(labelled) is Labelled
        assert torch.equal(labelled["rows"], rows)
        table = model.table  # (outside a forward: the placeholder)
        copies = [out[0], pair.table, labelled["rows"]]
        for tensor in copies:  # none views the block's pages
            assert tensor.untyped_storage().data_ptr() != table.untyped_storage().data_ptr()
    for tensor in copies:  # still valid once the VBAR is gone
        assert torch.equal(tensor, rows)


def test_a_module_reading_a_submodules_weights_is_offloaded_whole(make_manager):
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # Its forward reads out_proj.weight without calling out_proj.
            self.attention = torch.nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(1, 5, 64).to(where(0))
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=64)
    with atorch.offload(model, 0, manager=manager) as offloaded:  # whole by default
        assert [name for name, _, _ in offloaded.placement()] == ["attention"]
        assert torch.equal(model(x), expected)
    # Not whole: out_proj's weight is a placeholder during the read, and shows as NaN.
    with atorch.offload(model, 0, manager=manager, whole=()):
        assert torch.isnan(model(x)).all()


def test_bad_arguments_and_weights_are_refused_with_the_module_unchanged(make_manager):
    manager = new_manager(make_manager, pages=64)
    model = stack(blocks=1)
    before = [(p, p.data_ptr()) for p in model.parameters()]
    bad = [
        (TypeError, {"spread": 1}),
        (ValueError, {"prefetch": -1}),
        (ValueError, {"staging_bytes": "lots"}),
        (TypeError, {"whole": [3]}),
        (ValueError, {"order": [torch.nn.Linear(2, 2)]}),
    ]
    for error, options in bad:
        with pytest.raises(error):
            atorch.offload(model, 0, manager=manager, **options)
    with pytest.raises(aimdo.DeviceNotInitializedError):
        atorch.offload(model, 5, manager=manager)
    with pytest.raises(TypeError, match="Module"):
        atorch.offload(lambda x: x, 0, manager=manager)
    meta = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="weight is a torch.strided tensor on meta"):
        atorch.offload(meta, 0, manager=manager)
    odd = torch.nn.Linear(4, 4)
    odd.register_buffer("scale", torch.nn.Buffer(torch.ones(1)).as_subclass(SubTensor))
    with pytest.raises(TypeError, match="scale is a SubTensor"):
        atorch.offload(odd, 0, manager=manager)
    assert [(p, p.data_ptr()) for p in model.parameters()] == before
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert manager.vbar_count(0) == 0


class SubTensor(torch.Tensor):
    pass


def test_a_module_is_offloaded_once_and_undone_only_between_forwards(make_manager):
    manager = new_manager(make_manager, pages=64)
    model = stack(blocks=1)
    offloaded = atorch.offload(model, 0, manager=manager)
    for target in (model, model[0]):  # the module, or one inside it
        with pytest.raises(aimdo.InvalidStateError, match="offloaded already"):
            atorch.offload(target, 0, manager=manager)
    caught = []

    def undo_inside(module, args):
        with pytest.raises(aimdo.InvalidStateError, match="while its module runs"):
            offloaded.undo()
        caught.append(1)

    handle = model[0].up.register_forward_pre_hook(undo_inside)
    model(torch.randn(1, 256).to(where(0)))
    assert caught == [1] and not offloaded.undone
    handle.remove()
    offloaded.undo()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_second_thread_is_refused_while_a_forward_runs(make_manager):
    manager = new_manager(make_manager, pages=64)
    entered, leave = threading.Event(), threading.Event()
    waiting = []  # read through the closure: the reference copy shares it

    class Waits(torch.nn.Linear):
        def forward(self, x):
            if waiting:
                entered.set()
                assert leave.wait(10)
            return super().forward(x)

    model = torch.nn.Sequential(Waits(8, 8), torch.nn.Linear(8, 8)).eval()
    x = torch.randn(1, 8).to(where(0))
    expected = reference(model, x, 0)
    outputs = []
    waiting.append(True)
    with atorch.offload(model, 0, manager=manager):
        thread = threading.Thread(target=lambda: outputs.append(model(x)))
        thread.start()
        assert entered.wait(10)
        for call in (lambda: model(x), lambda: model[1](x)):
            with pytest.raises(aimdo.InvalidStateError, match="one forward at a time"):
                call()
        leave.set()
        thread.join()
    assert len(outputs) == 1 and torch.equal(outputs[0], expected)


@pytest.mark.sim_only  # exact staging bytes: on CUDA the buffers move the budget
def test_staging_is_capped_and_larger_blocks_take_temporary_buffers(make_manager, monkeypatch):
    from aimdo.predict import predict_offload

    log = []

    class Layer(torch.nn.Linear):
        def __init__(self, index, fan_in, fan_out):
            super().__init__(fan_in, fan_out, bias=False)
            self.index = index

        def forward(self, x):
            log.append(f"run{self.index}")
            return super().forward(x)

    wide = PAGE // 4 // 256  # Linear(256, wide) is one page
    shapes = [(256, 4 * wide), (4 * wide, 256)] + [(256, wide), (wide, 256)] * 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Layer(i, *shape) for i, shape in enumerate(shapes)]).eval()
    sizes = [4 * PAGE, 4 * PAGE] + [PAGE] * 4
    x = torch.randn(1, 256)
    expected = reference(model, x, 0)
    log.clear()
    manager = new_manager(make_manager, pages=0, headroom=PAGE)  # nothing resident
    original = atorch._TorchExecutor.copy_weights

    def logged(block, storage):
        log.append(f"copy{block.name}")
        original(block, storage)

    monkeypatch.setattr(atorch._TorchExecutor, "copy_weights", staticmethod(logged))
    schedules = []
    with atorch.offload(model, 0, manager=manager, prefetch=1, staging_bytes=2 * PAGE) as offloaded:
        for _ in range(3):
            log.clear()
            assert torch.equal(model(x), expected)
            schedules.append(" ".join(log))
        # Two buffers of one page (2 pages // (prefetch + 1)); the 4-page blocks each take a
        # temporary buffer, the second made while the first runs.
        assert offloaded.staging_bytes == 2 * PAGE
        assert offloaded.last_stats.peak_temporary_bytes == 8 * PAGE
        assert offloaded.last_stats.offloaded_layers == 6
    predicted = predict_offload(
        new_manager(make_manager, pages=0, headroom=PAGE),
        0,
        sizes,
        [0.001] * 6,
        steps=3,
        prefetch=1,
        staging_bytes=2 * PAGE,
    )
    # The first forward learns the order, copying in line; then one copy ahead of the compute.
    assert schedules == [
        "copy0 run0 copy1 run1 copy2 run2 copy3 run3 copy4 run4 copy5 run5",
        "copy0 copy1 run0 copy2 run1 copy3 run2 copy4 run3 copy5 run4 run5",
        "copy0 copy1 run0 copy2 run1 copy3 run2 copy4 run3 copy5 run4 run5",
    ]
    assert [" ".join(step.schedule) for step in predicted] == schedules
    assert predicted[2].staging_bytes == 2 * PAGE
    assert predicted[2].peak_temporary_bytes == 8 * PAGE


def test_weights_already_pinned_are_used_where_they_are(make_manager):
    if BACKEND == "sim":
        pytest.skip("pinned host memory needs CUDA")
    model = stack(blocks=2)
    pinned = [p for name, p in model.named_parameters() if name.startswith("0.")]
    for p in pinned:
        p.data = p.data.pin_memory()
    addresses = [p.data_ptr() for p in pinned]
    x = torch.randn(2, 256).to(where(0))
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=64)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        # Only the other layer's weights are moved into a chunk of their own (registered).
        assert offloaded.pinned_bytes == weight_bytes(model[1])
        assert [p.data_ptr() for p in pinned] == addresses
        assert torch.equal(model(x), expected)
    assert [p.data_ptr() for p in pinned] == addresses  # left where they were


def test_strided_weights_keep_their_layout_and_broadcast_ones_are_stored_whole(make_manager):
    class Strided(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(256, 128).t())  # dense, transposed
            self.register_buffer("offsets", torch.arange(256.0).expand(4, 256))  # stride 0

        def forward(self, x):
            return x @ self.weight + self.offsets[: x.shape[0]]

    torch.manual_seed(0)
    model = Strided().eval()
    x = torch.randn(3, 128).to(where(0))
    expected = reference(model, x, 0)
    weight, offsets = model.weight, model.offsets
    manager = new_manager(make_manager, pages=64)
    with atorch.offload(model, 0, manager=manager) as offloaded:
        # The transposed weight keeps its strides (in its block too); the broadcast buffer
        # takes its 4 x 256 elements, contiguous.
        assert offloaded.pinned_bytes == 256 * 128 * 4 + 4 * 256 * 4
        assert weight.stride() == (1, 128) and offsets.stride() == (256, 1)
        assert torch.equal(model(x), expected)
    assert model.weight is weight and weight.stride() == (1, 128)
    assert model.offsets is offsets and torch.equal(offsets, torch.arange(256.0).expand(4, 256))
