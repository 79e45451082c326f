"""What a driver failure in the middle of a release leaves behind (found by review).

Each failure is injected on the simulator; afterwards no page may be pinned, stranded
where eviction cannot reach it, or released without the failure being reported.
"""

from __future__ import annotations

import threading

import aimdo
import pytest
from conftest import PAGE, residency

pytestmark = pytest.mark.sim_only


def manager_on(sim, **options):
    return aimdo.Manager(
        sim, [0, 1][: sim.device_count], page_size=PAGE, headroom=0, poll_interval=0, **options
    )


def test_a_failed_release_during_unpin_leaves_no_page_pinned():
    sim = aimdo.SimBackend("1x1GiB")
    with manager_on(sim) as manager:
        vbar = manager.create_vbar(8 * PAGE, 0)
        allocation = vbar.alloc(3 * PAGE)
        assert vbar.fault(allocation) is not None
        vbar.set_watermark(0)  # the pinned pages stay, above the watermark
        sim.fail("cuCtxSynchronize", error="error")
        with pytest.raises(aimdo.DriverError):
            vbar.unpin(allocation)
        assert "P" not in residency(vbar)
        with pytest.raises(aimdo.InvalidStateError):
            vbar.unpin(allocation)  # the pin is gone
        # The pages could not be released; eviction still reaches them.
        assert vbar.free_memory(8 * PAGE) == 3 * PAGE
        assert manager.resident_bytes(0) == 0 == sim.physical_bytes(0)


def four_resident_pages_that_will_not_unmap(manager, sim):
    vbar = manager.create_vbar(4 * PAGE, 0)
    allocation = vbar.alloc(4 * PAGE)
    vbar.fault(allocation)
    vbar.unpin(allocation)
    sim.fail("cuMemUnmap", error="error", count=10)
    return vbar


def test_a_failed_release_while_lowering_the_watermark_strands_nothing():
    sim = aimdo.SimBackend("1x1GiB")
    with manager_on(sim) as manager:
        vbar = four_resident_pages_that_will_not_unmap(manager, sim)
        with pytest.raises(aimdo.DriverError):
            vbar.set_watermark(0)
        sim.clear_failures()
        # The page that failed is still resident and below the watermark: evictable.
        assert vbar.watermark_bytes == 4 * PAGE
        assert manager.reclaim(0, 1 << 30) == 4 * PAGE
        assert manager.resident_bytes(0) == 0 == sim.physical_bytes(0)


def test_a_failed_release_during_eviction_strands_nothing():
    sim = aimdo.SimBackend("1x1GiB")
    with manager_on(sim) as manager:
        vbar = four_resident_pages_that_will_not_unmap(manager, sim)
        with pytest.raises(aimdo.DriverError):
            vbar.free_memory(PAGE)
        sim.clear_failures()
        assert vbar.watermark_bytes == 4 * PAGE
        assert vbar.free_memory(4 * PAGE) == 4 * PAGE
        assert sim.physical_bytes(0) == 0


def closable(sim, pages=2):
    manager = manager_on(sim)
    vbar = manager.create_vbar(4 * PAGE, 0)
    allocation = vbar.alloc(pages * PAGE)
    vbar.fault(allocation)
    vbar.unpin(allocation)
    return manager, vbar


def test_close_reports_a_release_that_failed_and_a_second_close_releases_it():
    sim = aimdo.SimBackend("1x1GiB")
    manager, vbar = closable(sim)
    sim.fail("cuMemRelease", error="error", count=100)
    with pytest.raises(aimdo.DriverError) as raised:
        vbar.close()
    assert raised.value.operation == "cuMemRelease"
    assert vbar.closed
    # The driver kept the memory, the leak report says so, and aimdo still counts it.
    leaks = sim.leaks()
    assert len(leaks) == 2 and all("physical allocation" in leak for leak in leaks)
    assert manager.resident_bytes(0) == 2 * PAGE == sim.physical_bytes(0)
    with pytest.raises(aimdo.DriverError):
        vbar.close()  # the driver still refuses: still reported
    sim.clear_failures()
    vbar.close()  # the driver recovered: what is left is released
    assert sim.leaks() == []
    assert manager.resident_bytes(0) == 0
    manager.close()


@pytest.mark.parametrize("operation", ["cuMemUnmap", "cuMemAddressFree", "cuCtxSynchronize"])
def test_a_second_manager_close_retries_what_a_failed_close_left(operation):
    sim = aimdo.SimBackend("1x1GiB")
    manager, vbar = closable(sim)
    sim.fail(operation, error="error", count=100)
    with pytest.raises(aimdo.DriverError) as raised:
        manager.close()
    assert raised.value.operation == operation
    assert manager.closed and vbar.closed
    if operation != "cuCtxSynchronize":  # a failed synchronize does not stop the releases
        assert sim.leaks() != []
    sim.clear_failures()
    manager.close()
    assert sim.leaks() == []
    assert manager.resident_bytes(0) == 0


def test_what_a_dropped_vbar_could_not_release_is_released_by_the_manager_close():
    import gc

    sim = aimdo.SimBackend("1x1GiB")
    manager, vbar = closable(sim)
    sim.fail("cuMemUnmap", error="error", count=100)
    del vbar  # its destructor closes it; the failure cannot be reported there
    gc.collect()
    assert manager.vbar_count(0) == 0
    assert len(sim.leaks()) >= 2
    sim.clear_failures()
    manager.close()
    assert sim.leaks() == []


