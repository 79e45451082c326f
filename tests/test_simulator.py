"""design.md §5: the simulator's powers, and aimdo under them.

Every test here needs a simulator-only power and is marked sim_only. Seeds are part of
each test's name or printed in its assertion messages.
"""

from __future__ import annotations

import os
import random
import re

import aimdo
import pytest

pytestmark = pytest.mark.sim_only

MiB = 1 << 20
PAGE = 2 * MiB
US = 1e-6


def scenario(seed: int, *, fail=None, record=True):
    """A scripted two-device run: two VBARs per device, faults past the budget, pins,
    an outside allocation and its free, external usage, a close. Returns the simulator,
    the error raised (if any) and the manager's per-device figures before it closed.
    `fail(sim)` arms failures before the run."""
    sim = aimdo.SimBackend("2x256MiB", seed=seed, record=record)
    if fail is not None:
        fail(sim)
    figures = None
    error = None
    manager = aimdo.Manager(
        sim, [0, 1], vram_limit=10 * PAGE, headroom=PAGE, page_size=PAGE, poll_interval=0
    )
    try:
        vbars = [manager.create_vbar(8 * PAGE, d) for d in (0, 1) for _ in range(2)]
        for step in range(3):
            for vbar in vbars:
                if step:
                    vbar.prioritize()
                allocations = [vbar.alloc(PAGE + 4096) for _ in range(2)] if step == 0 else []
                for allocation in allocations:
                    if vbar.fault(allocation) is not None:
                        vbar.unpin(allocation)
            ptr = manager.external_alloc(step % 2, 2 * PAGE)
            sim.add_external_usage(1 - step % 2, PAGE)
            manager.external_free(ptr)
            sim.remove_external_usage(1 - step % 2, PAGE)
        vbars[0].free_memory(3 * PAGE)
        manager.reclaim(1, 4 * PAGE)
        vbars[3].close()
    except aimdo.AimdoError as caught:
        error = caught
    finally:
        figures = {
            d: (manager.resident_bytes(d), sim.physical_bytes(d), manager.usage_bytes(d))
            for d in (0, 1)
        }
        try:
            manager.close()
        except aimdo.AimdoError as caught:
            error = error or caught
    return sim, error, figures


def test_the_same_seed_and_calls_give_the_same_log_byte_for_byte():
    first, error, _ = scenario(11, fail=lambda s: s.fail_rate("cuMemCreate", 0.2))
    second, error_again, _ = scenario(11, fail=lambda s: s.fail_rate("cuMemCreate", 0.2))
    assert first.log() == second.log()
    assert repr(error) == repr(error_again)
    assert first.log().count("\n") > 100
    assert "CUDA_ERROR_OUT_OF_MEMORY" in first.log()  # the rate did inject failures
    other, _, _ = scenario(12, fail=lambda s: s.fail_rate("cuMemCreate", 0.2))
    assert other.log() != first.log()  # the seed drives the rate


def test_a_replay_reproduces_the_log_and_notices_a_changed_line():
    sim, _, _ = scenario(5, fail=lambda s: s.fail_rate("cuMemCreate", 0.2))
    log = sim.log()
    assert sim.replay(log) == []
    changed = re.sub(r"free=(\d+)", lambda m: f"free={int(m.group(1)) + 1}", log, count=1)
    differences = sim.replay(changed)
    assert len(differences) == 1
    assert "free=" in differences[0]


def test_driver_operations_cost_their_calibrated_time_on_their_own_device():
    sim = aimdo.SimBackend("2x1GiB")
    with aimdo.Manager(sim, [0, 1], headroom=0, page_size=PAGE, poll_interval=1e9) as manager:
        vbar = manager.create_vbar(4 * PAGE, 0)
        allocation = vbar.alloc(PAGE)
        assert vbar.fault(allocation) is not None  # polls once, then maps a page
        before = sim.now(0)
        vbar.unpin(allocation)
        second = vbar.alloc(PAGE)
        assert vbar.fault(second) is not None
        # cuMemCreate 20 us + cuMemMap 4 us + cuMemSetAccess 50 us (docs/measurements.md)
        assert sim.now(0) - before == pytest.approx(74 * US, abs=1e-12)
        assert sim.now(1) == 0.0
        vbar.unpin(second)


