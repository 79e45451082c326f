"""Record on any backend, replay on the simulator: aimdo.sim.Recording wraps the backend
under test (AIMDO_BACKEND: the simulator, or real GPUs), a scripted aimdo run goes through
it, and its log replays on a fresh simulator with no difference.

On cuda the replay translates the GPU's addresses and handles into the simulator's and
compares answer codes; the free memory the GPU reported is printed as notes. Tests that
forge a log need no GPU and run on the simulator only.
"""

from __future__ import annotations

import os
import random
import re

import aimdo
import pytest
from aimdo.sim import Recording, SimBackend
from conftest import BACKEND, PAGE
from test_simulator import _mutate as mutate
from test_simulator import assert_names_a_line

CALLS = {
    "cuCtxSetCurrent",
    "cuMemGetInfo",
    "cuMemAddressReserve",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuCtxSynchronize",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemAddressFree",
}


def backend_under_test():
    if BACKEND == "sim":
        return SimBackend("2x1GiB")
    try:
        return aimdo.CudaBackend()
    except aimdo.DriverError as error:
        pytest.skip(f"no usable CUDA driver: {error}")


def scripted_run(backend) -> int:
    """Two VBARs of 6 pages on device 0 with a budget of 4 pages (above what others use):
    faults past the budget evict, each fault is unpinned, one VBAR is closed, then the
    Manager. Returns the bytes evicted."""
    manager = aimdo.Manager(backend, [0], poll_interval=1e9, page_size=PAGE)
    try:
        _, total = manager.memory_info(0)
        others = total - manager.poll(0)["free_bytes"]
        manager.add_devices(
            [0], vram_limit=4 * PAGE + others, headroom=0, poll_interval=1e9, page_size=PAGE
        )
        vbars = [manager.create_vbar(6 * PAGE, 0) for _ in range(2)]
        for vbar in vbars:
            for allocation in [vbar.alloc(PAGE) for _ in range(3)]:
                if vbar.fault(allocation) is not None:
                    vbar.unpin(allocation)
        evicted = manager.stats(0)["evicted_bytes"]
        vbars[0].close()
    finally:
        manager.close()
    return evicted


@pytest.fixture(scope="module")
def recorded() -> str:
    recording = Recording(backend_under_test())
    assert recording.name == BACKEND
    assert scripted_run(recording) >= 2 * PAGE
    return recording.log()


def test_a_recorded_run_replays_on_a_fresh_simulator_without_differences(recorded):
    lines = recorded.splitlines()
    assert lines[0] == f"@recording backend={BACKEND}"
    assert lines[1].startswith("@device dev=0 total=")
    assert CALLS <= {line.split()[0] for line in lines}
    report = SimBackend().replay_report(recorded)
    for note in report.notes:
        print(note)  # the GPU's free memory, which the simulator answers otherwise
    assert report.differences == []
    if BACKEND == "sim":
        assert report.notes == []  # the same backend: reproduced byte for byte


def test_a_changed_answer_is_reported_as_a_difference(recorded):
    lines = recorded.splitlines()
    index = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("cuMemMap ") and line.endswith("-> CUDA_SUCCESS")
    )
    lines[index] = lines[index].replace("-> CUDA_SUCCESS", "-> CUDA_ERROR_OUT_OF_MEMORY")
    [difference] = SimBackend().replay("\n".join(lines) + "\n")
    assert difference.startswith(f"line {index + 1}: logged '{lines[index]}'"), difference


def test_recording_needs_a_backend():
    with pytest.raises(TypeError):
        Recording("cuda")


# --- a log from another machine, forged from the simulator's own ------------------------


def as_if_recorded_elsewhere(log: str) -> str:
    """The log as a GPU would have written it: another backend's name, addresses as raw
    0x-hex far from the simulator's, other handles, less memory free."""
    log = log.replace("@recording backend=sim", "@recording backend=cuda")
    log = re.sub(r"r0\+0x([0-9a-f]+)", lambda m: hex(0x7F3A00000000 + int(m.group(1), 16)), log)
    log = re.sub(
        r"handle=0x([0-9a-f]+)", lambda m: f"handle={int(m.group(1), 16) ^ 0x5A5A:#x}", log
    )
    return re.sub(r"free=(\d+)", lambda m: f"free={int(m.group(1)) - 3 * PAGE}", log)


@pytest.mark.sim_only
def test_another_machines_log_replays_with_its_addresses_and_handles_translated():
    recording = Recording(SimBackend("2x1GiB"))
    scripted_run(recording)
    forged = as_if_recorded_elsewhere(recording.log())
    assert "va=0x7f3a" in forged and "r0+" not in forged
    report = SimBackend().replay_report(forged)
    assert report.differences == []
    assert report.notes and all("cuMemGetInfo free=" in note for note in report.notes)
    # Answers still count: one changed code is one difference.
    changed = re.sub(
        r"(cuMemSetAccess .*) -> CUDA_SUCCESS", r"\1 -> CUDA_ERROR_INVALID_VALUE", forged, count=1
    )
    [difference] = SimBackend().replay(changed)
    assert "logged 'cuMemSetAccess" in difference


@pytest.mark.sim_only
def test_the_simulator_takes_the_recorded_devices_from_the_header():
    recording = Recording(SimBackend([{"capacity": "3GiB", "granularity": "4MiB"}]))
    manager = aimdo.Manager(recording, [0], page_size=4 << 20, poll_interval=1e9)
    vbar = manager.create_vbar(8 << 20, 0)
    allocation = vbar.alloc(4 << 20)
    assert vbar.fault(allocation) is not None
    vbar.unpin(allocation)
    manager.close()
    log = recording.log()
    assert "@device dev=0 total=3221225472 granularity=4194304 integrated=0" in log
    assert SimBackend("2x1GiB").replay(log) == []  # 2 MiB pages there: replayed on the log's
    bad = log.replace("granularity=4194304", "granularity=3000")
    with pytest.raises(ValueError, match=r"line 1 \('@recording backend=sim'\).*granularity"):
        SimBackend().replay(bad)


@pytest.mark.sim_only
def test_a_damaged_log_from_another_machine_answers_a_list_or_a_value_error_naming_a_line():
    seed = int(os.environ.get("AIMDO_FUZZ_SEED", "20240610"))
    rng = random.Random(seed)
    recording = Recording(SimBackend("2x1GiB"))
    scripted_run(recording)
    lines = as_if_recorded_elsewhere(recording.log()).splitlines()
    sim = SimBackend("2x1GiB")
    outcomes = {"replayed": 0, "refused": 0}
    for attempt in range(200):
        damaged = lines
        for _ in range(rng.randrange(1, 4)):
            damaged = mutate(rng, damaged)
        text = "\n".join(damaged) + "\n"
        try:
            differences = sim.replay(text)
        except ValueError as error:
            assert_names_a_line(error, text, f"seed {seed}, attempt {attempt}")
            outcomes["refused"] += 1
        else:
            assert all(d.startswith("line ") for d in differences), f"seed {seed}, {attempt}"
            outcomes["replayed"] += 1
    assert min(outcomes.values()) > 20, f"seed {seed}: {outcomes}"