def test_an_external_free_that_failed_at_close_is_retried():
    sim = aimdo.SimBackend("1x1GiB")
    manager = manager_on(sim)
    manager.external_alloc(0, PAGE)
    sim.fail("cuMemFreeAsync", error="error", count=100)
    with pytest.raises(aimdo.DriverError):
        manager.close()
    assert manager.external_bytes(0) == PAGE
    sim.clear_failures()
    manager.close()
    assert manager.external_bytes(0) == 0
    assert sim.leaks() == []


def test_a_second_close_after_a_clean_one_calls_no_driver():
    sim = aimdo.SimBackend("1x1GiB")
    manager, vbar = closable(sim)
    vbar.close()
    manager.close()
    calls = {name: sim.call_count(name) for name in sim.operations()}
    vbar.close()
    manager.close()
    assert {name: sim.call_count(name) for name in calls} == calls


def test_a_mapping_whose_undoing_fails_is_kept_counted_and_given_back_later():
    """cuMemSetAccess fails, and so does the cuMemUnmap that undoes the mapping: the page
    is still mapped in the driver. aimdo reports both, counts the memory, gives it back
    before mapping that page again, and leaves nothing behind at close."""
    sim = aimdo.SimBackend("1x1GiB")
    manager = manager_on(sim)
    vbar = manager.create_vbar(4 * PAGE, 0)
    allocation = vbar.alloc(PAGE)
    sim.fail("cuMemSetAccess", error="error")
    sim.fail("cuMemUnmap", error="error", count=100)
    with pytest.raises(aimdo.DriverError, match="giving the page back failed too") as raised:
        vbar.fault(allocation)
    assert raised.value.operation == "cuMemSetAccess"
    assert residency(vbar) == "...."
    assert manager.resident_bytes(0) == PAGE == sim.physical_bytes(0)
    with pytest.raises(aimdo.DriverError):
        vbar.fault(allocation)  # the old mapping is still there: reported, not hidden
    sim.clear_failures()
    assert vbar.fault(allocation) is not None
    vbar.unpin(allocation)
    assert residency(vbar) == "R..."
    assert manager.resident_bytes(0) == PAGE == sim.physical_bytes(0)
    manager.close()
    assert sim.leaks() == []


def test_memory_the_driver_would_not_release_stays_counted_and_is_released_later():
    sim = aimdo.SimBackend("1x1GiB")
    manager, vbar = closable(sim)
    sim.fail("cuMemRelease", error="error", count=2)  # both attempts of one release
    with pytest.raises(aimdo.DriverError) as raised:
        vbar.free_memory(PAGE)
    assert raised.value.operation == "cuMemRelease"
    assert residency(vbar) == "R..."
    assert manager.resident_bytes(0) == 2 * PAGE == sim.physical_bytes(0)
    # The next eviction for a deficit gives it back first.
    assert manager.reclaim(0, 1 << 30) >= PAGE
    assert manager.resident_bytes(0) == sim.physical_bytes(0)
    manager.close()
    assert sim.leaks() == []


def test_an_external_allocation_whose_free_failed_at_close_can_still_be_freed():
    sim = aimdo.SimBackend("1x1GiB")
    manager = manager_on(sim)
    ptr = manager.external_alloc(0, PAGE)
    sim.fail("cuMemFreeAsync", error="error", count=100)
    with pytest.raises(aimdo.DriverError):
        manager.close()
    sim.clear_failures()
    manager.external_free(ptr)
    assert manager.external_bytes(0) == 0
    manager.close()
    assert sim.leaks() == []


def test_a_vbar_dropped_after_the_exit_flag_leaves_no_dangling_entry():
    """After aimdo's exit flag is set (atexit), a VBAR's destructor makes no driver call,
    but it still leaves its device's priority list: a thread that faults or evicts later
    must not walk a freed VBAR. Run in a child process: the flag is process-wide."""
    import subprocess
    import sys

    script = """
import gc, aimdo
from aimdo import _core
sim = aimdo.SimBackend("1x1GiB")
manager = aimdo.Manager(sim, [0], page_size=2 << 20, headroom=0, vram_limit=8 << 20)
keep = manager.create_vbar(8 << 20, 0)
drop = manager.create_vbar(8 << 20, 0)
_core.set_process_exiting()
del drop
gc.collect()
assert manager.vbar_count(0) == 1, manager.vbar_count(0)
weights = [keep.alloc(2 << 20) for _ in range(4)]
for weight in weights:
    assert keep.fault(weight) is not None
    keep.unpin(weight)
assert manager.reclaim(0, 8 << 20) == 8 << 20
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ok", done.stdout


def test_a_free_on_one_device_does_not_wait_for_another_device():
    sim = aimdo.SimBackend("2x1GiB")
    with manager_on(sim) as manager:
        zero = manager.create_vbar(4 * PAGE, 0)
        allocation = zero.alloc(2 * PAGE)
        zero.fault(allocation)
        zero.unpin(allocation)
        ptr = manager.external_alloc(1, PAGE)
        with sim.hold("cuCtxSynchronize", device=0) as held:
            busy = threading.Thread(target=lambda: zero.free_memory(2 * PAGE), daemon=True)
            busy.start()
            assert held.wait_arrived(60)
            done = threading.Event()
            freeing = threading.Thread(
                target=lambda: (manager.external_free(ptr), done.set()), daemon=True
            )
            freeing.start()
            assert done.wait(60), "the free on device 1 waited for device 0"
            assert busy.is_alive()
        busy.join(60)
        assert manager.external_bytes(1) == 0
