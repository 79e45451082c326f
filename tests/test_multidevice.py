"""design.md §4: every counter, budget and list is per device."""

from __future__ import annotations

import threading

import aimdo
import pytest
from conftest import PAGE, residency


def fill(vbar, pages):
    allocations = [vbar.alloc(PAGE) for _ in range(pages)]
    for allocation in allocations:
        signature = vbar.fault(allocation)
        if signature is not None:
            vbar.unpin(allocation)
    return allocations


def test_pressure_on_one_device_never_evicts_another(make_manager):
    manager = make_manager(pages=4, devices=(0, 1))
    on_zero = manager.create_vbar(8 * PAGE, device=0)
    on_one = manager.create_vbar(8 * PAGE, device=1)
    fill(on_one, 4)
    assert residency(on_one) == "RRRR...."
    pressure = manager.create_vbar(8 * PAGE, device=0)
    fill(on_zero, 4)
    fill(pressure, 4)  # device 0 evicts all of on_zero
    assert residency(on_zero) == "........"
    assert residency(pressure) == "RRRR...."
    assert residency(on_one) == "RRRR...."
    assert manager.stats(1)["pages_released"] == 0
    assert manager.reclaim(0, 4 * PAGE) == 4 * PAGE
    assert residency(on_one) == "RRRR...."


def test_resident_bytes_are_reported_per_device(make_manager):
    manager = make_manager(pages={0: 4, 1: 6}, devices=(0, 1))
    zero = manager.create_vbar(8 * PAGE, device=0)
    one = manager.create_vbar(8 * PAGE, device=1)
    fill(zero, 3)
    fill(one, 6)
    assert manager.resident_bytes(0) == 3 * PAGE
    assert manager.resident_bytes(1) == 6 * PAGE
    assert manager.usage_bytes(0) == 3 * PAGE
    assert manager.usage_bytes(1) == 6 * PAGE
    assert (zero.device, one.device) == (0, 1)


def test_each_device_has_its_own_budget(make_manager):
    manager = make_manager(pages={0: 2, 1: 6}, devices=(0, 1))
    zero = manager.create_vbar(8 * PAGE, device=0)
    one = manager.create_vbar(8 * PAGE, device=1)
    fill(zero, 8)
    fill(one, 8)
    # Each lone VBAR fills its own device's budget exactly, whatever the other holds.
    assert residency(zero) == "RR......"
    assert residency(one) == "RRRRRR.."
    assert manager.deficit_bytes(0, 0) == 0
    assert manager.deficit_bytes(1, 0) == 0
    assert manager.resident_bytes(0) == 2 * PAGE
    assert manager.resident_bytes(1) == 6 * PAGE


@pytest.mark.sim_only
def test_external_usage_on_one_device_does_not_shrink_another(make_manager):
    manager = make_manager(pages=4, devices=(0, 1), poll_interval=0)
    zero = manager.create_vbar(4 * PAGE, device=0)
    one = manager.create_vbar(4 * PAGE, device=1)
    fill(zero, 4)
    fill(one, 4)
    manager.sim.add_external_usage(1, 3 * PAGE)
    assert manager.deficit_bytes(0, 0) == 0
    assert manager.deficit_bytes(1, 0) == 3 * PAGE
    assert manager.reclaim(0, 0) == 0
    assert manager.reclaim(1, 0) == 3 * PAGE
    assert (residency(zero), residency(one)) == ("RRRR", "R...")
    assert manager.budget_bytes(0) == manager.budget_bytes(1) == 4 * PAGE


@pytest.mark.sim_only
def test_eight_devices_keep_eight_budgets(make_manager):
    sim = aimdo.SimBackend("8x1GiB")
    manager = make_manager(pages={d: d + 1 for d in range(8)}, devices=range(8), sim=sim)
    vbars = [manager.create_vbar(8 * PAGE, device=d) for d in range(8)]
    for vbar in vbars:
        fill(vbar, vbar.device + 1)
    assert [manager.resident_bytes(d) for d in range(8)] == [(d + 1) * PAGE for d in range(8)]
    assert [sim.physical_bytes(d) for d in range(8)] == [(d + 1) * PAGE for d in range(8)]


def test_two_threads_on_two_devices_end_in_the_same_state(make_manager):
    """One thread per device, each cycling a model twice its budget through its VBAR."""
    manager = make_manager(pages=4, devices=(0, 1))
    vbars = {d: manager.create_vbar(8 * PAGE, device=d) for d in (0, 1)}
    allocations = {d: [vbars[d].alloc(PAGE) for _ in range(8)] for d in (0, 1)}
    failures = []
    offloaded = {0: 0, 1: 0}

    def drive(device):
        try:
            vbar = vbars[device]
            for _ in range(200):
                vbar.prioritize()
                for allocation in allocations[device]:
                    if vbar.fault(allocation) is None:
                        offloaded[device] += 1
                    else:
                        vbar.unpin(allocation)
        except BaseException as error:  # reported below, with the device
            failures.append((device, error))

    threads = [threading.Thread(target=drive, args=(d,)) for d in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    # Each pass: pages 0..3 resident (the budget), pages 4..7 offloaded without evicting.
    for device in (0, 1):
        assert residency(vbars[device]) == "RRRR....", device
        assert manager.resident_bytes(device) == 4 * PAGE
        assert manager.stats(device)["evicted_bytes"] == 0, device
    assert offloaded[0] == 200 * 4
    assert offloaded[0] == offloaded[1]
