"""Predict what ``aimdo.torch.offload`` does to a model's step time, on the simulator.

``predict_offload`` runs a model's blocks (their sizes and compute times, no data)
through aimdo's real core on a ``SimBackend``, in the schedule ``OffloadedModule`` uses
on CUDA:
- the same placement (``spread_order`` or in order), faults and unpins;
- the same prefetch window (``fill_window``);
- staging buffers taken and reused the same way;
- the same stream order: copies into mapped pages start on the copy engine without
  waiting for compute, a copy into a staging buffer waits for the compute that last
  read it, and each block's compute waits for its copy.
The first step learns the order and copies on the compute stream, as the module's first
forward does. The blocks are given in the order they run, and placed spread in that
order; the module spreads its blocks in registration order (or a declared ``order``),
which is the same for models built as a sequence of layers.

Calibrate the simulator with measured numbers: the device's bandwidth, driver costs, and
the memory others use on it. On CUDA that includes the staging buffers, which live in
PyTorch's cache: the prediction does not allocate them. What the prediction leaves out
is the host's own time (Python, kernel launches), which overlaps the GPU's as long as
the host runs ahead.

    sim = aimdo.SimBackend([{"capacity": "80GB", "bandwidth": 53e9}])
    with aimdo.Manager(sim, [0], vram_limit="24GiB") as manager:
        steps = predict_offload(manager, 0, block_bytes, block_seconds, steps=5, prefetch=2)
"""

from __future__ import annotations

from dataclasses import dataclass

from ._core import ALLOCATION_ALIGNMENT_BYTES
from ._manager import Manager
from ._placement import fill_window, spread_order
from .sim import SimBackend

__all__ = ["PredictedStep", "predict_offload"]


@dataclass
class PredictedStep:
    """One predicted forward: its virtual time and what ``ForwardStats`` would say, plus
    the order copies were queued and blocks ran (``"copyN"``, ``"runN"``)."""

    seconds: float
    hits: int = 0
    copied_layers: int = 0
    offloaded_layers: int = 0
    bytes_copied: int = 0
    schedule: tuple = ()


class _Block:
    def __init__(self, index: int, nbytes: int, seconds: float):
        self.index = index
        self.nbytes = nbytes
        self.seconds = seconds
        self.allocation = None
        self.signature = None
        self.loaded = False
        self.pinned = False
        self.ready = 0.0  # when its weights are in place (virtual seconds)
        self.slot = None
        self.queued = False
        self.offloaded = False
        self.resident = False


class _Slot:
    def __init__(self, nbytes: int, free: float):
        self.nbytes = nbytes
        self.free = free  # when the compute that last read it is done


class _Run:
    """One step's schedule state (OffloadedModule's forward, on the simulator)."""

    def __init__(self, model: "_Model", learning: bool):
        self.model = model
        self.sim = model.sim
        self.device = model.device
        self.stream = model.prefetch > 0 and not learning  # the copy stream is used
        self.step = PredictedStep(seconds=0.0)
        self.log = []
        self.slots = []
        self.free_slots = []  # oldest released first
        self.start = 0.0

    def slot_obtainable(self) -> bool:
        return bool(self.free_slots) or len(self.slots) <= self.model.prefetch

    def take_slot(self, nbytes: int):
        if self.free_slots:
            slot = self.free_slots.pop(0)
            if slot.nbytes >= nbytes:
                return slot
            self.slots.remove(slot)  # too small: replaced by a bigger one
        elif len(self.slots) > self.model.prefetch:
            return None
        slot = _Slot(nbytes, self.sim.now(self.device))  # made on the compute stream
        self.slots.append(slot)
        return slot

    def load(self, block: _Block, ahead: bool) -> bool:
        if block.loaded:
            return True
        if ahead and self.stream and block.offloaded and not self.slot_obtainable():
            return False
        signature = self.model.vbar.fault(block.allocation)
        block.pinned = signature is not None
        block.offloaded = signature is None
        block.resident = False
        step = self.step
        slot = None
        if signature is None:
            if self.stream:
                slot = self.take_slot(block.nbytes)
                if slot is None and ahead:
                    return False
                block.slot = slot
            step.offloaded_layers += 1
            copy_in = True
        else:
            copy_in = signature != block.signature
            if copy_in:
                step.copied_layers += 1
            else:
                step.hits += 1
        block.loaded = True
        block.resident = not copy_in
        block.ready = 0.0
        if copy_in:
            step.bytes_copied += block.nbytes
            self.log.append(f"copy{block.index}")
            if self.stream:
                if slot is not None:
                    after = slot.free
                elif signature is None:
                    after = self.sim.now(self.device)  # waits for the compute stream
                else:
                    after = self.start  # pages just mapped: nothing queued reads them
            else:
                after = self.sim.now(self.device)  # in order on the compute stream
            block.ready = self.sim.copy_async(self.device, block.nbytes, after)
            block.queued = ahead
        block.signature = signature
        return True

    def release(self, block: _Block, done: float) -> None:
        block.loaded = False
        block.queued = False
        slot, block.slot = block.slot, None
        if slot is not None:
            slot.free = done
            self.free_slots.append(slot)
        pinned, block.pinned = block.pinned, False
        if pinned:
            self.model.vbar.unpin(block.allocation)

    def forward(self) -> PredictedStep:
        sim, device, order = self.sim, self.device, self.model.blocks
        start = self.start = max(sim.now(device), sim.copy_engine_now(device))
        horizon = 0
        prefetch = self.model.prefetch
        try:
            for position, block in enumerate(order):
                self.load(block, ahead=False)
                block.queued = False
                if self.stream:
                    horizon = fill_window(
                        order,
                        position,
                        horizon,
                        prefetch,
                        lambda ahead: self.load(ahead, ahead=True),
                    )
                self.log.append(f"run{block.index}")
                done = sim.compute_async(device, block.seconds, block.ready)
                self.release(block, done)
        finally:
            for block in order:
                if block.loaded:
                    self.release(block, sim.now(device))
        self.step.seconds = max(sim.now(device), sim.copy_engine_now(device)) - start
        self.step.schedule = tuple(self.log)
        return self.step


class _Model:
    def __init__(
        self, manager: Manager, device: int, block_bytes, block_seconds, prefetch: int, spread: bool
    ):
        self.sim = manager.backend
        self.device = device
        self.prefetch = prefetch
        self.blocks = [_Block(i, n, s) for i, (n, s) in enumerate(zip(block_bytes, block_seconds))]
        align = ALLOCATION_ALIGNMENT_BYTES  # each allocation starts aligned
        total = sum((b.nbytes + align - 1) // align * align for b in self.blocks)
        self.vbar = manager.create_vbar(total, device)
        placed = spread_order(self.blocks) if spread else self.blocks
        for block in placed:
            block.allocation = self.vbar.alloc(block.nbytes)


def predict_offload(
    manager: Manager,
    device: int,
    block_bytes,
    block_seconds,
    *,
    steps: int,
    prefetch: int = 1,
    spread: bool = True,
) -> list[PredictedStep]:
    """Predict ``steps`` forwards of a model whose blocks (modules with weights, in the
    order they run) have ``block_bytes`` of weights and take ``block_seconds`` of compute
    each, offloaded to ``device`` with ``prefetch`` and ``spread`` as in
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
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    model = _Model(manager, device, block_bytes, block_seconds, prefetch, bool(spread))
    try:
        return [_Run(model, learning=step == 0).forward() for step in range(steps)]
    finally:
        model.vbar.close()
