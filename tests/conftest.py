"""One suite for every backend: AIMDO_BACKEND=sim (default) or cuda.

Fixtures here build every Manager a test uses, so that each test has its own state
(safe under ``pytest -n auto``), checks that the backend it asked for is the one that
ran, and checks that no simulator leaks anything when the test ends.
"""

from __future__ import annotations

import gc
import os

import aimdo
import pytest
from aimdo.sim import SimBackend

BACKEND = os.environ.get("AIMDO_BACKEND", "sim").strip().lower() or "sim"
MiB = 1 << 20
PAGE = 2 * MiB  # the smallest page the driver's granularity allows: cheap on both backends


def pytest_report_header(config):
    return f"aimdo backend: {BACKEND}"


def pytest_collection_modifyitems(config, items):
    if BACKEND != "cuda":
        return
    skip = pytest.mark.skip(reason="needs a simulator-only power (AIMDO_BACKEND=cuda)")
    for item in items:
        if "sim_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_simulator_leaks(monkeypatch):
    """Every simulator a test created reports no leak once the test's objects are gone.

    The simulators are held here until the check (a test's own references may be gone by
    then), so a leak cannot escape by being garbage-collected with its simulator."""
    created: list[SimBackend] = []
    original_init = SimBackend.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(SimBackend, "__init__", recording_init)
    yield
    gc.collect()
    for backend in created:
        leaks = backend.leaks()
        assert leaks == [], f"simulator (seed {backend.seed}) leaked: {leaks}"


@pytest.fixture
def backend_name() -> str:
    return BACKEND


@pytest.fixture
def make_manager(backend_name):
    """make_manager(pages=8, devices=(0,), ...) -> Manager whose aimdo budget on each
    device is exactly ``pages`` pages of PAGE bytes.

    The limit is pages + headroom + whatever others used on the device at the Manager's
    only poll (the CUDA contexts on a real GPU, nothing on a fresh simulator), so a
    scripted fault sequence evicts the same pages on an 80 GB card as on a small
    simulated one. Tests that need the budget to follow later changes pass a
    poll_interval of their own (on the simulator).
    """
    made: list[aimdo.Manager] = []

    def make(
        pages: int | dict[int, int] = 8,
        devices=(0,),
        *,
        sim: SimBackend | None = None,
        headroom: int = 0,
        extra_headroom: int = 0,
        poll_interval: float = 1e9,
        page_size: int = PAGE,
    ) -> aimdo.Manager:
        devices = list(devices)
        if backend_name == "sim":
            backend = sim if sim is not None else SimBackend(f"{max(2, max(devices) + 1)}x1GiB")
        elif backend_name == "cuda":
            assert sim is None, "a test passing its own simulator must be marked sim_only"
            backend = aimdo.CudaBackend()
            if max(devices) >= backend.device_count:
                pytest.skip(
                    f"needs {max(devices) + 1} GPUs; this machine has {backend.device_count}"
                )
        else:
            raise pytest.UsageError(f"AIMDO_BACKEND={backend_name!r}: expected sim or cuda")
        manager = aimdo.Manager(backend, devices, poll_interval=poll_interval, page_size=page_size)
        made.append(manager)
        assert manager.backend_name == backend_name, (
            f"asked for the {backend_name} backend, {manager.backend_name} ran"
        )
        per_device = pages if isinstance(pages, dict) else {d: pages for d in devices}
        baseline = {}
        limits = {}
        for device in devices:
            # The one poll this Manager will make (poll_interval is huge): others' usage is
            # read from the very figure the budget uses, so a concurrent process (another
            # xdist worker on the same GPU) cannot change it between two reads.
            _, total = manager.memory_info(device)
            baseline[device] = total - manager.poll(device)["free_bytes"]
            limits[device] = per_device[device] * page_size + headroom + baseline[device]
        manager.add_devices(
            devices,
            vram_limit=limits,
            headroom=headroom,
            extra_headroom=extra_headroom,
            poll_interval=poll_interval,
            page_size=page_size,
        )
        if backend_name == "cuda":
            # A fresh poll on a GPU reads what every process uses it for: other xdist
            # workers' memory, and this test's own PyTorch memory, which the simulator
            # keeps on the host. The tests script fault sequences at the budget this
            # Manager's one poll set, so on a GPU the library's fresh polls (the prefetch
            # trials' steady step, the residency grown back) read that poll again. Tests
            # of what a fresh poll sees script others' memory on the simulator (sim_only).
            read = manager.poll
            manager.poll = lambda device, fresh=False: read(device, False)
        manager.sim = manager.backend if isinstance(manager.backend, SimBackend) else None
        manager.baseline = baseline
        return manager

    yield make
    for manager in made:
        manager.close()


def residency(vbar) -> str:
    """A VBAR's pages as a string: '.' absent, 'R' resident, 'P' resident and pinned."""
    return "".join(
        "P" if pinned else "R" if resident else "." for resident, pinned in vbar.residency()
    )


def watermark_pages(vbar) -> int:
    return vbar.watermark_bytes // vbar.page_size