def test_declared_copies_and_compute_move_the_device_clock_and_synchronize_the_host():
    sim = aimdo.SimBackend([{"capacity": "1GiB", "bandwidth": 25e9}, "1GiB"])
    sim.copy_to_device(0, 50 * 10**6)  # 2 ms at 25 GB/s
    sim.compute(0, 0.003)
    assert sim.now(0) == pytest.approx(0.005)
    assert sim.now(1) == 0.0
    sim.copy_to_device(1, 50 * 10**6)  # the default 50 GB/s: 1 ms
    assert sim.now(1) == pytest.approx(0.001)
    assert sim.now() == 0.0  # the host has not waited for anything yet
    with aimdo.Manager(sim, [0], poll_interval=1e9) as manager:
        vbar = manager.create_vbar(PAGE, 0)
        vbar.free_memory(PAGE)  # nothing resident: no synchronize
        assert sim.now() == 0.0
        vbar.prioritize()  # free_memory lowered the watermark
        allocation = vbar.alloc(PAGE)
        assert vbar.fault(allocation) is not None
        vbar.unpin(allocation)
        vbar.set_watermark(0)  # releases the page: synchronizes device 0 first
        assert sim.now() == pytest.approx(sim.now(0) - (27 + 44) * US)


def test_driver_costs_can_be_calibrated_by_name():
    sim = aimdo.SimBackend(["1GiB"], costs={"cuMemCreate": 14.4 * US, "cuMemSetAccess": 32.8 * US})
    with aimdo.Manager(sim, [0], headroom=0, page_size=PAGE, poll_interval=1e9) as manager:
        vbar = manager.create_vbar(4 * PAGE, 0)
        first, second = vbar.alloc(PAGE), vbar.alloc(PAGE)
        assert vbar.fault(first) is not None
        before = sim.now(0)
        assert vbar.fault(second) is not None
        # 14.4 us + the default cuMemMap 4 us + 32.8 us
        assert sim.now(0) - before == pytest.approx(51.2 * US, abs=1e-12)
        vbar.unpin(first)
        vbar.unpin(second)
    with pytest.raises(ValueError, match="cuMemCreat"):
        aimdo.SimBackend(["1GiB"], costs={"cuMemCreat": US})
    with pytest.raises(ValueError, match="negative"):
        aimdo.SimBackend(["1GiB"], costs={"cuMemMap": -US})
    with pytest.raises(TypeError):
        aimdo.SimBackend(["1GiB"], costs=[("cuMemMap", US)])


def test_the_copy_engine_overlaps_compute_and_waits_only_for_what_it_is_given():
    sim = aimdo.SimBackend([{"capacity": "1GiB", "bandwidth": 25e9}, "1GiB"], record=True)
    ms = 0.001
    first = sim.copy_async(0, 50 * 10**6)  # 2 ms at 25 GB/s, from 0
    assert first == pytest.approx(2 * ms)
    assert sim.compute_async(0, 3 * ms) == pytest.approx(3 * ms)  # beside the copy
    second = sim.copy_async(0, 25 * 10**6)  # after the first copy: 2..3 ms
    assert second == pytest.approx(3 * ms)
    third = sim.copy_async(0, 25 * 10**6, after=5 * ms)  # waits for an event at 5 ms
    assert third == pytest.approx(6 * ms)
    # Compute waits for the copy it reads, after the compute queued before it.
    assert sim.compute_async(0, 1 * ms, after=second) == pytest.approx(4 * ms)
    assert sim.compute_async(0, 1 * ms, after=third) == pytest.approx(7 * ms)
    assert sim.now(0) == pytest.approx(7 * ms)
    assert sim.copy_engine_now(0) == pytest.approx(6 * ms)
    assert (sim.now(1), sim.copy_engine_now(1)) == (0.0, 0.0)  # the other device is idle
    sim.copy_async(0, 100 * 10**6)  # 6..10 ms: the host's synchronize waits for it too
    with aimdo.Manager(sim, [0], headroom=0, page_size=PAGE, poll_interval=1e9) as manager:
        vbar = manager.create_vbar(PAGE, 0)
        allocation = vbar.alloc(PAGE)
        assert vbar.fault(allocation) is not None
        vbar.unpin(allocation)
        vbar.set_watermark(0)  # releases the page: synchronizes device 0 first
        assert sim.now() >= 10 * ms
        assert sim.now(0) >= 10 * ms  # nothing runs on the device before the synchronize
    assert sim.replay(sim.log()) == []
    with pytest.raises(ValueError):
        sim.compute_async(0, -1.0)
    with pytest.raises(ValueError):
        sim.copy_async(0, 1, after=float("nan"))
    with pytest.raises(TypeError):
        sim.copy_async(0, True)


