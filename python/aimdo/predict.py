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

import logging
from dataclasses import dataclass

from ._executor import IN_LINE, Executor
from ._manager import Manager
from ._placement import link_peers, place
from ._schedule import Block, Schedule, auto_staging_bytes, pin_peer_copy
from .sim import SimBackend

__all__ = ["PredictedStep", "Regime", "predict_group", "predict_offload", "rank_regimes"]

_log = logging.getLogger("aimdo")


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
    bytes_from_peers: int = 0  # of bytes_copied: from another device's pages (predict_group)


class _Block(Block):
    __slots__ = ("index", "seconds", "peers")

    def __init__(self, index: int, nbytes: int, seconds: float):
        super().__init__(nbytes)
        self.index = index
        self.seconds = seconds
        self.peers = ()  # the same block on the devices this one reads (predict_group)


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
        self.peer_bytes = 0

    def begin(self) -> float:
        """Start a forward once both engines are idle; returns that time."""
        self.start = max(self.sim.now(self.device), self.sim.copy_engine_now(self.device))
        self.log = []
        self.peer_bytes = 0
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
        """A copy from the host, or over a peer link from a peer's pages that hold the
        block (after the peer's own copy into them), as aimdo.torch's executor does."""
        self.log.append(f"copy{block.index}")
        if after is IN_LINE:
            after = self.sim.now(self.device)
        elif after is None:
            after = self.start
        source = pin_peer_copy(block.peers) if block.peers else None
        if source is None:
            done = self.sim.copy_async(self.device, block.nbytes, after)
        else:
            try:
                filled = source.filled if source.filled is not None else 0.0
                peer = source.allocation.vbar.device
                done = self.sim.peer_copy_async(self.device, peer, block.nbytes, max(after, filled))
            finally:
                source.allocation.vbar.unpin(source.allocation)
            self.peer_bytes += block.nbytes
        if block.pinned:  # into its own pages: a peer reading them waits for this copy
            block.filled = done
        return done

    def wait_for(self, token: float) -> None:
        self._after = max(self._after, token)

    def host_wait(self, token) -> None:
        pass

    def drain_copies(self) -> None:
        pass


def _checked(manager, block_bytes, block_seconds, prefetch, steps) -> tuple[list, list]:
    if not isinstance(manager.backend, SimBackend):
        raise TypeError("predictions run on the simulator: pass a Manager on a SimBackend")
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
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return block_bytes, block_seconds


def _check_staging(staging_bytes) -> None:
    if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or staging_bytes < 0:
        raise ValueError(f"staging_bytes must be a non-negative int, got {staging_bytes!r}")


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
    return _predicted(schedule, engines, start)


def _predicted(schedule: Schedule, engines: _Engines, start: float) -> PredictedStep:
    """What the forward that began at `start` did, once both engines are done with it."""
    sim, device, stats = engines.sim, engines.device, schedule.stats
    return PredictedStep(
        seconds=max(sim.now(device), sim.copy_engine_now(device)) - start,
        hits=stats.hits,
        copied_layers=stats.copied_layers,
        offloaded_layers=stats.offloaded_layers,
        bytes_copied=stats.bytes_copied,
        peak_temporary_bytes=stats.peak_temporary_bytes,
        staging_bytes=schedule.staging_bytes,
        schedule=tuple(engines.log),
        bytes_from_peers=engines.peer_bytes,
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
    first=(),
) -> list[PredictedStep]:
    """Predict ``steps`` forwards of a model whose blocks (modules with weights, in the
    order they run) have ``block_bytes`` of weights and take ``block_seconds`` of compute
    each, offloaded to ``device`` with ``prefetch``, ``spread`` and ``staging_bytes`` as in
    ``aimdo.torch.offload``; ``first``: the indices of the blocks its ``keep_first`` lists,
    in that order. ``manager`` must run on a SimBackend; its VBAR is closed afterwards.
    Returns one PredictedStep per forward (the first one learns the order)."""
    block_bytes, block_seconds = _checked(manager, block_bytes, block_seconds, prefetch, steps)
    first = list(first)
    if len(set(first)) != len(first) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(block_bytes)
        for i in first
    ):
        raise ValueError(
            f"first must list distinct indices of the {len(block_bytes)} blocks, got {first!r}"
        )
    blocks, vbar, engines, schedule = _member(
        manager, device, block_bytes, block_seconds, prefetch, spread, staging_bytes, first=first
    )
    try:
        return [_step(schedule, engines, blocks) for _ in range(steps)]
    finally:
        vbar.close()


def _member(
    manager, device, block_bytes, block_seconds, prefetch, spread, staging, rotation=0.0, first=()
):
    """The model's blocks placed in a new VBAR on ``device`` (rotated as a group's member
    ``rotation`` of the way round), the device's engines, and the Schedule an offload
    would run there: (blocks, vbar, engines, schedule). The blocks run in the order given;
    the first forward learns it, as the module's does when no order is declared. The
    caller closes the VBAR."""
    if staging is None:  # the same default as aimdo.torch.offload's
        staging = auto_staging_bytes(block_bytes, prefetch, manager.budget_bytes(device))
    _check_staging(staging)
    blocks = [
        _Block(i, n, s) for i, (n, s) in enumerate(zip(block_bytes, block_seconds, strict=True))
    ]
    vbar = place(manager, device, blocks, bool(spread), rotation, [blocks[i] for i in first])
    engines = _Engines(manager.backend, device)
    schedule = Schedule(
        engines, vbar, blocks, prefetch, order=[], learning=True, staging_bytes=staging
    )
    return blocks, vbar, engines, schedule


