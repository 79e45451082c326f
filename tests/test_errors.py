"""Bad arguments and misuse: the right exception type, and nothing changed.

Each test takes a snapshot of everything the failing call could disturb (every VBAR's
residency string, loaded bytes, watermark, floor and allocated bytes; each device's
usage, resident bytes and VBAR count; on the simulator the physical bytes it holds)
and asserts that the snapshot after the failure is identical. Failures injected into
the simulator's driver must come back typed and flagged, leave the same state, and
leak nothing (the autouse fixture in conftest checks the leaks at teardown).

Errors of aimdo's own making are aimdo.AimdoError subclasses; bad arguments are plain
ValueError / TypeError.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import aimdo
import pytest
from conftest import BACKEND, PAGE, residency

MiB = 1 << 20


def state(manager, *vbars):
    """Everything a failed call must leave exactly as it was."""
    per_vbar = [
        (residency(v), v.loaded_bytes, v.watermark_bytes, v.floor_bytes, v.allocated_bytes)
        for v in vbars
    ]
    per_device = [
        (d, manager.usage_bytes(d), manager.resident_bytes(d), manager.vbar_count(d))
        for d in manager.devices
    ]
    sim = getattr(manager, "sim", None)
    physical = None if sim is None else [sim.physical_bytes(d) for d in manager.devices]
    return per_vbar, per_device, physical


@pytest.fixture
def loaded(make_manager):
    """A 4-page VBAR on device 0 of an 8-page budget: page 0 pinned, page 1 resident."""
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    pinned = vbar.alloc(PAGE)
    cached = vbar.alloc(PAGE)
    assert vbar.fault(pinned) is not None
    assert vbar.fault(cached) is not None
    vbar.unpin(cached)
    assert residency(vbar) == "PR.."
    return SimpleNamespace(manager=manager, vbar=vbar, pinned=pinned, cached=cached)


# --- the hierarchy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, builtin",
    [
        (aimdo.OutOfMemoryError, MemoryError),
        (aimdo.DriverError, RuntimeError),
        (aimdo.InvalidStateError, RuntimeError),
        (aimdo.DeviceNotInitializedError, LookupError),
    ],
)
def test_each_aimdo_error_is_an_aimdo_error_and_its_builtin(error, builtin):
    assert issubclass(error, aimdo.AimdoError)
    assert issubclass(error, builtin)
    assert issubclass(aimdo.AimdoError, Exception)
    assert not issubclass(aimdo.AimdoError, (ValueError, TypeError))


# --- negative, zero and wrongly typed sizes --------------------------------------------

NEGATIVE_SIZE_CALLS = {
    "alloc": lambda m, v: v.alloc(-1),
    "create_vbar": lambda m, v: m.create_vbar(-PAGE, device=0),
    "set_watermark": lambda m, v: v.set_watermark(-1),
    "floor_bytes": lambda m, v: setattr(v, "floor_bytes", -1),
    "free_memory": lambda m, v: v.free_memory(-1),
    "deficit_bytes": lambda m, v: m.deficit_bytes(0, -1),
    "reclaim": lambda m, v: m.reclaim(0, -1),
}


@pytest.mark.parametrize("call", NEGATIVE_SIZE_CALLS.values(), ids=NEGATIVE_SIZE_CALLS.keys())
def test_negative_size_is_a_value_error_and_changes_nothing(loaded, call):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(ValueError, match="must not be negative"):
        call(loaded.manager, loaded.vbar)
    assert state(loaded.manager, loaded.vbar) == before


def test_zero_size_alloc_is_a_value_error_and_changes_nothing(loaded):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(ValueError, match="positive"):
        loaded.vbar.alloc(0)
    assert state(loaded.manager, loaded.vbar) == before
    # The next allocation still starts where the last good one ended.
    assert loaded.vbar.alloc(1).offset == 2 * PAGE


def test_zero_size_vbar_is_a_value_error_and_changes_nothing(loaded):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(ValueError, match="positive"):
        loaded.manager.create_vbar(0, device=0)
    assert state(loaded.manager, loaded.vbar) == before
    assert loaded.manager.vbar_count(0) == 1


SIZE_CALLS = {
    "alloc": lambda m, v, x: v.alloc(x),
    "create_vbar": lambda m, v, x: m.create_vbar(x, device=0),
    "set_watermark": lambda m, v, x: v.set_watermark(x),
    "floor_bytes": lambda m, v, x: setattr(v, "floor_bytes", x),
    "free_memory": lambda m, v, x: v.free_memory(x),
    "deficit_bytes": lambda m, v, x: m.deficit_bytes(0, x),
    "reclaim": lambda m, v, x: m.reclaim(0, x),
}
DEVICE_CALLS = {
    "create_vbar": lambda m, v, x: m.create_vbar(PAGE, device=x),
    "budget_bytes": lambda m, v, x: m.budget_bytes(x),
    "usage_bytes": lambda m, v, x: m.usage_bytes(x),
    "reclaim": lambda m, v, x: m.reclaim(x, PAGE),
    "stats": lambda m, v, x: m.stats(x),
    "device_info": lambda m, v, x: m.device_info(x),
}
NOT_INTS = {"float": 1.0, "bool": True, "str": "4096"}


@pytest.mark.parametrize("value", NOT_INTS.values(), ids=NOT_INTS.keys())
@pytest.mark.parametrize("call", SIZE_CALLS.values(), ids=SIZE_CALLS.keys())
def test_size_that_is_not_an_int_is_a_type_error_and_changes_nothing(loaded, call, value):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(TypeError):
        call(loaded.manager, loaded.vbar, value)
    assert state(loaded.manager, loaded.vbar) == before


@pytest.mark.parametrize("value", NOT_INTS.values(), ids=NOT_INTS.keys())
@pytest.mark.parametrize("call", DEVICE_CALLS.values(), ids=DEVICE_CALLS.keys())
def test_device_that_is_not_an_int_is_a_type_error_and_changes_nothing(loaded, call, value):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(TypeError):
        call(loaded.manager, loaded.vbar, value)
    assert state(loaded.manager, loaded.vbar) == before


@pytest.mark.parametrize("method", ["fault", "unpin"])
@pytest.mark.parametrize("value", [None, 0, "allocation"], ids=["None", "int", "str"])
def test_fault_or_unpin_of_a_non_allocation_is_a_type_error(loaded, method, value):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(TypeError):
        getattr(loaded.vbar, method)(value)
    assert state(loaded.manager, loaded.vbar) == before


# --- sizes that do not fit the VBAR ----------------------------------------------------


def test_alloc_that_does_not_fit_the_range_is_a_value_error_and_changes_nothing(loaded):
    vbar = loaded.vbar
    assert vbar.allocated_bytes == 2 * PAGE
    before = state(loaded.manager, vbar)
    with pytest.raises(ValueError, match="cannot allocate"):
        vbar.alloc(2 * PAGE + 1)
    assert state(loaded.manager, vbar) == before
    # Exactly what is left still fits, at the offset the failed call did not consume.
    last = vbar.alloc(2 * PAGE)
    assert (last.offset, last.size) == (2 * PAGE, 2 * PAGE)


def test_alloc_counts_the_alignment_padding_against_the_range(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(PAGE, device=0)
    vbar.alloc(1)  # the next allocation starts at 512
    with pytest.raises(ValueError, match="cannot allocate"):
        vbar.alloc(PAGE - 511)
    assert vbar.allocated_bytes == 1
    assert vbar.alloc(PAGE - 512).offset == 512


def test_set_watermark_beyond_the_vbar_is_a_value_error_and_changes_nothing(loaded):
    vbar = loaded.vbar
    before = state(loaded.manager, vbar)
    with pytest.raises(ValueError, match="beyond"):
        vbar.set_watermark(vbar.page_count * vbar.page_size + 1)
    assert state(loaded.manager, vbar) == before
    assert vbar.watermark_bytes == 4 * PAGE


def test_floor_beyond_the_vbar_is_a_value_error_and_changes_nothing(loaded):
    vbar = loaded.vbar
    before = state(loaded.manager, vbar)
    with pytest.raises(ValueError, match="beyond"):
        vbar.floor_bytes = vbar.page_count * vbar.page_size + 1
    assert state(loaded.manager, vbar) == before
    assert vbar.floor_bytes == 0
    vbar.floor_bytes = vbar.page_count * vbar.page_size  # the whole VBAR is allowed
    assert vbar.floor_bytes == 4 * PAGE


# --- a closed VBAR ---------------------------------------------------------------------

CLOSED_VBAR_CALLS = {
    "alloc": lambda v, a: v.alloc(PAGE),
    "fault": lambda v, a: v.fault(a),
    "unpin": lambda v, a: v.unpin(a),
    "prioritize": lambda v, a: v.prioritize(),
    "deprioritize": lambda v, a: v.deprioritize(),
    "set_watermark": lambda v, a: v.set_watermark(0),
    "floor_bytes": lambda v, a: setattr(v, "floor_bytes", 0),
    "free_memory": lambda v, a: v.free_memory(PAGE),
}


@pytest.mark.parametrize("call", CLOSED_VBAR_CALLS.values(), ids=CLOSED_VBAR_CALLS.keys())
def test_using_a_closed_vbar_is_an_invalid_state_error_and_changes_nothing(loaded, call):
    manager = loaded.manager
    closed = manager.create_vbar(2 * PAGE, device=0)
    weight = closed.alloc(PAGE)
    assert closed.fault(weight) is not None  # closing releases it, pin and all
    closed.close()
    assert closed.closed
    before = state(manager, loaded.vbar, closed)
    with pytest.raises(aimdo.InvalidStateError, match="closed") as raised:
        call(closed, weight)
    assert isinstance(raised.value, RuntimeError)
    assert isinstance(raised.value, aimdo.AimdoError)
    assert state(manager, loaded.vbar, closed) == before
    assert residency(closed) == ".."
    assert residency(loaded.vbar) == "PR.."


def test_closing_a_closed_vbar_is_harmless(loaded):
    loaded.vbar.close()
    before = state(loaded.manager, loaded.vbar)
    loaded.vbar.close()
    assert loaded.vbar.closed
    assert state(loaded.manager, loaded.vbar) == before
    assert loaded.manager.vbar_count(0) == 0
    assert loaded.manager.resident_bytes(0) == 0


# --- allocations that do not belong, pins that do not exist ----------------------------


@pytest.mark.parametrize("method", ["fault", "unpin"])
def test_allocation_of_another_vbar_is_a_value_error_and_changes_nothing(loaded, method):
    other = loaded.manager.create_vbar(2 * PAGE, device=0)
    foreign = other.alloc(PAGE)
    assert other.fault(foreign) is not None
    before = state(loaded.manager, loaded.vbar, other)
    with pytest.raises(ValueError, match="another VBAR"):
        getattr(loaded.vbar, method)(foreign)
    assert state(loaded.manager, loaded.vbar, other) == before
    assert residency(other) == "P."


@pytest.mark.sim_only
@pytest.mark.parametrize("method", ["fault", "unpin"])
def test_allocation_of_a_vbar_on_another_device_is_a_value_error(make_manager, method):
    manager = make_manager(pages=8, devices=(0, 1))
    mine = manager.create_vbar(2 * PAGE, device=0)
    theirs = manager.create_vbar(2 * PAGE, device=1)
    foreign = theirs.alloc(PAGE)
    assert theirs.fault(foreign) is not None
    before = state(manager, mine, theirs)
    with pytest.raises(ValueError, match="another VBAR"):
        getattr(mine, method)(foreign)
    assert state(manager, mine, theirs) == before
    assert (residency(mine), residency(theirs)) == ("..", "P.")


def test_unpin_of_an_allocation_never_faulted_is_an_invalid_state_error(loaded):
    never = loaded.vbar.alloc(PAGE)
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(aimdo.InvalidStateError, match="without a matching fault"):
        loaded.vbar.unpin(never)
    assert state(loaded.manager, loaded.vbar) == before


def test_second_unpin_after_one_fault_is_an_invalid_state_error(loaded):
    # `cached` was faulted once and unpinned once by the fixture.
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(aimdo.InvalidStateError, match="without a matching fault"):
        loaded.vbar.unpin(loaded.cached)
    assert state(loaded.manager, loaded.vbar) == before
    assert residency(loaded.vbar) == "PR.."


def test_unpin_counts_pins_per_allocation(loaded):
    vbar = loaded.vbar
    assert vbar.fault(loaded.cached) is not None
    assert vbar.fault(loaded.cached) is not None
    vbar.unpin(loaded.cached)
    assert residency(vbar) == "PP.."
    vbar.unpin(loaded.cached)
    assert residency(vbar) == "PR.."
    before = state(loaded.manager, vbar)
    with pytest.raises(aimdo.InvalidStateError):
        vbar.unpin(loaded.cached)
    assert state(loaded.manager, vbar) == before


def test_unpin_of_an_unpinned_allocation_sharing_a_pinned_page_changes_nothing(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(2 * PAGE, device=0)
    first = vbar.alloc(PAGE // 4)
    second = vbar.alloc(PAGE // 4)  # same page as `first`
    assert vbar.fault(first) is not None
    before = state(manager, vbar)
    with pytest.raises(aimdo.InvalidStateError):
        vbar.unpin(second)  # must not drop the pin `first` holds on the page
    assert state(manager, vbar) == before
    assert residency(vbar) == "P."


# --- devices ---------------------------------------------------------------------------

UNINITIALIZED_DEVICE_CALLS = {
    "create_vbar": lambda m: m.create_vbar(PAGE, device=1),
    "budget_bytes": lambda m: m.budget_bytes(1),
    "limit_bytes": lambda m: m.limit_bytes(1),
    "usage_bytes": lambda m: m.usage_bytes(1),
    "resident_bytes": lambda m: m.resident_bytes(1),
    "deficit_bytes": lambda m: m.deficit_bytes(1, PAGE),
    "reclaim": lambda m: m.reclaim(1, PAGE),
    "reset_floors": lambda m: m.reset_floors(1),
    "memory_info": lambda m: m.memory_info(1),
    "vbar_count": lambda m: m.vbar_count(1),
    "stats": lambda m: m.stats(1),
    "device_info": lambda m: m.device_info(1),
}


@pytest.mark.parametrize(
    "call", UNINITIALIZED_DEVICE_CALLS.values(), ids=UNINITIALIZED_DEVICE_CALLS.keys()
)
def test_uninitialized_device_is_a_device_not_initialized_error(loaded, call):
    manager = loaded.manager
    assert manager.devices == [0]
    before = state(manager, loaded.vbar)
    with pytest.raises(aimdo.DeviceNotInitializedError) as raised:
        call(manager)
    error = raised.value
    assert isinstance(error, LookupError)
    assert isinstance(error, aimdo.AimdoError)
    assert error.device == 1
    message = str(error)
    assert "device 1 is not initialized" in message
    assert "(initialized: [0])" in message  # names the devices that are
    assert "add_devices([1])" in message  # and the fix
    assert "aimdo.init(devices=" in message
    assert state(manager, loaded.vbar) == before
    assert manager.devices == [0]


def test_device_that_does_not_exist_is_a_value_error(loaded):
    manager = loaded.manager
    missing = manager.backend.device_count  # ordinals run from 0 to count - 1
    before = state(manager, loaded.vbar)
    with pytest.raises(ValueError, match=f"device {missing} does not exist"):
        manager.add_devices([missing])
    with pytest.raises(ValueError, match="device -1 does not exist"):
        manager.add_devices([-1])
    assert manager.devices == [0]
    assert state(manager, loaded.vbar) == before


def test_manager_on_a_device_that_does_not_exist_is_a_value_error(make_manager):
    count = make_manager(pages=1).backend.device_count
    with pytest.raises(ValueError, match=f"device {count} does not exist"):
        aimdo.Manager(BACKEND, [count])


def test_add_devices_with_a_missing_device_changes_no_options(loaded):
    manager = loaded.manager
    info = manager.device_info(0)
    missing = manager.backend.device_count
    with pytest.raises(ValueError, match="does not exist"):
        manager.add_devices(
            [0, missing],
            vram_limit=info["vram_limit"],
            headroom=info["headroom"] + PAGE,
            page_size=PAGE,
            poll_interval=info["poll_interval"],
        )
    assert manager.device_info(0) == info
    assert manager.devices == [0]


@pytest.mark.sim_only
def test_add_devices_with_a_bad_page_size_for_one_device_changes_no_options(make_manager):
    manager = make_manager(pages=8, devices=(0, 1))
    infos = [manager.device_info(0), manager.device_info(1)]
    with pytest.raises(ValueError, match="page_size"):
        manager.add_devices(
            [0, 1],
            vram_limit=infos[0]["vram_limit"],
            headroom=PAGE,
            page_size={0: PAGE, 1: 3 * MiB},
            poll_interval=infos[0]["poll_interval"],
        )
    assert [manager.device_info(0), manager.device_info(1)] == infos


# --- a closed Manager ------------------------------------------------------------------

CLOSED_MANAGER_CALLS = {
    "create_vbar": lambda m, v, a: m.create_vbar(PAGE, device=0),
    "reclaim": lambda m, v, a: m.reclaim(0, PAGE),
    "add_devices": lambda m, v, a: m.add_devices([0]),
    "vbar.alloc": lambda m, v, a: v.alloc(PAGE),
    "vbar.fault": lambda m, v, a: v.fault(a),
}


@pytest.mark.parametrize("call", CLOSED_MANAGER_CALLS.values(), ids=CLOSED_MANAGER_CALLS.keys())
def test_closed_manager_is_an_invalid_state_error_and_changes_nothing(make_manager, call):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(2 * PAGE, device=0)
    weight = vbar.alloc(PAGE)
    assert vbar.fault(weight) is not None
    manager.close()
    assert vbar.closed  # closing the Manager closes its VBARs
    info = manager.device_info(0)
    before = state(manager, vbar)
    with pytest.raises(aimdo.InvalidStateError, match="closed"):
        call(manager, vbar, weight)
    assert state(manager, vbar) == before
    assert manager.closed
    assert manager.device_info(0) == info
    assert (manager.vbar_count(0), manager.resident_bytes(0)) == (0, 0)


# --- Manager options and backends ------------------------------------------------------

BAD_OPTIONS = {
    "negative headroom": ({"headroom": -1}, ValueError),
    "negative extra_headroom": ({"extra_headroom": -PAGE}, ValueError),
    "negative vram_limit": ({"vram_limit": -1}, ValueError),
    "zero vram_limit": ({"vram_limit": 0}, ValueError),
    "negative page_size": ({"page_size": -PAGE}, ValueError),
    "zero page_size": ({"page_size": 0}, ValueError),
    "page_size 1 MiB": ({"page_size": 1 * MiB}, ValueError),
    "page_size 3 MiB": ({"page_size": 3 * MiB}, ValueError),
    "negative poll_interval": ({"poll_interval": -1}, ValueError),
    "nan poll_interval": ({"poll_interval": math.nan}, ValueError),
    "inf poll_interval": ({"poll_interval": math.inf}, ValueError),
    "float headroom": ({"headroom": 1.5}, TypeError),
    "str headroom": ({"headroom": "1GiB"}, TypeError),
    "bool vram_limit": ({"vram_limit": True}, TypeError),
    "float page_size": ({"page_size": float(PAGE)}, TypeError),
    "str poll_interval": ({"poll_interval": "2"}, TypeError),
    "bool poll_interval": ({"poll_interval": True}, TypeError),
    "dict with a device not listed": ({"headroom": {0: 0, 1: 0}}, ValueError),
}


@pytest.mark.parametrize("options, error", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_to_add_devices_raises_and_changes_nothing(loaded, options, error):
    manager = loaded.manager
    info = manager.device_info(0)
    before = state(manager, loaded.vbar)
    with pytest.raises(error):
        manager.add_devices([0], **options)
    assert manager.device_info(0) == info
    assert state(manager, loaded.vbar) == before


@pytest.mark.parametrize("options, error", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_to_manager_raises(options, error):
    with pytest.raises(error):
        aimdo.Manager(BACKEND, [0], **options)


# --- every size and limit option at its extremes ---------------------------------------

SIZE_OPTIONS = ["vram_limit", "headroom", "extra_headroom", "page_size", "allocator_headroom"]
BEYOND = {
    "2^60+1": 2**60 + 1,
    "2^62": 2**62,
    "2^63-1": 2**63 - 1,
    "2^64-1": 2**64 - 1,
    "2^64": 2**64,
    "2^100": 2**100,
}


@pytest.mark.parametrize("value", BEYOND.values(), ids=BEYOND.keys())
@pytest.mark.parametrize("name", SIZE_OPTIONS)
def test_a_size_option_beyond_2_60_is_refused_and_changes_nothing(loaded, name, value):
    manager = loaded.manager
    info = manager.device_info(0)
    before = state(manager, loaded.vbar)
    with pytest.raises(ValueError, match=name):
        manager.add_devices([0], **{name: value})
    assert manager.device_info(0) == info
    assert state(manager, loaded.vbar) == before


def test_a_page_larger_than_the_device_is_refused(loaded):
    manager = loaded.manager
    total = manager.memory_info(0)[1]
    info = manager.device_info(0)
    with pytest.raises(ValueError, match="page_size"):
        manager.add_devices([0], page_size=(total // PAGE + 1) * PAGE)
    assert manager.device_info(0) == info


@pytest.mark.parametrize("name", ["headroom", "extra_headroom"])
def test_a_headroom_of_2_60_leaves_a_budget_of_zero_and_exact_figures(make_manager, name):
    manager = make_manager(pages=4)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(PAGE)
    manager.add_devices([0], **{name: 2**60})
    limit, others = manager.limit_bytes(0), manager.baseline[0]
    assert manager.budget_bytes(0) == 0
    # The measured part: headroom - (free - (total - limit)) + size, + extra_headroom, with
    # free - (total - limit) = limit - others at the Manager's one poll (0 on a simulator).
    assert manager.deficit_bytes(0, PAGE) == PAGE + 2**60 - limit + others
    assert vbar.fault(weight) is None
    with pytest.raises(aimdo.OutOfMemoryError):
        manager.external_alloc(0, PAGE)
    assert (manager.usage_bytes(0), manager.external_bytes(0)) == (0, 0)


def test_an_allocator_headroom_of_2_60_refuses_every_external_allocation(make_manager):
    """allocator_headroom=2**63-1 once overflowed the deficit and let external_alloc
    succeed with a budget of 0; now 2**60 is the most, and the arithmetic is exact."""
    manager = make_manager(pages=4)
    manager.add_devices([0], allocator_headroom=2**60)
    for size in (1, PAGE, 2**60):
        with pytest.raises(aimdo.OutOfMemoryError, match="no room"):
            manager.external_alloc(0, size)
    assert (manager.usage_bytes(0), manager.external_bytes(0)) == (0, 0)
    manager.add_devices([0], allocator_headroom=0)
    ptr = manager.external_alloc(0, PAGE)
    assert manager.external_bytes(0) == PAGE
    manager.external_free(ptr)


def test_a_budget_of_zero_refuses_an_external_allocation_whatever_its_headroom(make_manager):
    manager = make_manager(pages=0, headroom=PAGE)
    # The budget is exactly what others use (nothing on a simulator): none of it is left.
    assert manager.budget_bytes(0) == manager.baseline[0]
    assert manager.deficit_bytes(0, 0) == 0
    for allocator_headroom in (0, 1, 2**59, 2**60):
        manager.add_devices([0], allocator_headroom=allocator_headroom)
        with pytest.raises(aimdo.OutOfMemoryError):
            manager.external_alloc(0, PAGE)
    assert manager.external_bytes(0) == 0


def test_vram_limit_at_2_60_is_the_whole_device(make_manager):
    manager = make_manager(pages=4)
    total = manager.memory_info(0)[1]
    manager.add_devices([0], vram_limit=2**60, headroom=0, extra_headroom=0)
    assert manager.limit_bytes(0) == total
    assert manager.budget_bytes(0) == total


@pytest.mark.parametrize(
    "seconds, accepted",
    [
        (0, True),
        (1e-12, True),
        (2**62 / 1e9, True),
        (2**62 / 1e9 * 1.000001, False),
        (1e10, False),
        (1e300, False),
        (1.7976931348623157e308, False),
    ],
)
def test_poll_interval_at_its_extremes(loaded, seconds, accepted):
    manager = loaded.manager
    if accepted:
        manager.add_devices([0], poll_interval=seconds)
        assert manager.device_info(0)["poll_interval"] == pytest.approx(seconds, rel=1e-9)
        manager.deficit_bytes(0, 0)  # a poll due check on the clock: no overflow
        return
    info = manager.device_info(0)
    with pytest.raises(ValueError, match="poll_interval"):
        manager.add_devices([0], poll_interval=seconds)
    assert manager.device_info(0) == info


@pytest.mark.parametrize(
    "devices, error",
    [([], ValueError), (True, TypeError), (["0"], TypeError), ([0.0], TypeError)],
    ids=["empty", "bool", "str", "float"],
)
def test_bad_device_list_raises(loaded, devices, error):
    before = state(loaded.manager, loaded.vbar)
    with pytest.raises(error):
        loaded.manager.add_devices(devices)
    with pytest.raises(error):
        aimdo.Manager(BACKEND, devices)
    assert state(loaded.manager, loaded.vbar) == before


@pytest.mark.parametrize("name", ["tpu", "", "simulator", "cuda:0"])
def test_unknown_backend_name_is_a_value_error(name):
    with pytest.raises(ValueError, match="expected 'sim' or 'cuda'"):
        aimdo.Manager(name, [0])


@pytest.mark.parametrize(
    "backend", [3, 1.0, b"sim", ["sim"]], ids=["int", "float", "bytes", "list"]
)
def test_backend_of_the_wrong_type_is_a_type_error(backend):
    with pytest.raises(TypeError, match="backend must be"):
        aimdo.Manager(backend, [0])


# --- the simulator's own arguments -----------------------------------------------------

BAD_SIM_SPECS = {
    "zero devices": ("0x1GiB", ValueError),
    "empty string": ("", ValueError),
    "no size after x": ("2x", ValueError),
    "trailing comma": ("1GiB,", ValueError),
    "unreadable": ("lots", ValueError),
    "negative": ("-1GiB", ValueError),
    "zero capacity": ("0", ValueError),
    "too many devices": ("65x1GiB", ValueError),
    "empty list": ([], ValueError),
    "no capacity": ([{"name": "x"}], ValueError),
    "unknown key": ([{"capacity": "1GiB", "color": "red"}], ValueError),
    "granularity not a power of two": ([{"capacity": "1GiB", "granularity": "3MiB"}], ValueError),
    "granularity below 4 KiB": ([{"capacity": "1GiB", "granularity": 1024}], ValueError),
    "int spec": (5, TypeError),
    "float capacity": ([1.5], TypeError),
    "bool capacity": ([True], TypeError),
}


@pytest.mark.sim_only
@pytest.mark.parametrize("spec, error", BAD_SIM_SPECS.values(), ids=BAD_SIM_SPECS.keys())
def test_bad_simulator_spec_raises(spec, error):
    with pytest.raises(error):
        aimdo.SimBackend(spec)


@pytest.mark.sim_only
def test_negative_simulator_seed_is_a_value_error():
    with pytest.raises(ValueError, match="seed"):
        aimdo.SimBackend("1GiB", seed=-1)


BAD_FAIL_CALLS = {
    "unknown operation": (
        lambda s: s.fail("cuMemAllocate", device=0),
        ValueError,
        "unknown driver operation",
    ),
    "unknown error name": (lambda s: s.fail("cuMemMap", error="boom"), ValueError, "error must be"),
    "float error": (lambda s: s.fail("cuMemMap", error=2.0), TypeError, "error must be"),
    "zero count": (lambda s: s.fail("cuMemMap", count=0), ValueError, "count"),
    "negative skip": (lambda s: s.fail("cuMemMap", skip=-1), ValueError, "negative"),
    "success code": (lambda s: s.fail("cuMemMap", error=0), ValueError, "non-zero"),
    "missing device": (lambda s: s.fail("cuMemMap", device=7), ValueError, "no device 7"),
}


@pytest.mark.sim_only
@pytest.mark.parametrize("call, error, message", BAD_FAIL_CALLS.values(), ids=BAD_FAIL_CALLS.keys())
def test_bad_fail_call_raises_and_arms_nothing(loaded, call, error, message):
    sim = loaded.manager.sim
    with pytest.raises(error, match=message):
        call(sim)
    # No failure was armed: faulting every remaining page succeeds.
    rest = loaded.vbar.alloc(2 * PAGE)
    assert loaded.vbar.fault(rest) is not None
    assert residency(loaded.vbar) == "PRPP"


@pytest.mark.sim_only
def test_fail_with_an_unknown_operation_names_the_known_ones(loaded):
    with pytest.raises(ValueError) as raised:
        loaded.manager.sim.fail("cuMemAllocate")
    for operation in ("cuMemCreate", "cuMemMap", "cuMemSetAccess"):
        assert operation in str(raised.value)


@pytest.mark.sim_only
def test_removing_more_external_usage_than_added_is_a_value_error(loaded):
    manager, sim = loaded.manager, loaded.manager.sim
    sim.add_external_usage(0, PAGE)
    free_before = manager.memory_info(0)
    before = state(manager, loaded.vbar)
    with pytest.raises(ValueError, match="cannot remove"):
        sim.remove_external_usage(0, PAGE + 1)
    assert sim.external_usage(0) == PAGE
    assert manager.memory_info(0) == free_before
    assert state(manager, loaded.vbar) == before
    sim.remove_external_usage(0, PAGE)
    assert sim.external_usage(0) == 0


@pytest.mark.sim_only
def test_adding_more_external_usage_than_free_is_a_value_error(loaded):
    manager, sim = loaded.manager, loaded.manager.sim
    free, total = manager.memory_info(0)
    before = state(manager, loaded.vbar)
    with pytest.raises(ValueError, match="cannot add"):
        sim.add_external_usage(0, free + 1)
    assert sim.external_usage(0) == 0
    assert manager.memory_info(0) == (free, total)
    assert state(manager, loaded.vbar) == before


# --- failures injected into the driver -------------------------------------------------


@pytest.mark.sim_only
def test_injected_out_of_memory_twice_evicts_one_page_more_then_raises_a_flagged_error(
    make_manager,
):
    """design.md §3.2: on the driver's out-of-memory, evict one page more and retry once; a
    second failure is an error. The page evicted for the retry stays evicted."""
    manager = make_manager(pages=8)
    older = manager.create_vbar(2 * PAGE, device=0)
    for allocation in [older.alloc(PAGE), older.alloc(PAGE)]:
        assert older.fault(allocation) is not None
        older.unpin(allocation)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(PAGE)
    before = state(manager, vbar)
    manager.sim.fail("cuMemCreate", device=0, error="out_of_memory", count=2)
    with pytest.raises(aimdo.OutOfMemoryError) as raised:
        vbar.fault(weight)
    error = raised.value
    assert isinstance(error, MemoryError)
    assert isinstance(error, aimdo.AimdoError)
    assert error.injected is True
    assert error.device == 0
    assert error.requested_bytes == PAGE
    assert state(manager, vbar)[0] == before[0]  # the faulting VBAR is untouched
    assert residency(vbar) == "...."
    assert residency(older) == "R."
    assert manager.stats(0)["oom_retries"] == 1
    assert manager.sim.physical_bytes(0) == PAGE


@pytest.mark.sim_only
def test_injected_out_of_memory_once_is_retried_and_the_fault_succeeds(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(2 * PAGE, device=0)
    for allocation in [older.alloc(PAGE), older.alloc(PAGE)]:
        assert older.fault(allocation) is not None
        older.unpin(allocation)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(PAGE)
    manager.sim.fail("cuMemCreate", device=0, error="out_of_memory", count=1)
    assert vbar.fault(weight) is not None
    assert residency(vbar) == "P..."
    assert residency(older) == "R."
    assert vbar.watermark_bytes == 4 * PAGE
    assert manager.stats(0)["oom_retries"] == 1


@pytest.mark.sim_only
def test_injected_out_of_memory_with_nothing_to_evict_retries_once_and_maps(make_manager):
    """The walk for "one page more" may take only pages of lower priority than the
    fault's own (design.md §3.2): a lone VBAR with nothing above the allocation gives
    nothing, and its watermark stays. The one retry then succeeds."""
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(PAGE)
    manager.sim.fail("cuMemCreate", device=0, error="out_of_memory", count=1)
    assert vbar.fault(weight) is not None
    assert residency(vbar) == "P..."
    assert vbar.watermark_bytes == 4 * PAGE
    assert manager.stats(0)["oom_retries"] == 1
    assert manager.stats(0)["evicted_bytes"] == 0
    assert manager.sim.physical_bytes(0) == PAGE
    vbar.unpin(weight)


@pytest.mark.sim_only
def test_injected_out_of_memory_twice_with_nothing_to_evict_raises_and_changes_nothing(
    make_manager,
):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(PAGE)
    before = state(manager, vbar)
    manager.sim.fail("cuMemCreate", device=0, error="out_of_memory", count=2)
    with pytest.raises(aimdo.OutOfMemoryError) as raised:
        vbar.fault(weight)
    assert raised.value.injected is True
    assert state(manager, vbar) == before
    assert residency(vbar) == "...."


@pytest.mark.sim_only
def test_injected_out_of_memory_twice_under_a_full_floor_raises_and_changes_nothing(loaded):
    manager, vbar = loaded.manager, loaded.vbar
    vbar.floor_bytes = vbar.page_count * vbar.page_size  # eviction may not touch this VBAR
    weight = vbar.alloc(PAGE)
    before = state(manager, vbar)
    manager.sim.fail("cuMemCreate", device=0, error="out_of_memory", count=2)
    with pytest.raises(aimdo.OutOfMemoryError) as raised:
        vbar.fault(weight)
    assert raised.value.injected is True
    assert raised.value.device == 0
    assert state(manager, vbar) == before
    assert residency(vbar) == "PR.."


@pytest.mark.sim_only
@pytest.mark.parametrize("operation", ["cuMemCreate", "cuMemMap", "cuMemSetAccess"])
def test_injected_driver_error_raises_a_flagged_driver_error(loaded, operation):
    manager, vbar = loaded.manager, loaded.vbar
    weight = vbar.alloc(PAGE)
    before = state(manager, vbar)
    manager.sim.fail(operation, device=0, error="error")
    with pytest.raises(aimdo.DriverError) as raised:
        vbar.fault(weight)
    error = raised.value
    assert isinstance(error, RuntimeError)
    assert isinstance(error, aimdo.AimdoError)
    assert not isinstance(error, aimdo.OutOfMemoryError)
    assert (error.operation, error.code, error.error_name) == (operation, 999, "CUDA_ERROR_UNKNOWN")
    assert error.injected is True
    assert error.device == 0
    assert operation in str(error) and "device 0" in str(error)
    assert state(manager, vbar) == before
    # The failure was used up and nothing was left half done: the same fault now works.
    assert vbar.fault(weight) is not None
    assert residency(vbar) == "PRP."


@pytest.mark.sim_only
def test_injected_not_ready_once_is_retried_and_the_fault_succeeds(loaded):
    manager, vbar = loaded.manager, loaded.vbar
    weight = vbar.alloc(PAGE)
    manager.sim.fail("cuMemSetAccess", device=0, error="not_ready", count=1)
    assert vbar.fault(weight) is not None
    assert residency(vbar) == "PRP."
    assert manager.stats(0)["transient_retries"] == 1


@pytest.mark.sim_only
def test_injected_not_ready_beyond_the_retries_raises_a_driver_error(loaded):
    manager, vbar = loaded.manager, loaded.vbar
    weight = vbar.alloc(PAGE)
    before = state(manager, vbar)
    manager.sim.fail("cuMemSetAccess", device=0, error="not_ready", count=4)  # 1 try + 3 retries
    with pytest.raises(aimdo.DriverError) as raised:
        vbar.fault(weight)
    error = raised.value
    assert (error.error_name, error.code, error.operation) == (
        "CUDA_ERROR_NOT_READY",
        600,
        "cuMemSetAccess",
    )
    assert error.injected is True
    assert manager.stats(0)["transient_retries"] == 3
    assert state(manager, vbar) == before
    assert residency(vbar) == "PR.."


@pytest.mark.sim_only
def test_injected_failure_on_another_device_does_not_touch_this_one(make_manager):
    manager = make_manager(pages=8, devices=(0, 1))
    vbar = manager.create_vbar(2 * PAGE, device=0)
    manager.sim.fail("cuMemMap", device=1, error="error")
    assert vbar.fault(vbar.alloc(PAGE)) is not None
    assert residency(vbar) == "P."
    other = manager.create_vbar(2 * PAGE, device=1)
    with pytest.raises(aimdo.DriverError) as raised:
        other.fault(other.alloc(PAGE))
    assert raised.value.device == 1
    assert residency(other) == ".."
