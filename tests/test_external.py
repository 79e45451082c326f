"""design.md §3.7: allocations made through aimdo for someone else (PyTorch's allocator)."""

from __future__ import annotations

import threading

import aimdo
import pytest
from conftest import PAGE, residency


def fill(vbar, pages):
    for _ in range(pages):
        allocation = vbar.alloc(PAGE)
        assert vbar.fault(allocation) is not None
        vbar.unpin(allocation)


def test_an_external_allocation_evicts_vbar_pages_on_its_device_only(make_manager):
    manager = make_manager(pages=8, devices=(0, 1))
    zero = manager.create_vbar(8 * PAGE, device=0)
    one = manager.create_vbar(8 * PAGE, device=1)
    fill(zero, 8)
    fill(one, 8)
    ptr = manager.external_alloc(0, 3 * PAGE)
    assert ptr != 0
    assert residency(zero) == "RRRRR..."
    assert residency(one) == "RRRRRRRR"
    assert manager.external_bytes(0) == 3 * PAGE
    assert manager.usage_bytes(0) == 8 * PAGE
    assert manager.resident_bytes(0) == 5 * PAGE
    manager.external_free(ptr)
    assert manager.external_bytes(0) == 0
    assert manager.usage_bytes(0) == 5 * PAGE


def test_the_allocator_headroom_is_made_room_for_too(make_manager):
    manager = make_manager(pages=8)
    manager.add_devices([0], allocator_headroom=2 * PAGE)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    fill(vbar, 8)
    ptr = manager.external_alloc(0, PAGE)
    assert residency(vbar) == "RRRRR..."  # 1 page + 2 pages of headroom
    manager.external_free(ptr)


def test_an_external_allocation_the_budget_cannot_meet_is_refused_cleanly(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    allocations = [vbar.alloc(PAGE) for _ in range(8)]
    for allocation in allocations:
        assert vbar.fault(allocation) is not None  # all pinned
    with pytest.raises(aimdo.OutOfMemoryError) as raised:
        manager.external_alloc(0, 2 * PAGE)
    assert raised.value.device == 0
    assert raised.value.requested_bytes == 2 * PAGE
    assert "device 0" in str(raised.value)
    assert manager.external_bytes(0) == 0
    assert manager.usage_bytes(0) == 8 * PAGE
    # The walk lowered the watermark past the pinned pages: they go at their unpin.
    for allocation in allocations:
        vbar.unpin(allocation)
    assert residency(vbar) == "........"
    ptr = manager.external_alloc(0, 2 * PAGE)
    manager.external_free(ptr)


def test_a_free_from_a_thread_without_context_finds_the_owning_device(make_manager):
    manager = make_manager(pages=8, devices=(0, 1))
    ptr = manager.external_alloc(1, PAGE)
    errors = []

    def free_elsewhere():
        try:
            manager.external_free(ptr)
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=free_elsewhere)
    thread.start()
    thread.join()
    assert errors == []
    assert manager.external_bytes(1) == 0
    assert manager.external_bytes(0) == 0
    if manager.sim is not None:
        assert manager.sim.call_count("cuMemFreeAsync", 1) == 1
        assert manager.sim.call_count("cuMemFreeAsync", 0) == 0


def test_freeing_an_unknown_pointer_is_a_value_error(make_manager):
    manager = make_manager(pages=8)
    ptr = manager.external_alloc(0, PAGE)
    manager.external_free(ptr)
    with pytest.raises(ValueError, match="not an allocation"):
        manager.external_free(ptr)
    with pytest.raises(ValueError):
        manager.external_free(12345)


def test_close_frees_outstanding_external_allocations(make_manager):
    manager = make_manager(pages=8, devices=(0, 1))
    manager.external_alloc(0, PAGE)
    manager.external_alloc(1, 2 * PAGE)
    manager.close()
    if manager.sim is not None:
        assert manager.sim.leaks() == []
        assert manager.sim.used_bytes(0) == manager.sim.used_bytes(1) == 0


@pytest.mark.sim_only
def test_a_driver_out_of_memory_evicts_more_and_retries_once(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    fill(vbar, 6)
    manager.sim.fail("cuMemAllocAsync", device=0, error="out_of_memory")
    ptr = manager.external_alloc(0, 2 * PAGE)
    assert residency(vbar) == "RRRR...."  # the retry evicted size + headroom (0) more
    manager.external_free(ptr)
    manager.sim.fail("cuMemAllocAsync", device=0, error="out_of_memory", count=2)
    with pytest.raises(aimdo.OutOfMemoryError) as raised:
        manager.external_alloc(0, PAGE)
    assert raised.value.injected is True
    assert manager.external_bytes(0) == 0
