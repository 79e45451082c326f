"""aimdo.torch: tensor views, the allocator entry points, and module offload.

On the simulator (CI) everything runs on the CPU over real bytes; on the cuda backend the
same tests run on the GPUs.
"""

from __future__ import annotations

import copy
import ctypes
import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo import _core  # noqa: E402
from conftest import BACKEND, PAGE  # noqa: E402
from torch_support import (  # noqa: E402
    new_manager,
    one_page_layers,
    reference,
    stack,
    weight_bytes,
    where,
)


def test_as_tensor_views_the_allocation_in_place(make_manager):
    manager = new_manager(make_manager, pages=4)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    allocation = vbar.alloc(PAGE + 4096)
    with pytest.raises(aimdo.InvalidStateError):
        atorch.as_tensor(allocation, torch.float32, (16,))  # not mapped yet
    assert vbar.fault(allocation) is not None
    first = atorch.as_tensor(allocation, torch.float32, (4, (PAGE + 4096) // 16))
    assert first.device == where(0)
    first.fill_(2.5)
    again = atorch.as_tensor(allocation, torch.bfloat16, (2, (PAGE + 4096) // 4))
    assert again.data_ptr() == allocation.address
    assert torch.equal(again.view(torch.float32), first.view(-1).view(2, -1))
    with pytest.raises(ValueError, match="bytes"):
        atorch.as_tensor(allocation, torch.float32, (PAGE,))
    with pytest.raises(TypeError):
        atorch.as_tensor(allocation, "float32", (4,))
    del first, again
    vbar.unpin(allocation)


def test_a_stack_three_times_the_budget_gives_identical_outputs(make_manager):
    model = stack()
    budget_pages = weight_bytes(model) // 3 // PAGE
    manager = new_manager(make_manager, pages=budget_pages)
    x = torch.randn(4, 256)
    expected = reference(model, x, 0)
    offloaded = atorch.offload(model, 0, manager=manager, prefetch=1)
    copied = []
    for _ in range(4):
        out = model(x.to(where(0)))
        assert torch.equal(out, expected)
        stats = offloaded.last_stats
        assert stats.layers == 36
        copied.append(stats.bytes_copied)
    # Part of the model stays resident: later forwards copy less than the first.
    assert copied[1] < copied[0]
    assert copied[1] == copied[2] == copied[3]
    assert offloaded.last_stats.hits > 0 and offloaded.last_stats.offloaded_layers > 0
    assert manager.resident_bytes(0) <= budget_pages * PAGE


def test_a_model_that_fits_copies_nothing_after_the_first_forward(make_manager):
    model = stack(blocks=3)
    manager = new_manager(make_manager, pages=weight_bytes(model) // PAGE + 8)
    x = torch.randn(2, 256).to(where(0))
    expected = reference(model, x, 0)
    offloaded = atorch.offload(model, 0, manager=manager)
    assert torch.equal(model(x), expected)
    assert offloaded.last_stats.bytes_copied == weight_bytes(model)  # every block once
    for _ in range(3):
        assert torch.equal(model(x), expected)
        assert offloaded.last_stats.bytes_copied == 0
        assert offloaded.last_stats.hits == 9


def test_prefetch_changes_no_output_and_no_byte_count(make_manager):
    model = stack()
    manager = new_manager(make_manager, pages=weight_bytes(model) // 3 // PAGE, devices=(0, 1))
    x = torch.randn(4, 256)
    twin = copy.deepcopy(model)  # a module is offloaded to one device at a time
    plain = atorch.offload(model, 0, manager=manager, prefetch=0)
    ahead = atorch.offload(twin, 1, manager=manager, prefetch=3)
    for _ in range(3):
        a = model(x.to(where(0)))
        b = twin(x.to(where(1)))
        assert torch.equal(a.cpu(), b.cpu())
        assert plain.last_stats.bytes_copied == ahead.last_stats.bytes_copied


def test_spread_order_keeps_the_first_and_spreads_every_prefix():
    assert atorch.spread_order([]) == []
    assert atorch.spread_order(list("abc")) == list("acb")
    # i sorted by frac(i * 0.618...): 0 .000, 5 .090, 2 .236, 7 .326, 4 .472, 1 .618, ...
    assert atorch.spread_order(list(range(9))) == [0, 5, 2, 7, 4, 1, 6, 3, 8]
    order = atorch.spread_order(list(range(60)))
    assert sorted(order) == list(range(60))
    for size in range(2, 60):  # no prefix leaves a gap much longer than 60 / its size
        kept = sorted(order[:size])
        assert max(b - a for a, b in zip(kept, kept[1:], strict=False)) <= max(3, 2 * 60 // size)


def test_weights_are_placed_spread_or_in_order_and_as_declared(make_manager):
    model = stack(blocks=3)
    manager = new_manager(make_manager, pages=64)
    x = torch.randn(2, 256).to(where(0))
    registered = [
        "0.norm",
        "0.up",
        "0.down",
        "1.norm",
        "1.up",
        "1.down",
        "2.norm",
        "2.up",
        "2.down",
    ]
    expected = reference(model, x, 0)
    spread = atorch.offload(model, 0, manager=manager)
    # Placed when offloaded, before any forward: the norms (under SMALL_BLOCK_BYTES) first,
    # then the rest in registration order, spread.
    norms = ["0.norm", "1.norm", "2.norm"]
    assert [name for name, _, _ in spread.placement()] == norms + [
        "0.up",
        "2.down",
        "1.up",
        "2.up",
        "0.down",
        "1.down",
    ]
    assert torch.equal(model(x), expected)
    spread.undo()
    with atorch.offload(model, 0, manager=manager, spread=False) as in_order:
        assert [name for name, _, _ in in_order.placement()] == norms + [
            n for n in registered if n not in norms
        ]
        assert torch.equal(model(x), expected)
    declared_order = [model[2].up, model[2].down, model[0].up]
    declared = atorch.offload(model, 0, manager=manager, order=declared_order, spread=False)
    assert torch.equal(model(x), expected)
    declared.undo()
    names = [name for name, _, _ in declared.placement()]
    assert names == norms + ["2.up", "2.down", "0.up"] + [
        n for n in registered if n not in norms + ["2.up", "2.down", "0.up"]
    ]
    with pytest.raises(ValueError, match="twice"):
        atorch.offload(model, 0, manager=manager, order=[model[0].up, model[0].up])
    with pytest.raises(ValueError, match="not part"):
        atorch.offload(model, 0, manager=manager, order=[torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="spread"):
        atorch.offload(model, 0, manager=manager, spread=1)


def test_keep_first_places_the_weights_listed_ahead_of_the_rest(make_manager):
    model = stack(blocks=3)
    manager = new_manager(make_manager, pages=64)
    x = torch.randn(2, 256).to(where(0))
    expected = reference(model, x, 0)
    norms = ["0.norm", "1.norm", "2.norm"]
    # Listed by module or by name; spread among themselves, then the rest spread.
    kept = [model[2].down, "1.down", model[0].down]
    with atorch.offload(model, 0, manager=manager, keep_first=kept) as offloaded:
        names = [name for name, _, _ in offloaded.placement()]
        assert names == norms + ["2.down", "0.down", "1.down"] + ["0.up", "2.up", "1.up"]
        assert torch.equal(model(x), expected)
    with atorch.offload(model, 0, manager=manager, keep_first=kept, spread=False) as offloaded:
        names = [name for name, _, _ in offloaded.placement()]
        assert names == norms + ["2.down", "1.down", "0.down"] + ["0.up", "1.up", "2.up"]
        assert torch.equal(model(x), expected)
    # A small block listed stays with the small ones, first.
    with atorch.offload(model, 0, manager=manager, keep_first=["1.norm", "2.up"]) as offloaded:
        names = [name for name, _, _ in offloaded.placement()]
        assert names[:4] == norms + ["2.up"]
    for bad, error, match in [
        (["3.up"], ValueError, "'3.up' is no module of this model"),
        ([torch.nn.Linear(2, 2)], ValueError, "'Linear' is no module of this model"),
        ([model[0].up, "0.up"], ValueError, "lists '?0.up'? twice"),
        ([3], TypeError, "modules or their names, not int"),
        ("0.up", TypeError, "put one in a list"),
        (model[0].up, TypeError, "put one in a list"),
        (3, TypeError, "sequence of modules or their names, not int"),
    ]:
        with pytest.raises(error, match=match):
            atorch.offload(model, 0, manager=manager, keep_first=bad)
        assert manager.vbar_count(0) == 0  # nothing made, nothing changed
    with atorch.offload(model, 0, manager=manager):
        assert torch.equal(model(x), expected)


@pytest.mark.sim_only  # on CUDA the staging buffers are other usage and move the budget
@pytest.mark.parametrize(
    "spread, prefetch, resident, schedule",
    [
        # Placed 0 5 2 7 4 1 6 3: the first forward fills the four pages in use order.
        (True, 1, [0, 2, 5, 7], "copy1 run0 copy3 run1 run2 copy4 run3 copy6 run4 run5 run6 run7"),
        # Two copies ahead: before 0, blocks 1 and 3; before 1, block 4; before 3, block 6.
        (True, 2, [0, 2, 5, 7], "copy1 copy3 run0 copy4 run1 run2 copy6 run3 run4 run5 run6 run7"),
        # Placed in order: layers 0-3 fill the budget; layer 4's fault finds nothing of lower
        # priority to evict, so it is offloaded and the watermark stops at it (design.md §3.2).
        # Its copy overlaps the four resident layers' compute.
        (False, 1, [0, 1, 2, 3], "copy4 run0 run1 run2 run3 copy5 run4 copy6 run5 copy7 run6 run7"),
    ],
)
def test_residency_and_prefetch_schedule_of_a_stack_twice_the_budget(
    make_manager, monkeypatch, spread, prefetch, resident, schedule
):
    log = []
    model = one_page_layers(8, log)
    manager = new_manager(make_manager, pages=4)
    x = torch.randn(1, PAGE // 4 // 1024)
    with torch.no_grad():
        expected = model(x)
    offloaded = atorch.offload(model, 0, manager=manager, prefetch=prefetch, spread=spread)
    assert torch.equal(model(x), expected)  # learns the order
    original = atorch._TorchExecutor.copy_weights

    def logged(block, storage):
        log.append(f"copy{block.name}")  # the block of layer N is named "N"
        original(block, storage)

    monkeypatch.setattr(atorch._TorchExecutor, "copy_weights", staticmethod(logged))
    for _ in range(2):
        log.clear()
        assert torch.equal(model(x), expected)
        assert " ".join(log) == schedule
        stats = offloaded.last_stats
        assert (stats.hits, stats.offloaded_layers, stats.copied_layers) == (
            len(resident),
            8 - len(resident),
            0,
        )
    pages = {name: offset // PAGE for name, offset, _ in offloaded.placement()}
    residency = offloaded.vbar.residency()
    assert sorted(int(name) for name, page in pages.items() if residency[page][0]) == resident
    assert manager.resident_bytes(0) == len(resident) * PAGE
    # aimdo.predict follows the same schedule without running anything.
    from aimdo.predict import predict_offload

    predicted = predict_offload(
        new_manager(make_manager, pages=4),
        0,
        [PAGE] * 8,
        [0.001] * 8,
        steps=3,
        prefetch=prefetch,
        spread=spread,
    )
    assert [" ".join(step.schedule) for step in predicted[1:]] == [schedule, schedule]
    assert (predicted[2].hits, predicted[2].offloaded_layers) == (len(resident), 8 - len(resident))


@pytest.mark.sim_only  # the staging buffers are other usage on CUDA and move the budget
def test_prefetch_does_not_pin_resident_blocks_ahead_of_their_turn(make_manager):
    pinned_at_run = {}

    class PinnedPagesAtRun(list):  # each layer logs "runN" from inside its forward
        def append(self, item):
            pinned_at_run[int(item[3:])] = pinned_pages(offloaded)

    model = one_page_layers(8, PinnedPagesAtRun())
    manager = new_manager(make_manager, pages=4)
    offloaded = atorch.offload(model, 0, manager=manager, prefetch=1)  # resident: 0 2 5 7
    x = torch.randn(1, PAGE // 4 // 1024)
    model(x)  # learns the order
    model(x)  # finds 0 2 5 7 resident
    model(x)
    # Block 1 runs while block 3 is copied ahead; block 2, resident, between them, is left
    # unpinned until its turn. A block's own page is pinned while it runs.
    assert pinned_at_run == {0: 1, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 0, 7: 1}


@pytest.mark.sim_only  # the staging buffers' bookkeeping, on the CPU
def test_staging_buffers_are_at_most_prefetch_plus_one_grow_to_fit_and_share_room(
    make_manager, monkeypatch
):
    torch.manual_seed(0)
    width = PAGE // 4 // 256  # a Linear(256, width) without bias is one page
    model = torch.nn.Sequential(
        torch.nn.Linear(256, width, bias=False),
        torch.nn.Linear(width, 256, bias=False),
        torch.nn.Linear(256, 3 * width, bias=False),
        torch.nn.Linear(3 * width, 256, bias=False),
    ).eval()
    # A budget of no page (the limit is all headroom): everything is offloaded.
    manager = new_manager(make_manager, pages=0, headroom=PAGE)
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = model(x)
    offloaded = atorch.offload(model, 0, manager=manager, prefetch=1)
    taken = []
    # The schedule shared with aimdo.predict takes the buffers; the tensors are the module's.
    from aimdo._schedule import Schedule

    original = Schedule.take_slot

    def recording(self, block):
        slot = original(self, block)
        assert slot is not None
        taken.append((block.nbytes, slot.nbytes, block.staged_at, len(self.slots)))
        return slot

    monkeypatch.setattr(Schedule, "take_slot", recording)
    for _ in range(3):
        assert torch.equal(model(x), expected)  # read where each block was staged
    assert offloaded.last_stats.offloaded_layers == 4
    # The first forward learns the order without staging. In the second, each block takes
    # a buffer of its own (none has room for the next), and the two buffers grow to the
    # largest block: three pages each.
    assert taken[:4] == [(PAGE, PAGE, 0, 1), (PAGE, PAGE, 0, 2)] + [(3 * PAGE, 3 * PAGE, 0, 2)] * 2
    # In the third, the second block rides in the room the first left in its buffer (one
    # page on, so the prefetch of one copy goes on to the third block), and the third and
    # fourth take a buffer each.
    assert (
        taken[4:]
        == [(PAGE, 3 * PAGE, 0, 2), (PAGE, 3 * PAGE, PAGE, 2)] + [(3 * PAGE, 3 * PAGE, 0, 2)] * 2
    )
    assert offloaded.staging_bytes == 6 * PAGE
    assert offloaded.last_stats.peak_temporary_bytes == 0


class _Pages(torch.nn.Module):
    """A residual layer of `pages` pages of weights (a Linear(256, pages * width))."""

    def __init__(self, pages: int):
        super().__init__()
        self.linear = torch.nn.Linear(256, pages * (PAGE // 4 // 256), bias=False)

    def forward(self, x):
        return x + self.linear(x)[..., :256]


def _record_takes(monkeypatch):
    """Each staging buffer taken, as (the buffer's id, the block's name, its offset)."""
    from aimdo._schedule import Schedule

    original, taken = Schedule.take_slot, []

    def recording(self, block):
        slot = original(self, block)
        if slot is not None:
            taken.append((id(slot), block.name, block.staged_at))
        return slot

    monkeypatch.setattr(Schedule, "take_slot", recording)
    return taken


@pytest.mark.sim_only  # the staging buffers' bookkeeping, on the CPU
def test_a_block_staged_at_another_offset_of_a_buffer_reads_its_own_bytes(
    make_manager, monkeypatch
):
    # Blocks of 3, 1, 2, 4, 3 and 3 pages, none resident, prefetch 1: riders make the
    # blocks fall at other offsets of the same buffer from one forward to the next, and
    # the views made of a buffer for a block must follow its offset.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Pages(p) for p in (3, 1, 2, 4, 3, 3)]).eval()
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = model(x)
    manager = new_manager(make_manager, pages=0, headroom=PAGE)
    taken = _record_takes(monkeypatch)
    with atorch.offload(model, 0, manager=manager, prefetch=1):
        for _ in range(6):
            assert torch.equal(model(x), expected)
    offsets = {}
    for slot, name, at in taken:
        offsets.setdefault((slot, name), set()).add(at)
    assert any(len(seen) > 1 for seen in offsets.values())


class _Twice(torch.nn.Module):
    """x, s1, s2, x again, t: a module called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.x, self.s1, self.s2, self.t = _Pages(4), _Pages(2), _Pages(1), _Pages(4)

    def forward(self, v):
        return self.t(self.x(self.s2(self.s1(self.x(v)))))


@pytest.mark.sim_only  # the prefetch window's walk, on the CPU
def test_the_second_use_of_a_module_called_twice_is_copied_ahead(make_manager, monkeypatch):
    # Nothing resident, prefetch 1. While x runs the first time, s1 is copied ahead and
    # s2 rides in s1's buffer; the walk must end at x's second use (x is in use, so it is
    # let go and copied again after), not step over it: then x is copied ahead while s2
    # runs, instead of in its turn.
    from aimdo._schedule import Schedule

    torch.manual_seed(2)
    model = _Twice().eval()
    v = torch.randn(2, 256)
    with torch.no_grad():
        expected = model(v)
    manager = new_manager(make_manager, pages=0, headroom=PAGE)
    original, found_loaded = Schedule.before, []

    def before(self, block):
        found_loaded.append((block.name, block.loaded))
        return original(self, block)

    monkeypatch.setattr(Schedule, "before", before)
    with atorch.offload(model, 0, manager=manager, prefetch=1):
        for _ in range(4):
            found_loaded.clear()
            assert torch.equal(model(v), expected)
    # The last forward: every use after the first found its block copied ahead.
    assert found_loaded == [("x.linear", False)] + [
        (f"{name}.linear", True) for name in ("s1", "s2", "x", "t")
    ]


@pytest.mark.sim_only  # the prefetch window's count, on the CPU
def test_riders_add_at_most_one_copy_beyond_prefetch_when_blocks_fit_again(
    make_manager, monkeypatch
):
    # Eleven blocks, one of four pages among one-page ones, none resident, prefetch 1;
    # then the budget grows by eight pages. Blocks whose last fault said offloaded may fault
    # into their pages now: such a block, reached as a rider, takes a copy of its own, and
    # the walk ends after it.
    from aimdo._schedule import Schedule

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Pages(p) for p in (1, 1, 4) + (1,) * 8]).eval()
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = model(x)
    manager = new_manager(make_manager, pages=0, headroom=PAGE)
    original, in_flight = Schedule.load, []

    def load(self, block, ahead):
        loaded = original(self, block, ahead)
        in_flight.append(self.in_flight)
        return loaded

    monkeypatch.setattr(Schedule, "load", load)
    with atorch.offload(model, 0, manager=manager, prefetch=1) as offloaded:
        for step in range(6):
            if step == 3:
                manager.set_budget(0, vram_limit=manager.limit_bytes(0) + 8 * PAGE)
            assert torch.equal(model(x), expected)
        assert offloaded.last_stats.hits > 0  # the budget's room was taken
    assert max(in_flight) == 2


def test_undo_leaves_the_module_as_it_was(make_manager):
    model = stack(blocks=2)
    before = {name: (t, t.clone()) for name, t in model.state_dict(keep_vars=True).items()}
    manager = new_manager(make_manager, pages=64)
    offloaded = atorch.offload(model, 0, manager=manager)
    model(torch.randn(1, 256).to(where(0)))
    offloaded.undo()
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for name, (tensor, values) in before.items():
        assert after[name] is tensor and torch.equal(tensor, values), name
    assert all(t.device.type == "cpu" for t in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert manager.vbar_count(0) == 0


def test_the_same_model_on_two_devices_runs_from_two_threads(make_manager):
    model = stack()
    budget_pages = weight_bytes(model) // 3 // PAGE
    manager = new_manager(make_manager, pages=budget_pages, devices=(0, 1))
    x = torch.randn(4, 256)
    expected = {d: reference(model, x, d) for d in (0, 1)}
    replicas = {0: model, 1: copy.deepcopy(model)}  # one module per device
    for device, replica in replicas.items():
        atorch.offload(replica, device, manager=manager)
    results = {d: [] for d in (0, 1)}
    errors = []

    def run(device):
        try:
            for _ in range(5):
                results[device].append(
                    torch.equal(replicas[device](x.to(where(device))), expected[device])
                )
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(d,)) for d in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {0: [True] * 5, 1: [True] * 5}
    for d in (0, 1):
        assert manager.resident_bytes(d) <= budget_pages * PAGE


@pytest.mark.sim_only
def test_offload_on_a_simulator_without_real_bytes_is_refused(make_manager):
    manager = make_manager(pages=8)
    with pytest.raises(aimdo.InvalidStateError, match="real_bytes"):
        atorch.offload(stack(blocks=1), 0, manager=manager)
    with pytest.raises(TypeError):
        atorch.offload("not a module", 0, manager=manager)


@pytest.mark.sim_only
def test_the_allocator_entry_points_evict_on_their_device_and_free_by_pointer(make_manager):
    """The C functions PyTorch's pluggable allocator calls, called here directly."""
    manager = make_manager(pages=8, devices=(0, 1))
    vbar = manager.create_vbar(8 * PAGE, device=1)
    for allocation in [vbar.alloc(PAGE) for _ in range(8)]:
        vbar.fault(allocation)
        vbar.unpin(allocation)
    library = ctypes.CDLL(_core.__file__)
    library.aimdo_torch_alloc.restype = ctypes.c_void_p
    library.aimdo_torch_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    library.aimdo_torch_free.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    # (A failing allocation throws a C++ exception for PyTorch's C++ to raise; ctypes
    # cannot catch that, so only the succeeding paths are called from here.)
    assert library.aimdo_torch_alloc(0, 1, None) is None  # zero bytes: null, as PyTorch expects
    _core.set_allocator_manager(manager._core)
    try:
        ptr = library.aimdo_torch_alloc(3 * PAGE, 1, None)
        assert ptr
        assert manager.external_bytes(1) == 3 * PAGE
        assert manager.resident_bytes(1) == 5 * PAGE  # room made by eviction on device 1
        assert manager.external_bytes(0) == 0
        freed = []
        thread = threading.Thread(
            target=lambda: freed.append(library.aimdo_torch_free(ptr, 3 * PAGE, 1, None))
        )
        thread.start()
        thread.join()
        assert manager.external_bytes(1) == 0
    finally:
        _core.set_allocator_manager(None)


def test_use_allocator_needs_a_cuda_manager(make_manager):
    if BACKEND == "sim":
        manager = make_manager(pages=8)
        with pytest.raises(aimdo.AimdoError, match="cuda backend"):
            atorch.use_allocator(manager)
        return
    # On CUDA, PyTorch has allocated in this process already: too late to swap.
    torch.zeros(1, device="cuda:0")
    manager = make_manager(pages=8)
    with pytest.raises(aimdo.AimdoError, match="before creating any CUDA tensor"):
        atorch.use_allocator(manager)


USE_ALLOCATOR_SCRIPT = r"""
import torch, aimdo, aimdo.torch as atorch
manager = aimdo.init("cuda", [0], poll_interval=1e9)
# A budget of VRAM_LIMIT above what others use now (other test processes share the GPU):
# the budget reads free memory once, at this poll.
others = manager.memory_info(0)[1] - manager.poll(0)["free_bytes"]
manager.add_devices([0], vram_limit=others + VRAM_LIMIT)
atorch.use_allocator(manager)
torch.manual_seed(0)
layers = [torch.nn.Linear(4096, 4096).to(torch.bfloat16) for _ in range(32)]  # 1 GiB
model = torch.nn.Sequential(*layers).eval()
offloaded = atorch.offload(model, 0, manager=manager)
x = torch.randn(8, 4096, dtype=torch.bfloat16, device="cuda:0")
first = model(x)
resident_before = manager.resident_bytes(0)
big = [torch.empty(256 << 20, dtype=torch.uint8, device="cuda:0") for _ in range(3)]  # activations
second = model(x)
print("resident", resident_before, manager.resident_bytes(0), "external", manager.external_bytes(0))
assert torch.equal(first, second)
assert manager.resident_bytes(0) < resident_before, "the activations should have pushed weights out"
del big
try:  # more than the budget can ever give: refused with aimdo's reason, not a null pointer
    torch.empty(4 << 30, dtype=torch.uint8, device="cuda:0")
    print("not refused")
except RuntimeError as error:
    assert "aimdo: " in str(error), error
print("ok")
"""


def test_use_allocator_lets_activations_push_weights_out():
    if BACKEND == "sim":
        pytest.skip("needs real CUDA memory (a fresh process on the cuda backend)")
    script = USE_ALLOCATOR_SCRIPT.replace("VRAM_LIMIT", str(2 << 30))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


# --- what review found: exceptions, aliased outputs, lifetimes ----------------------------


def sim_manager(make_manager, pages):
    return make_manager(pages=pages, sim=aimdo.SimBackend("2x1GiB", real_bytes=True))


def pinned_pages(offloaded) -> int:
    return sum(1 for _, pinned in offloaded.vbar.residency() if pinned)


@pytest.mark.sim_only
def test_an_interrupted_copy_leaves_no_pin_and_no_trusted_garbage(make_manager, monkeypatch):
    manager = sim_manager(make_manager, pages=16)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]).eval()
    plain = copy.deepcopy(model)
    offloaded = atorch.offload(model, 0, manager=manager, prefetch=1)
    original = atorch._TorchExecutor.copy_weights
    calls = []

    def interrupted(block, storage):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during a long host-to-device copy
        original(block, storage)

    monkeypatch.setattr(atorch._TorchExecutor, "copy_weights", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        model(torch.zeros(1, 256))
    monkeypatch.setattr(atorch._TorchExecutor, "copy_weights", staticmethod(original))
    assert pinned_pages(offloaded) == 0
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert pinned_pages(offloaded) == 0


@pytest.mark.sim_only
def test_an_exception_inside_a_layer_unpins_every_block(make_manager):
    manager = sim_manager(make_manager, pages=16)
    trigger = {"fail": False}  # read through the closure: the offloaded replica shares it

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            if trigger["fail"]:
                raise ValueError("boom")
            return x * self.weight

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Failing(), torch.nn.Linear(3, 3)).eval()
    plain = copy.deepcopy(model)
    offloaded = atorch.offload(model, 0, manager=manager, prefetch=2)
    model(torch.ones(1, 3))  # learn the order, so the next forward prefetches
    trigger["fail"] = True
    with pytest.raises(ValueError, match="boom"):
        model(torch.ones(1, 3))
    trigger["fail"] = False
    assert pinned_pages(offloaded) == 0
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 3)), plain(torch.ones(1, 3)))


@pytest.mark.sim_only
def test_an_output_that_views_a_layers_own_weights_stays_valid(make_manager):
    manager = sim_manager(make_manager, pages=4)  # one big layer fills it

    class Rotary(torch.nn.Module):  # returns a slice of its own buffer, like rotary caches
        def __init__(self):
            super().__init__()
            self.register_buffer("cos", torch.arange(1024.0).reshape(4, 256))

        def forward(self, x):
            return self.cos[: x.shape[0]]

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(PAGE))  # the whole budget (4 pages)

        def forward(self, x):
            return x * self.weight[0]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary = Rotary()
            self.bigs = torch.nn.ModuleList([Big() for _ in range(4)])

        def forward(self, x):
            angles = self.rotary(x)
            for big in self.bigs:
                x = big(x)  # evicts the rotary block's page
            return x + angles

    model = Net().eval()
    x = torch.zeros(2, 256)
    with torch.no_grad():
        expected = model(x)
    atorch.offload(model, 0, manager=manager, prefetch=0)
    assert torch.equal(model(x), expected)
    assert manager.backend.violations() == []


@pytest.mark.sim_only
def test_as_tensor_finds_the_simulator_after_the_vbar_wrapper_is_gone(make_manager):
    import gc

    manager = sim_manager(make_manager, pages=8)
    allocation = manager.create_vbar(4 * PAGE, 0).alloc(PAGE)  # only the allocation keeps it
    gc.collect()
    assert allocation.vbar.fault(allocation) is not None
    tensor = atorch.as_tensor(allocation, torch.float32, (4,))
    assert tensor.device.type == "cpu"
    tensor.fill_(1.5)
    assert torch.equal(atorch.as_tensor(allocation, torch.float32, (4,)), torch.full((4,), 1.5))
    del tensor
    allocation.vbar.unpin(allocation)


@pytest.mark.sim_only
def test_a_manager_serving_the_allocator_cannot_be_closed_under_pytorch(make_manager):
    manager = make_manager(pages=8)
    _core.set_allocator_manager(manager._core)
    try:
        with pytest.raises(aimdo.InvalidStateError, match="PyTorch's CUDA allocator"):
            manager.close()
        assert not manager.closed
    finally:
        _core.set_allocator_manager(None)
    manager.close()
    assert manager.closed


@pytest.mark.sim_only
def test_weights_changed_after_undo_are_read_again_by_a_new_offload(make_manager):
    manager = sim_manager(make_manager, pages=8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    x = torch.randn(1, 8)
    with atorch.offload(model, 0, manager=manager):
        before = model(x)
    with torch.no_grad():
        model[0].weight.mul_(2)
        expected = model(x)
    with atorch.offload(model, 0, manager=manager):
        assert torch.equal(model(x), expected)
    assert not torch.equal(expected, before)
