"""An offload that chooses its own prefetch depth (``offload(prefetch="auto")``; design.md
§7): its first forward with the order known is timed block by block, and each depth of
CANDIDATES is predicted on a simulator of this machine with those compute times; the
fastest is kept (a deeper one only if it is MARGIN faster: it holds more staging) and the
choice is logged. Needs PyTorch; imported by aimdo.torch only."""

from __future__ import annotations

import logging

from ._manager import Manager
from ._schedule import Schedule, auto_staging_bytes, per_block, use_seconds
from ._torch_regime import measure_links, predictor
from .predict import predict_offload
from .sim import SimBackend

_log = logging.getLogger("aimdo")

#: The depths tried, and the one the first forwards run with.
CANDIDATES = (1, 2, 3, 4, 6, 8)
START = 2
#: A deeper prefetch is kept only if predicted this much faster than the shallowest
#: within reach of the fastest (a fraction of a forward).
MARGIN = 0.01


class PrefetchTuner:
    """The choice of one offload's prefetch depth: Runner.call asks wants() ahead of each
    forward of the whole module, times it if so, and calls after() once it is over (its
    blocks let go)."""

    def __init__(self, manager: Manager, device: int, staging_bytes: int | None):
        self.manager = manager
        self.device = device
        self.staging_option = staging_bytes  # the user's cap on staging, or None (auto)
        self.predicted = None  # {prefetch: predicted seconds of a forward}, once chosen
        self.done = False

    def wants(self, schedule: Schedule) -> bool:
        """Whether the next forward is to be timed: the order is known and nothing was
        chosen yet."""
        return not self.done and not schedule.learning

    def after(self, schedule: Schedule, failed: bool, marks) -> None:
        """Choose from the forward just timed: `marks` are its Schedule.marks, from
        "start" to "end", or None when it was not timed (one that failed is timed again
        next)."""
        if marks is None or failed:
            return
        self.done = True
        try:
            self._choose(schedule, use_seconds(marks, schedule.executor.elapsed))
        except Exception as error:  # noqa: BLE001 - the offload runs on, at its depth
            _log.warning(
                "aimdo: offload on device %s keeps prefetch %d: its prediction failed (%s)",
                self.device,
                schedule.prefetch,
                error,
            )

    def staging_for(self, schedule: Schedule, prefetch: int) -> int:
        if self.staging_option is not None:
            return self.staging_option
        sizes = [block.nbytes for block in schedule.blocks]
        return auto_staging_bytes(sizes, prefetch, self.manager.budget_bytes(self.device))

    def _choose(self, schedule: Schedule, uses) -> None:
        seconds = per_block(uses)
        order = list(seconds)
        if not order:
            return
        sizes = [block.nbytes for block in order]
        times = [seconds[block] for block in order]
        largest = max(sizes)
        held_now = schedule.staging_bytes
        # The links are measured once (on CUDA), for every depth's prediction.
        links = None
        if not isinstance(self.manager.backend, SimBackend):
            links = measure_links(self.manager, [self.device])
        predicted = {}
        for prefetch in CANDIDATES:
            staging = self.staging_for(schedule, prefetch)
            # What the staging buffers of that depth would hold, in place of today's.
            held = min(staging, (prefetch + 1) * largest)
            change = {self.device: held - held_now}
            with predictor(self.manager, [self.device], change, links) as (made, numbers):
                steps = predict_offload(
                    made,
                    numbers[0],
                    sizes,
                    times,
                    steps=2,
                    prefetch=prefetch,
                    staging_bytes=staging,
                )
            predicted[prefetch] = steps[-1].seconds
        best = min(predicted.values())
        chosen = min(p for p, s in predicted.items() if s <= best * (1 + MARGIN))
        self.predicted = predicted
        if chosen != schedule.prefetch:
            schedule.set_prefetch(chosen, self.staging_for(schedule, chosen))
        _log.info(
            "aimdo: offload on device %s takes prefetch %d, predicted %.1f ms a forward "
            "(%s), from the compute of its blocks timed in one forward (%.1f ms)",
            self.device,
            chosen,
            predicted[chosen] * 1000,
            ", ".join(f"{p}: {s * 1000:.1f} ms" for p, s in predicted.items()),
            sum(times) * 1000,
        )
