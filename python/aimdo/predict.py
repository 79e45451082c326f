"""Predict what ``aimdo.torch.offload`` does to a model's step time, on the simulator.

``predict_offload`` runs a model's blocks (their sizes and compute times, no data)
through aimdo's real core on a ``SimBackend``, in the schedule an offloaded module uses
on CUDA (both run ``aimdo._schedule``; here on the simulator's copy and compute engines):
- the same placement (``spread_order`` or in order), faults and unpins;
- the same prefetch window;
- staging buffers taken, capped (``staging_bytes``) and reused the same way, and
  temporary buffers for blocks larger than one;
- the same stream order: copies into mapped pages start on the copy engine without
  waiting for compute, a copy into a staging buffer waits for the compute that last
  read it, and each block's compute waits for its copy.
The first step learns the order and copies on the compute stream, as the module's first
forward does. The blocks are given in the order they run, and placed spread in that
order; the module spreads its blocks in registration order (or a declared ``order``),
which is the same for models built as a sequence of layers.

Calibrate the simulator with measured numbers: the device's bandwidth, driver costs, and
the memory others use on it. On CUDA that includes the staging buffers, which are
PyTorch memory: the prediction does not allocate them. What the prediction leaves out
is the host's own time (Python, kernel launches), which overlaps the GPU's as long as
the host runs ahead.

    sim = aimdo.SimBackend([{"capacity": "80GB", "bandwidth": 53e9}])
    with aimdo.Manager(sim, [0], vram_limit="24GiB") as manager:
        steps = predict_offload(manager, 0, block_bytes, block_seconds, steps=5, prefetch=2)
"""

from __future__ import annotations

from dataclasses import dataclass

from ._executor import IN_LINE, Executor
from ._manager import Manager
from ._placement import place
from ._schedule import Block, Schedule, auto_staging_bytes
from .sim import SimBackend

__all__ = ["PredictedStep", "predict_offload"]


@dataclass
class PredictedStep:
    """One predicted forward: its virtual time and what ``ForwardStats`` would say, the
    staging buffers' bytes after it (``Offload.staging_bytes``), plus the order copies were
    queued and blocks ran (``"copyN"``, ``"runN"``)."""

    seconds: float
    hits: int = 0
    copied_layers: int = 0
    offloaded_layers: int = 0
    bytes_copied: int = 0
    peak_temporary_bytes: int = 0
    staging_bytes: int = 0
    schedule: tuple = ()


class _Block(Block):
    __slots__ = ("index", "seconds")

    def __init__(self, index: int, nbytes: int, seconds: float):
        super().__init__(nbytes)
        self.index = index
        self.seconds = seconds


class _Engines(Executor):
    """The schedule on one simulated device's two engines, in virtual time: tokens are
    seconds on the device's clock. Its copy engine runs copies one after another, each
    after the time it waits for; its compute engine runs the blocks in order, each after
    the copy it waits for. No bytes move: every destination is None. The host's time is
    not modelled, so waiting on the host is free.

    - a staging buffer costs nothing and is free from the moment it is made;
    - IN_LINE: a copy starts after the compute queued so far (the block's compute then
      waits for the copy, as a copy on the compute stream would make it);
    - no wait (pages just mapped): the copy waits only for the copies before it in this
      forward, which starts once both engines are idle.
    """

    def __init__(self, sim: SimBackend, device: int):
        self.sim = sim
        self.device = device
        self.start = 0.0
        self.log = []
        self._after = 0.0  # what the next compute waits for

    def begin(self) -> float:
        """Start a forward once both engines are idle; returns that time."""
        self.start = max(self.sim.now(self.device), self.sim.copy_engine_now(self.device))
        self.log = []
        return self.start

    def run(self, block: _Block) -> None:
        self.log.append(f"run{block.index}")
        self.sim.compute_async(self.device, block.seconds, self._after)
        self._after = 0.0

    def new_buffer(self, nbytes: int):
        return None

    def compute_point(self) -> float:
        return self.sim.now(self.device)

    def destination(self, block, into):
        return None

    def copy(self, block, storage, after) -> float:
        self.log.append(f"copy{block.index}")
        if after is IN_LINE:
            after = self.sim.now(self.device)
        elif after is None:
            after = self.start
        return self.sim.copy_async(self.device, block.nbytes, after)

    def wait_for(self, token: float) -> None:
        self._after = max(self._after, token)

    def host_wait(self, token) -> None:
        pass

    def drain_copies(self) -> None:
        pass


def _step(schedule: Schedule, engines: _Engines, blocks: list) -> PredictedStep:
    """One forward of the offloaded module, with the blocks' compute on the compute engine."""
    start = engines.begin()
    schedule.begin_forward()
    try:
        for block in blocks:
            schedule.before(block)
            engines.run(block)
            schedule.release(block)
    finally:
        schedule.end_forward()
    sim, device = engines.sim, engines.device
    stats = schedule.stats
    return PredictedStep(
        seconds=max(sim.now(device), sim.copy_engine_now(device)) - start,
        hits=stats.hits,
        copied_layers=stats.copied_layers,
        offloaded_layers=stats.offloaded_layers,
        bytes_copied=stats.bytes_copied,
        peak_temporary_bytes=stats.peak_temporary_bytes,
        staging_bytes=schedule.staging_bytes,
        schedule=tuple(engines.log),
    )


def predict_offload(
    manager: Manager,
    device: int,
    block_bytes,
    block_seconds,
    *,
    steps: int,
    prefetch: int = 2,
    spread: bool = True,
    staging_bytes: int | None = None,
) -> list[PredictedStep]:
    """Predict ``steps`` forwards of a model whose blocks (modules with weights, in the
    order they run) have ``block_bytes`` of weights and take ``block_seconds`` of compute
    each, offloaded to ``device`` with ``prefetch``, ``spread`` and ``staging_bytes`` as in
    ``aimdo.torch.offload``. ``manager`` must run on a SimBackend; its VBAR is closed
    afterwards. Returns one PredictedStep per forward (the first one learns the order)."""
    if not isinstance(manager.backend, SimBackend):
        raise TypeError("predict_offload runs on the simulator: pass a Manager on a SimBackend")
    block_bytes, block_seconds = list(block_bytes), list(block_seconds)
    if len(block_bytes) != len(block_seconds) or not block_bytes:
        raise ValueError("block_bytes and block_seconds need one entry per block, at least one")
    if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in block_bytes):
        raise ValueError("block_bytes must be positive ints")
    if any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0 for s in block_seconds
    ):
        raise ValueError("block_seconds must be non-negative numbers")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
    if staging_bytes is None:  # the same default as aimdo.torch.offload's
        staging_bytes = auto_staging_bytes(block_bytes, prefetch, manager.budget_bytes(device))
    if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or staging_bytes < 0:
        raise ValueError(f"staging_bytes must be a non-negative int, got {staging_bytes!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    blocks = [
        _Block(i, n, s) for i, (n, s) in enumerate(zip(block_bytes, block_seconds, strict=True))
    ]
    vbar = place(manager, device, blocks, bool(spread))
    try:
        # The blocks run in the order given; the first forward learns it, as the module's
        # does when no order is declared.
        engines = _Engines(manager.backend, device)
        schedule = Schedule(
            engines, vbar, blocks, prefetch, order=[], learning=True, staging_bytes=staging_bytes
        )
        return [_step(schedule, engines, blocks) for _ in range(steps)]
    finally:
        vbar.close()