def predict_group(
    manager: Manager,
    devices,
    block_bytes,
    block_seconds,
    *,
    steps: int,
    prefetch: int = 2,
    spread: bool = True,
    staging_bytes: int | None = None,
    peers: bool = True,
    donors=(),
) -> list[list[PredictedStep]]:
    """Predict ``steps`` forwards of a model offloaded to each of ``devices`` as
    ``aimdo.torch.offload_group`` does (complementary placement; a block copied from a
    peer's pages over the simulator's peer link where ``manager.peer_link`` gives access and
    ``peers``; ``donors`` filled once and never computing), every computing device running
    the whole model at once (a guidance split: pass each device's ``block_seconds``). The
    devices' forwards are interleaved block by block, as threads running at once would
    be. Returns, per forward, one PredictedStep per computing device."""
    block_bytes, block_seconds = _checked(manager, block_bytes, block_seconds, prefetch, steps)
    devices, donors = list(devices), list(donors)
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"predict_group needs distinct devices, got {devices!r}")
    if any(d not in devices for d in donors) or len(set(donors)) >= len(devices):
        raise ValueError(f"donors must be some of {devices!r}, leaving one to compute")
    members, vbars = [], []
    try:
        for index, device in enumerate(devices):
            blocks, vbar, engines, schedule = _member(
                manager,
                device,
                block_bytes,
                block_seconds,
                prefetch,
                spread,
                staging_bytes,
                index / len(devices),
            )
            vbars.append(vbar)
            members.append((device, blocks, engines, schedule))
        if peers:
            link_peers(
                manager,
                [
                    (device, blocks, vbar)
                    for (device, blocks, _, _), vbar in zip(members, vbars, strict=True)
                ],
            )
        for device, blocks, engines, schedule in members:
            if device in donors:
                engines.begin()
                schedule.fill(sorted(blocks, key=lambda block: block.allocation.offset))
        computing = [member for member in members if member[0] not in donors]
        return [_group_step(computing) for _ in range(steps)]
    finally:
        for vbar in vbars:
            vbar.close()


def _group_step(members: list) -> list[PredictedStep]:
    starts = [engines.begin() for _, _, engines, _ in members]
    for _, _, _, schedule in members:
        schedule.begin_forward()
    try:
        for position in range(len(members[0][1])):
            for _, blocks, engines, schedule in members:
                block = blocks[position]
                schedule.before(block)
                engines.run(block)
                schedule.release(block)
    finally:
        for _, _, _, schedule in members:
            schedule.end_forward()
    return [
        _predicted(schedule, engines, start)
        for start, (_, _, engines, schedule) in zip(starts, members, strict=True)
    ]


@dataclass
class Regime:
    """One way to run a step on several devices, with its predicted seconds."""

    name: str
    seconds: float
    detail: str


def rank_regimes(
    manager: Manager,
    devices,
    block_bytes,
    seconds_full,
    seconds_split,
    *,
    steps: int = 3,
    prefetch: int = 2,
) -> list[Regime]:
    """The regimes of one step (a batch that splits in len(devices) parts, as guidance
    does) on ``devices``, fastest first, each predicted on the simulator from the
    topology, budgets and block sizes the Manager's SimBackend has: ``seconds_full`` is
    each block's compute at the whole batch, ``seconds_split`` at one device's part.

    - "one device": the whole batch on the first device (``aimdo.torch.offload``);
    - "split with peers": each device its part, copies from each other's pages where the
      driver allows (``offload_group``); "split from the host": the same, peers off;
    - "donor": the whole batch on the first device, the others holding what it lacks
      (``offload_group(donors=...)``);
    - "layer split": the blocks cut in len(devices) runs, each offloaded to its device,
      the whole batch through them in turn.
    The ranking is logged (logger ``aimdo``, INFO)."""
    devices = list(devices)
    last = steps - 1
    first = devices[0]
    one = predict_offload(
        manager, first, block_bytes, seconds_full, steps=steps, prefetch=prefetch
    )[last]
    regimes = [Regime("one device", one.seconds, f"{one.bytes_copied} bytes from the host")]
    if len(devices) > 1:
        for name, peers in (("split with peers", True), ("split from the host", False)):
            step = predict_group(
                manager,
                devices,
                block_bytes,
                seconds_split,
                steps=steps,
                prefetch=prefetch,
                peers=peers,
            )[last]
            moved = sum(s.bytes_copied for s in step)
            from_peers = sum(s.bytes_from_peers for s in step)
            regimes.append(
                Regime(
                    name,
                    max(s.seconds for s in step),
                    f"{from_peers} of {moved} bytes copied from peers",
                )
            )
        donor = predict_group(
            manager,
            devices,
            block_bytes,
            seconds_full,
            steps=steps,
            prefetch=prefetch,
            donors=devices[1:],
        )[last][0]
        regimes.append(
            Regime(
                "donor",
                donor.seconds,
                f"{donor.bytes_from_peers} of {donor.bytes_copied} bytes copied from donors",
            )
        )
        cuts = [len(block_bytes) * i // len(devices) for i in range(len(devices) + 1)]
        total, moved = 0.0, 0
        for device, begin, end in zip(devices, cuts, cuts[1:], strict=False):
            if begin == end:
                continue
            part = predict_offload(
                manager,
                device,
                block_bytes[begin:end],
                list(seconds_full)[begin:end],
                steps=steps,
                prefetch=prefetch,
            )[last]
            total += part.seconds
            moved += part.bytes_copied
        regimes.append(Regime("layer split", total, f"{moved} bytes from the host"))
    regimes.sort(key=lambda regime: regime.seconds)
    _log.info(
        "aimdo: regimes on devices %s, fastest first: %s",
        devices,
        "; ".join(f"{r.name} {r.seconds * 1000:.1f} ms ({r.detail})" for r in regimes),
    )
    return regimes