def test_a_lagging_free_is_not_counted_as_free_until_the_driver_has_it_back():
    """aimdo's accounting says the freed bytes are free at once; the driver gets them back
    only after the delay. aimdo must not map into them (no out-of-memory, no retry)."""
    sim = aimdo.SimBackend([16 * PAGE], free_delay=1.0)
    with aimdo.Manager(sim, [0], headroom=0, page_size=PAGE, poll_interval=10.0) as manager:
        vbar = manager.create_vbar(16 * PAGE, 0)
        pages = [vbar.alloc(PAGE) for _ in range(16)]
        for allocation in pages[:10]:
            assert vbar.fault(allocation) is not None
            vbar.unpin(allocation)
        ptr = manager.external_alloc(0, 6 * PAGE)
        manager.external_free(ptr)
        assert manager.usage_bytes(0) == 10 * PAGE  # accounting: 6 pages free again
        assert sim.pending_free_bytes(0) == 6 * PAGE  # the driver: not yet
        other = manager.create_vbar(6 * PAGE, 0)
        for allocation in [other.alloc(PAGE) for _ in range(6)]:
            assert other.fault(allocation) is not None
            other.unpin(allocation)
        assert manager.stats(0)["oom_retries"] == 0
        assert manager.stats(0)["evicted_bytes"] == 6 * PAGE
        assert sim.used_bytes(0) <= 16 * PAGE
        sim.advance(1.0)
        assert sim.pending_free_bytes(0) == 0


def test_external_usage_between_polls_is_noticed_within_one_interval_on_that_device_only():
    sim = aimdo.SimBackend("2x1GiB")
    with aimdo.Manager(
        sim, [0, 1], vram_limit=8 * PAGE, headroom=0, page_size=PAGE, poll_interval=1.0
    ) as manager:
        vbars = [manager.create_vbar(8 * PAGE, d) for d in (0, 1)]
        for vbar in vbars:
            for allocation in [vbar.alloc(PAGE) for _ in range(8)]:
                vbar.fault(allocation)
                vbar.unpin(allocation)
        sim.add_external_usage(0, 3 * PAGE)  # another process, between two polls
        sim.compute(0, 0.6)
        assert manager.reclaim(0, 0) == 0  # not seen yet: 0.6 s since the poll
        sim.compute(0, 0.4)  # one interval has passed on device 0's clock
        assert manager.reclaim(0, 0) == 3 * PAGE
        assert manager.resident_bytes(0) == 5 * PAGE
        assert manager.resident_bytes(1) == 8 * PAGE
        assert manager.stats(1)["evicted_bytes"] == 0
        sim.remove_external_usage(0, 3 * PAGE)


def _clean_calls(seed):
    sim, error, _ = scenario(seed)
    assert error is None, error
    calls = []
    seen = {}
    for line in sim.log().splitlines():
        if line.startswith("@"):
            continue
        name = line.split()[0]
        device = re.search(r" dev=(-?\d+)", line)
        va = re.search(r" (?:va|ptr)=[rs](\d+)\+", line)
        handle = re.search(r" handle=0x(\w+)", line)
        if device:
            d = int(device.group(1))
        elif va:
            d = int(va.group(1))
        else:
            d = (int(handle.group(1), 16) >> 48) - 1
        skip = seen.get((name, d), 0)
        seen[(name, d)] = skip + 1
        calls.append((name, d, skip))
    return calls


