"""design.md §4 under concurrency: one lock per device, no global lock, the right context.

The stress test's seed is printed on failure; rerun it with AIMDO_STRESS_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import threading

import aimdo
import pytest
from conftest import PAGE, residency

MiB = 1 << 20


def run_threads(targets, timeout=120.0):
    """Run each callable in its own thread; return the exceptions they raised. A thread
    still running after `timeout` seconds of real time is reported as hung."""
    failures = []

    def wrap(target):
        try:
            target()
        except BaseException as error:  # collected and reported by the test
            failures.append(error)

    threads = [threading.Thread(target=wrap, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    hung = [thread for thread in threads if thread.is_alive()]
    if hung:
        failures.append(TimeoutError(f"{len(hung)} thread(s) still running after {timeout} s"))
    return failures


@pytest.mark.sim_only
def test_stress_eight_devices_sixteen_threads_keep_per_device_invariants():
    seed = int(os.environ.get("AIMDO_STRESS_SEED", random.randrange(1 << 30)))
    sim = aimdo.SimBackend("8x256MiB", seed=seed)
    limits = {d: (24 + d) * PAGE for d in range(8)}
    manager = aimdo.Manager(
        sim, list(range(8)), vram_limit=limits, headroom=PAGE, page_size=PAGE, poll_interval=0
    )
    kept = []
    external = [[0] * 8 for _ in range(16)]
    counts = {"ops": 0, "offloaded": 0, "oom": 0}
    count_lock = threading.Lock()

    def worker(index):
        rng = random.Random(seed * 1009 + index)
        vbars = []  # (vbar, allocations, pins)
        for _ in range(400):
            device = rng.randrange(8)
            choice = rng.randrange(100)
            with count_lock:
                counts["ops"] += 1
            try:
                if not vbars or choice < 5:
                    vbar = manager.create_vbar(
                        rng.randrange(4, 24) * PAGE + rng.randrange(PAGE), device
                    )
                    allocations = []
                    for _ in range(rng.randrange(1, 10)):
                        try:
                            allocations.append(vbar.alloc(rng.randrange(1, 3 * PAGE)))
                        except ValueError:
                            break
                    vbars.append((vbar, allocations, [0] * len(allocations)))
                    continue
                vbar, allocations, pins = rng.choice(vbars)
                a = rng.randrange(len(allocations))
                if choice < 45:
                    if vbar.fault(allocations[a]) is None:
                        with count_lock:
                            counts["offloaded"] += 1
                    else:
                        pins[a] += 1
                elif choice < 75:
                    if pins[a]:
                        vbar.unpin(allocations[a])
                        pins[a] -= 1
                elif choice < 79:
                    vbar.prioritize()
                elif choice < 82:
                    vbar.deprioritize()
                elif choice < 85:
                    vbar.set_watermark(rng.randrange(vbar.page_count + 1) * PAGE)
                elif choice < 88:
                    vbar.free_memory(rng.randrange(6) * PAGE)
                elif choice < 91:
                    manager.reclaim(device, rng.randrange(8) * PAGE)
                elif choice < 94:
                    for i, n in enumerate(pins):
                        for _ in range(n):
                            vbar.unpin(allocations[i])
                        pins[i] = 0
                    vbar.close()
                    vbars.remove((vbar, allocations, pins))
                elif choice < 97:
                    nbytes = rng.randrange(1, 5) * PAGE
                    try:
                        sim.add_external_usage(device, nbytes)
                        external[index][device] += nbytes
                    except ValueError:
                        pass  # the device is full
                else:
                    sim.remove_external_usage(device, external[index][device])
                    external[index][device] = 0
            except aimdo.OutOfMemoryError:
                with count_lock:
                    counts["oom"] += 1
        for vbar, allocations, pins in vbars:
            for i, n in enumerate(pins):
                for _ in range(n):
                    vbar.unpin(allocations[i])
        for device in range(8):
            sim.remove_external_usage(device, external[index][device])
        kept.extend(vbar for vbar, _, _ in vbars)

    failures = run_threads([lambda i=i: worker(i) for i in range(16)])
    assert failures == [], f"seed {seed}: {failures!r}"
    for device in range(8):
        held = sum(v.loaded_bytes for v in kept if v.device == device and not v.closed)
        assert manager.resident_bytes(device) == held, f"seed {seed}, device {device}"
        assert sim.physical_bytes(device) == held, f"seed {seed}, device {device}"
        assert manager.usage_bytes(device) == held, f"seed {seed}, device {device}"
        assert sim.external_usage(device) == 0
        assert all("P" not in residency(v) for v in kept if v.device == device and not v.closed)
    assert counts["ops"] == 16 * 400
    manager.close()
    assert sim.leaks() == [], f"seed {seed}"


@pytest.mark.sim_only
def test_faults_on_one_device_complete_while_another_is_held_inside_an_eviction():
    """No global lock: device 0 is stopped inside an eviction (its synchronize is held
    open, with device 0's lock taken), and device 1 still faults, evicts and unpins."""
    sim = aimdo.SimBackend("2x1GiB")
    with aimdo.Manager(
        sim, [0, 1], vram_limit=4 * PAGE, headroom=0, page_size=PAGE, poll_interval=1e9
    ) as manager:
        zero = manager.create_vbar(8 * PAGE, device=0)
        zero_pages = [zero.alloc(PAGE) for _ in range(8)]
        for allocation in zero_pages[:4]:
            zero.fault(allocation)
            zero.unpin(allocation)
        # Device 1: a full budget of a lower-priority VBAR, which a newer one evicts.
        older = manager.create_vbar(8 * PAGE, device=1)
        for allocation in [older.alloc(PAGE) for _ in range(4)]:
            older.fault(allocation)
            older.unpin(allocation)
        one = manager.create_vbar(8 * PAGE, device=1)
        one_pages = [one.alloc(PAGE) for _ in range(8)]
        with sim.hold("cuCtxSynchronize", device=0) as held:
            evicting = threading.Thread(target=lambda: zero.free_memory(2 * PAGE), daemon=True)
            evicting.start()
            assert held.wait_arrived(timeout=60), "the eviction never reached its synchronize"
            done = []

            def drive_device_one():
                for allocation in one_pages:  # each of the first 4 evicts a page of `older`
                    if one.fault(allocation) is not None:
                        one.unpin(allocation)
                done.append((manager.resident_bytes(1), manager.stats(1)["evicted_bytes"]))

            failures = run_threads([drive_device_one], timeout=60)
            assert failures == []
            assert done == [(4 * PAGE, 4 * PAGE)]
            assert evicting.is_alive()  # device 0 is still held
        evicting.join(60)
        assert not evicting.is_alive()
        assert residency(zero) == "RR......"
        assert (residency(older), residency(one)) == ("........", "RRRR....")


@pytest.mark.sim_only
def test_an_eviction_from_a_thread_without_context_targets_the_owning_device():
    sim = aimdo.SimBackend("2x1GiB")
    with aimdo.Manager(
        sim, [0, 1], vram_limit=8 * PAGE, headroom=0, page_size=PAGE, poll_interval=1e9
    ) as manager:
        one = manager.create_vbar(8 * PAGE, device=1)
        pages = [one.alloc(PAGE) for _ in range(4)]
        for allocation in pages:
            one.fault(allocation)
            one.unpin(allocation)
        before = {d: sim.call_count("cuCtxSynchronize", d) for d in (0, 1)}
        seen = {}

        def foreign():  # like a garbage-collector callback: no context current
            seen["before"] = sim.driver.current_device()
            seen["freed"] = one.free_memory(2 * PAGE)
            seen["reclaimed"] = manager.reclaim(1, 8 * PAGE)
            seen["after"] = sim.driver.current_device()

        assert run_threads([foreign]) == []
        assert seen == {"before": -1, "freed": 2 * PAGE, "reclaimed": 2 * PAGE, "after": -1}
        assert sim.call_count("cuCtxSynchronize", 1) == before[1] + 2
        assert sim.call_count("cuCtxSynchronize", 0) == before[0]
        assert sim.physical_bytes(0) == 0 and sim.physical_bytes(1) == 0


def test_a_vbar_closed_by_dropping_it_on_another_thread_releases_on_its_device(make_manager):
    import gc

    manager = make_manager(pages=8, devices=(0, 1))
    holder = {"vbar": manager.create_vbar(8 * PAGE, device=1)}
    allocation = holder["vbar"].alloc(3 * PAGE)
    assert holder["vbar"].fault(allocation) is not None
    holder["vbar"].unpin(allocation)
    del allocation

    def drop():
        holder.clear()
        gc.collect()

    assert run_threads([drop]) == []
    assert manager.resident_bytes(1) == 0
    assert manager.vbar_count(1) == 0
    assert manager.resident_bytes(0) == 0


def test_two_python_threads_drive_two_devices_at_once(make_manager):
    """Each thread faults its own device's pages; every call releases the GIL."""
    manager = make_manager(pages=8, devices=(0, 1))
    vbars = [manager.create_vbar(16 * PAGE, device=d) for d in (0, 1)]
    barrier = threading.Barrier(2)

    def drive(vbar):
        allocations = [vbar.alloc(PAGE) for _ in range(16)]
        barrier.wait()
        for _ in range(50):
            vbar.prioritize()
            for allocation in allocations:
                if vbar.fault(allocation) is not None:
                    vbar.unpin(allocation)

    assert run_threads([lambda v=v: drive(v) for v in vbars]) == []
    assert [residency(v) for v in vbars] == ["RRRRRRRR........"] * 2