@pytest.mark.parametrize("kind", ["out_of_memory", "not_ready", "error"])
def test_a_failure_at_every_driver_call_in_turn_leaves_every_invariant(kind):
    """Inject one failure at each driver call of a scripted two-device run, in turn.
    Whatever aimdo raises is typed and flagged injected; afterwards aimdo's accounting
    equals the simulator's physical memory on each device, and nothing leaks."""
    seed = int(os.environ.get("AIMDO_SWEEP_SEED", "3"))
    calls = _clean_calls(seed)
    assert len(calls) > 150
    for index, (name, device, skip) in enumerate(calls):

        def arm(sim, name=name, device=device, skip=skip):
            sim.fail(name, device=device, error=kind, skip=skip, count=1)

        sim, error, figures = scenario(seed, fail=arm, record=False)
        where = f"seed {seed}, call {index} ({name} on device {device}, #{skip}), {kind}"
        if error is not None:
            assert isinstance(error, (aimdo.OutOfMemoryError, aimdo.DriverError)), where
            assert error.injected is True, f"{where}: {error!r}"
        if kind == "not_ready":
            assert error is None, f"{where}: a transient failure must be retried: {error!r}"
        for d, (resident, physical, _usage) in figures.items():
            assert resident == physical, f"{where}: device {d} accounts {resident}, has {physical}"
        assert sim.leaks() == [], where


def test_accounting_mode_simulates_eight_80_gb_devices_in_a_few_megabytes():
    def rss_bytes():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss_bytes()
    sim = aimdo.SimBackend("8x80GB")
    with aimdo.Manager(sim, list(range(8)), page_size=32 * MiB, poll_interval=1e9) as manager:
        total_pages = 0
        for device in range(8):
            vbar = manager.create_vbar(80 * 10**9, device)
            for allocation in [vbar.alloc(32 * MiB) for _ in range(vbar.size // (32 * MiB))]:
                if vbar.fault(allocation) is not None:
                    vbar.unpin(allocation)
            total_pages += manager.resident_bytes(device) // (32 * MiB)
            assert manager.resident_bytes(device) > 70 * 10**9
        grown = rss_bytes() - before
    assert total_pages > 8 * 2000
    assert grown < 16 * MiB, f"{grown / MiB:.1f} MiB for {total_pages} resident pages"


# The simulator's clocks count int64 nanoseconds from 0: they end after about 292 years.
END_NS = (1 << 63) - 1


def test_advancing_a_clock_past_the_end_of_virtual_time_is_refused_and_moves_nothing():
    sim = aimdo.SimBackend("2x1GiB", record=True)
    sim.advance(9e9, device=0)  # 9e18 ns: about 285 years, 2.2e17 ns before the end
    logged = sim.log()
    refused = r"device 0.*9000000000000000000 ns.*300000000000000000 ns"  # where, now, amount
    with pytest.raises(ValueError, match=refused):
        sim.advance(3e8, device=0)
    assert (sim.now(0), sim.now(1), sim.now()) == (9e9, 0.0, 0.0)
    # Every clock moves or none does: device 1 and the host could take it, device 0 cannot.
    with pytest.raises(ValueError, match="device 0"):
        sim.advance(3e8)
    assert (sim.now(0), sim.now(1), sim.now()) == (9e9, 0.0, 0.0)
    assert sim.log() == logged  # a refused call is not in the log: its replay stays exact
    sim.advance(2e8, device=0)  # up to the end is fine
    assert sim.now(0) == pytest.approx(9.2e9)
    assert sim.replay(sim.log()) == []


def test_declared_compute_and_copies_past_the_end_of_virtual_time_are_refused():
    sim = aimdo.SimBackend([{"capacity": "1GiB", "bandwidth": 1.0}] * 2)  # 1 byte/s
    sim.compute(0, 9e9)
    sim.copy_async(0, 9 * 10**9)  # 9e9 s on the copy engine
    clocks = (sim.now(0), sim.copy_engine_now(0))
    with pytest.raises(ValueError, match="device 0"):
        sim.compute(0, 3e8)
    with pytest.raises(ValueError, match="device 0"):
        sim.compute_async(0, 3e8)
    with pytest.raises(ValueError, match="device 1"):
        sim.compute_async(1, 3e8, after=9e9)  # an idle engine, but it waits until 9e9 s
    with pytest.raises(ValueError, match="device 0"):
        sim.copy_to_device(0, 3 * 10**8)  # 3e8 s at 1 byte/s
    with pytest.raises(ValueError, match="device 0"):
        sim.copy_async(0, 3 * 10**8)
    with pytest.raises(ValueError, match="device 1"):
        sim.copy_async(1, 1 << 62)  # the copy alone takes longer than virtual time lasts
    assert (sim.now(0), sim.copy_engine_now(0)) == clocks
    assert (sim.now(1), sim.copy_engine_now(1)) == (0.0, 0.0)


@pytest.mark.parametrize(
    "seconds",
    [1e300, float("inf"), float("nan"), -1e-9, 1e10, 10**400],
    ids=["1e300", "inf", "nan", "negative", "past-the-end", "int-beyond-float"],
)
def test_seconds_out_of_the_clocks_range_are_a_value_error(seconds):
    sim = aimdo.SimBackend("2x1GiB")

    def wait_arrived():
        with sim.hold("cuMemMap", 0) as held:
            held.wait_arrived(timeout=seconds)

    calls = {
        "advance": lambda: sim.advance(seconds),
        "compute": lambda: sim.compute(0, seconds),
        "compute_async": lambda: sim.compute_async(0, seconds),
        "compute_async after": lambda: sim.compute_async(0, 0.0, after=seconds),
        "copy_async after": lambda: sim.copy_async(0, 1, after=seconds),
        "free_delay": lambda: aimdo.SimBackend("1GiB", free_delay=seconds),
        "costs": lambda: aimdo.SimBackend("1GiB", costs={"cuMemMap": seconds}),
        "wait_arrived": wait_arrived,
    }
    for name, call in calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"{name}({seconds!r}) was accepted")
    assert (sim.now(0), sim.copy_engine_now(0), sim.now()) == (0.0, 0.0, 0.0)


def test_driver_call_costs_stop_at_the_end_of_virtual_time_instead_of_wrapping():
    """A driver call cannot refuse to cost time (the real driver would not fail), so its
    cost takes the clock to the end of virtual time and no further."""
    sim = aimdo.SimBackend(["1GiB"], costs={"cuMemGetInfo": 5e9})
    driver = sim.driver
    assert driver.raw_make_current(0)[0] == 0
    assert driver.raw_memory_info(0)[0] == 0
    assert driver.raw_memory_info(0)[0] == 0  # 1e19 ns: past the end
    assert driver.now_ns(0) == END_NS
    assert driver.raw_synchronize(0)[0] == 0
    assert driver.now_ns(0) == END_NS
    assert driver.host_now_ns() == END_NS
    with pytest.raises(ValueError, match="device 0"):
        sim.advance(1e-9, device=0)


def test_a_free_delay_past_the_end_of_virtual_time_never_gives_the_memory_back():
    sim = aimdo.SimBackend([16 * PAGE], free_delay=9e9)
    sim.advance(9e9, device=0)
    with aimdo.Manager(sim, [0], headroom=0, page_size=PAGE, poll_interval=1e9) as manager:
        manager.external_free(manager.external_alloc(0, PAGE))
        # Due after the end of virtual time: still pending, not wrapped round to the past.
        assert sim.pending_free_bytes(0) == PAGE


def _log_of_every_kind(seed: int = 3) -> tuple[aimdo.SimBackend, str]:
    """A recorded run with a line of every kind the simulator writes: the scenario's
    driver calls, one failing, then each simulator power."""
    sim, error, _ = scenario(seed)
    assert error is None, error
    sim.fail("cuMemCreate", device=0, skip=0, count=1)
    assert sim.driver.raw_create(0, PAGE)[1] == "CUDA_ERROR_OUT_OF_MEMORY"
    sim.fail_rate("cuMemMap", 0.5, device=1, error="not_ready")
    sim.clear_failures()
    sim.add_external_usage(0, PAGE)
    sim.remove_external_usage(0, PAGE)
    sim.advance(0.5)
    sim.advance(0.25, device=1)
    sim.compute(0, 0.001)
    sim.copy_to_device(1, 10**6)
    done = sim.copy_async(0, 10**6, after=0.75)
    sim.compute_async(0, 0.002, after=done)
    return sim, sim.log()


def test_a_log_with_every_kind_of_line_replays_exactly():
    sim, log = _log_of_every_kind()
    kinds = {line.split()[0] for line in log.splitlines()}
    assert kinds >= {
        "cuMemAddressReserve",
        "cuMemCreate",
        "cuMemMap",
        "cuMemSetAccess",
        "cuMemUnmap",
        "cuMemRelease",
        "cuMemAddressFree",
        "cuMemGetInfo",
        "cuCtxSynchronize",
        "cuMemAllocAsync",
        "cuMemFreeAsync",
        "cuCtxSetCurrent",
        "@fail",
        "@fail_rate",
        "@clear_failures",
        "@add_external_usage",
        "@remove_external_usage",
        "@advance",
        "@compute",
        "@copy_to_device",
        "@copy_async",
        "@compute_async",
    }, kinds
    assert sim.replay(log) == []
    # Blank lines (whitespace only too) are skipped; differences name the log's own lines.
    assert sim.replay("\n  \n\t\n" + log) == []
    changed = "\n" + re.sub(r"free=(\d+)", lambda m: f"free={int(m.group(1)) + 1}", log, count=1)
    number = changed[: changed.index(" free=")].count("\n") + 1
    [difference] = sim.replay(changed)
    assert difference.startswith(f"line {number}: "), difference


def assert_names_a_line(error: ValueError, log: str, context: str = "") -> None:
    """The message says 'line N' and quotes line N of `log` (or its start, if long)."""
    message = str(error)
    found = re.search(r"\bline (\d+)\b", message)
    assert found, f"{context}: {message!r} names no line"
    lines = log.split("\n")
    number = int(found.group(1))
    assert 1 <= number <= len(lines), f"{context}: {message!r} names a line the log lacks"
    assert lines[number - 1].strip()[:60] in message, (
        f"{context}: {message!r} does not quote line {number}: {lines[number - 1]!r}"
    )


START = "cuCtxSetCurrent dev=0 -> CUDA_SUCCESS\n"  # a valid first line: the bad one is line 2
MAP = "va=r0+0x0 size=2097152 handle=0x1000000000001"


@pytest.mark.parametrize(
    "line",
    [
        # truncated, missing or extra fields
        "cuMemGetInfo",
        "cuMemGetInfo dev=0 cur=0",
        "cuMemGetInfo dev=0 -> CUDA_SUCCESS free=1 total=1",
        "cuMemGetInfo cur=0 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=0 cur=0 extra=1 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=0 cur=0 dev=0 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=0 cur=0 junk -> CUDA_SUCCESS",
        "cuMemMap cur=0 " + MAP + " -> CUDA_SUCCESS",
        "cuMemFreeAsync dev=0 cur=0 -> CUDA_SUCCESS",
        "cuMemSetAccess va=r0+0x0 size=2097152 -> CUDA_SUCCESS",
        "cuCtxSetCurrent -> CUDA_SUCCESS",
        "cuMemAddressReserve dev=0 size= 2097152 align=0 -> CUDA_SUCCESS",
        "@advance dev=0",
        "@advance dev=0 ns=5 -> CUDA_SUCCESS",
        "@fail op=cuMemMap dev=0 code=1 skip=0",
        "@compute_async dev=0 ns=1",
        "@clear_failures now",
        "@clear_failures x=1",
        # not numbers, or not in the form the simulator writes them
        "cuMemGetInfo dev= cur=0 -> CUDA_SUCCESS",
        "cuMemGetInfo =0 dev=0 cur=0 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=x cur=0 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=1.5 cur=0 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=0 cur=0x -> CUDA_SUCCESS",
        "cuMemAddressReserve dev=0 size=+2097152 align=0 -> CUDA_SUCCESS",
        "cuMemAddressReserve dev=0 size=2MiB align=0 -> CUDA_SUCCESS",
        "cuMemAllocAsync dev=0 cur=0 size=0x -> CUDA_SUCCESS",
        "cuMemMap va=r0 size=2097152 handle=0x1000000000001 -> CUDA_SUCCESS",
        "cuMemMap va=q0+0x0 size=2097152 handle=0x1000000000001 -> CUDA_SUCCESS",
        "cuMemMap va=r0+0x size=2097152 handle=0x1000000000001 -> CUDA_SUCCESS",
        "cuMemMap va=r+0x0 size=2097152 handle=0x1000000000001 -> CUDA_SUCCESS",
        "cuMemMap va=r0+0x0 size=2097152 handle= -> CUDA_SUCCESS",
        "cuMemMap va=r0+0x0 size=2097152 handle=0x -> CUDA_SUCCESS",
        "cuMemMap va=r0+0x0 size=2097152 handle=0xg -> CUDA_SUCCESS",
        "@fail_rate op=cuMemMap dev=0 code=1 p=abc",
        "@fail_rate op=cuMemMap dev=0 code=1 p=",
        # numbers out of range for their type
        "cuMemAddressReserve dev=0 size=-1 align=0 -> CUDA_ERROR_INVALID_VALUE",
        "cuMemAddressReserve dev=0 size=18446744073709551616 align=0 -> CUDA_SUCCESS",
        "cuMemAddressReserve dev=0 size=99999999999999999999999 align=0 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=4294967296 cur=0 -> CUDA_ERROR_INVALID_DEVICE",
        "cuMemGetInfo dev=-2147483649 cur=0 -> CUDA_ERROR_INVALID_DEVICE",
        "cuMemGetInfo dev=0 cur=7 -> CUDA_SUCCESS",
        "cuMemGetInfo dev=0 cur=-2 -> CUDA_SUCCESS",
        "cuMemRelease handle=-1 -> CUDA_ERROR_INVALID_HANDLE",
        "cuMemRelease handle=0x10000000000000000 -> CUDA_ERROR_INVALID_HANDLE",
        "cuMemMap va=r9+0x0 size=2097152 handle=0x1000000000001 -> CUDA_SUCCESS",
        "cuMemMap va=r0+0x10000000000 size=2097152 handle=0x1000000000001 -> CUDA_SUCCESS",
        "cuMemMap va=r0+0x1000000000000000000 size=2097152 handle=0x1 -> CUDA_SUCCESS",
        "cuMemUnmap va=-0x10 size=2097152 -> CUDA_ERROR_INVALID_VALUE",
        "@advance dev=0 ns=99999999999999999999",
        "@advance dev=0 ns=-5",
        "@advance dev=7 ns=5",
        "@advance dev=0 ns=9223372036854775807\n@advance dev=0 ns=1",
        "@fail op=cuMemMap dev=0 code=99999999999 skip=0 count=1",
        "@fail op=cuMemMap dev=0 code=1 skip=0 count=18446744073709551616",
        "@fail op=cuMemMap dev=0 code=1 skip=0 count=0",
        "@fail op=cuMemMap dev=0 code=0 skip=0 count=1",
        "@fail_rate op=cuMemMap dev=0 code=1 p=1e999",
        "@fail_rate op=cuMemMap dev=0 code=1 p=1e-400",
        "@fail_rate op=cuMemMap dev=0 code=1 p=nan",
        "@fail_rate op=cuMemMap dev=0 code=1 p=2",
        "@add_external_usage dev=0 bytes=99999999999999",
        "@remove_external_usage dev=0 bytes=1",
        "@copy_to_device dev=0 bytes=-1",
        "@copy_async dev=0 bytes=1 after=-1",
        "@compute dev=0 ns=9223372036854775808",
        # names it does not know
        "cuMemFrobnicate dev=0 -> CUDA_SUCCESS",
        "@fail op=cuNothing dev=0 code=1 skip=0 count=1",
        "@fail op= dev=0 code=1 skip=0 count=1",
        "@nothing dev=0",
        "=",
        "-> CUDA_SUCCESS",
    ],
    ids=lambda line: line.replace("\n", " / ")[:60],
)
def test_replay_answers_a_malformed_line_with_a_value_error_naming_it(line):
    sim = aimdo.SimBackend("2x256MiB")
    log = START + line + "\n" + START
    with pytest.raises(ValueError) as caught:
        sim.replay(log)
    assert_names_a_line(caught.value, log, line)
    assert f"line {START.count(chr(10)) + line.count(chr(10)) + 1}" in str(caught.value)


def test_replay_takes_text_and_names_a_line_it_cannot_encode():
    sim = aimdo.SimBackend("2x256MiB")
    with pytest.raises(TypeError):
        sim.replay(b"cuCtxSetCurrent dev=0 -> CUDA_SUCCESS\n")
    log = START + "cuMemGetInfo dev=0 cur=0 -> \ud800\n"
    with pytest.raises(ValueError, match="line 2"):
        sim.replay(log)


_NASTY_VALUES = [
    "",
    "x",
    "-1",
    "-0",
    "+1",
    "0x",
    "0x1g",
    "1.5",
    "nan",
    "inf",
    "1e999",
    "r9+0x0",
    "s0+0x",
    "r0+0x10000000000",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "2147483648",
    "99999999999999999999999",
    "0x1000000000001",
    "cuMemMap",
]
_NASTY_TOKENS = [
    "=",
    "->",
    "x=1",
    "dev=0",
    "cur=-1",
    "@advance",
    "cuMemMap",
    " ",
    "\t",
    "size=0",
    "ns=1",
]


def _mutate(rng, lines: list[str]) -> list[str]:
    """One random change to a log: a token deleted, duplicated, replaced or given a nasty
    value, two tokens swapped, a line cut short, deleted or duplicated."""
    lines = list(lines)
    index = rng.randrange(len(lines))
    tokens = lines[index].split(" ")
    kind = rng.randrange(8)
    at = rng.randrange(len(tokens))
    if kind == 0 and len(tokens) > 1:
        del tokens[at]
    elif kind == 1:
        tokens.insert(at, tokens[at])
    elif kind == 2:
        tokens[at] = rng.choice(_NASTY_TOKENS)
    elif kind == 3 and "=" in tokens[at]:
        key = tokens[at].split("=", 1)[0]
        tokens[at] = key + "=" + rng.choice(_NASTY_VALUES)
    elif kind == 4:
        other = rng.randrange(len(tokens))
        tokens[at], tokens[other] = tokens[other], tokens[at]
    elif kind == 5:
        lines[index] = lines[index][: rng.randrange(len(lines[index]) + 1)]
        return lines
    elif kind == 6:
        del lines[index]
        return lines
    else:
        lines.insert(index, lines[index])
        return lines
    lines[index] = " ".join(tokens)
    return lines


def test_replay_of_randomly_damaged_logs_answers_a_list_or_a_value_error_naming_a_line():
    seed = int(os.environ.get("AIMDO_FUZZ_SEED", "20240610"))
    rng = random.Random(seed)
    sim, log = _log_of_every_kind()
    lines = log.splitlines()
    outcomes = {"replayed": 0, "refused": 0}
    for attempt in range(300):
        damaged = lines
        for _ in range(rng.randrange(1, 4)):
            damaged = _mutate(rng, damaged)
        text = "\n".join(damaged) + "\n"
        where = f"seed {seed}, attempt {attempt}"
        try:
            differences = sim.replay(text)
        except ValueError as error:
            assert_names_a_line(error, text, where)
            outcomes["refused"] += 1
        else:
            assert all(isinstance(d, str) and d.startswith("line ") for d in differences), where
            outcomes["replayed"] += 1
    # Both outcomes happen: the damage is neither always harmless nor always fatal.
    assert min(outcomes.values()) > 20, f"seed {seed}: {outcomes}"
