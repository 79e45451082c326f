"""An offload that chooses its own prefetch depth (``offload(prefetch="auto")``; design.md
§7): its first forward with the order known is timed block by block, and each depth of
CANDIDATES is predicted on a simulator of this machine with those compute times (a deeper
one counts as faster only if MARGIN faster: it holds more staging). Then the depths are
tried for real, from the one predicted fastest deeper, one forward each (after
one that lets the new depth settle), until one is much slower than the fastest measured
(GIVE_UP) or none is left; the fastest stays, and the choice is logged. Needs PyTorch;
imported by aimdo.torch only."""

from __future__ import annotations

import logging
import time

from ._manager import Manager
from ._schedule import Schedule, auto_staging_bytes, per_block, use_seconds
from ._torch_regime import measure_links, predictor
from .predict import predict_offload
from .sim import SimBackend

_log = logging.getLogger("aimdo")

#: The depths tried, and the one the first forwards run with.
CANDIDATES = (1, 2, 3, 4, 6, 8)
START = 2
#: A deeper prefetch is kept only if predicted (or measured) this much faster than the
#: shallowest within reach of the fastest (a fraction of a forward).
MARGIN = 0.01
#: The trials try every depth of CANDIDATES from the predicted one deeper (a deeper window
#: can pay after a plateau: Qwen-Image measured 2 and 3 alike, and 6 faster on an H200),
#: but end at a depth measured this much slower than the fastest so far (a fraction of a
#: forward): deeper ones would only take more staging from the resident weights.
GIVE_UP = 0.1
#: Forwards measured for the trials and found unlike the first measured (other shapes of
#: tensors passed: a prefill among decodes) are not compared; after this many, the trials
#: end with the depth measured fastest so far.
UNLIKE_LIMIT = 8


def signature(args, kwargs) -> tuple:
    """What makes two forwards comparable for the trials: the shape and dtype of each
    tensor passed (at the top level of the arguments)."""
    found = []
    for value in (*args, *kwargs.values()):
        shape = getattr(value, "shape", None)
        if shape is not None:
            found.append((tuple(shape), str(getattr(value, "dtype", ""))))
    return tuple(found)


class PrefetchTuner:
    """The choice of one offload's prefetch depth: Runner.call asks wants() ahead of each
    forward of the whole module: "blocks" (time it block by block, then call after() with
    its marks), "settle" (run it, then call after_trial() with None), "measure" (time it
    whole, the device synchronized before and after, then call after_trial() with its
    seconds) or None (nothing)."""

    def __init__(self, manager: Manager, device: int, staging_bytes: int | None):
        self.manager = manager
        self.device = device
        self.staging_option = staging_bytes  # the user's cap on staging, or None (auto)
        self.predicted = None  # {prefetch: predicted seconds of a forward}, once predicted
        self.measured = {}  # {prefetch: measured seconds of a forward}, as tried
        self.trying = None  # the depth on trial
        self.settling = False  # the next forward runs at the depth on trial, not measured
        self.like = None  # signature() of the first forward measured
        self.unlike = 0  # forwards measured and not compared (unlike the first)
        self.clock = time.perf_counter  # seconds (tests script it)
        self.done = False

    def wants(self, schedule: Schedule) -> str | None:
        """What the next forward is for (see the class), once the order is known."""
        if self.done or schedule.learning:
            return None
        if self.predicted is None:
            return "blocks"
        return "settle" if self.settling else "measure"

    def after(self, schedule: Schedule, failed: bool, marks) -> None:
        """Predict from the forward just timed: `marks` are its Schedule.marks, from
        "start" to "end", or None when it was not timed (one that failed is timed again
        next); then start the trials."""
        if marks is None or failed:
            return
        try:
            chosen = self._choose(schedule, use_seconds(marks, schedule.executor.elapsed))
        except Exception as error:  # noqa: BLE001 - the offload runs on, at its depth
            self.done = True
            _log.warning(
                "aimdo: offload on device %s keeps prefetch %d: its prediction failed (%s)",
                self.device,
                schedule.prefetch,
                error,
            )
            return
        if chosen is None:
            self.done = True
            return
        self._try(schedule, chosen)

    def after_trial(self, schedule: Schedule, failed: bool, seconds, like: tuple) -> None:
        """After a forward of the trials: `seconds` it took when measured (None when it
        settled, or failed: then it is run again), `like` its signature()."""
        if failed:
            return
        if self.settling:
            self.settling = False
            return
        if seconds is None:
            return
        if self.like is None:
            self.like = like
        elif like != self.like:
            self.unlike += 1
            if self.unlike >= UNLIKE_LIMIT:
                self._finish(schedule, "the forwards measured were unlike each other")
            return
        self.measured[self.trying] = seconds
        deeper = [p for p in CANDIDATES if p > self.trying]
        if deeper and seconds <= min(self.measured.values()) * (1 + GIVE_UP):
            self._try(schedule, deeper[0])
        else:
            self._finish(schedule, None)

    def _fastest(self) -> int:
        """The depth measured fastest: the shallowest within MARGIN of the fastest."""
        best = min(self.measured.values())
        return min(p for p, s in self.measured.items() if s <= best * (1 + MARGIN))

    def _try(self, schedule: Schedule, prefetch: int) -> None:
        """Run the next forwards at `prefetch`: one to settle (when it is a change), then
        one measured."""
        self.trying = prefetch
        self.settling = prefetch != schedule.prefetch
        if self.settling:
            schedule.set_prefetch(prefetch, self.staging_for(schedule, prefetch))

    def _finish(self, schedule: Schedule, why: str | None) -> None:
        self.done = True
        self.settling = False
        if not self.measured:
            _log.info(
                "aimdo: offload on device %s keeps prefetch %d: %s",
                self.device,
                schedule.prefetch,
                why,
            )
            return
        chosen = self._fastest()
        if chosen != schedule.prefetch:
            schedule.set_prefetch(chosen, self.staging_for(schedule, chosen))
        _log.info(
            "aimdo: offload on device %s keeps prefetch %d, measured %.1f ms a forward "
            "(tried %s)%s",
            self.device,
            chosen,
            self.measured[chosen] * 1000,
            ", ".join(f"{p}: {s * 1000:.1f} ms" for p, s in self.measured.items()),
            f"; {why}" if why else "",
        )

    def staging_for(self, schedule: Schedule, prefetch: int) -> int:
        if self.staging_option is not None:
            return self.staging_option
        sizes = [block.nbytes for block in schedule.blocks]
        return auto_staging_bytes(sizes, prefetch, self.manager.budget_bytes(self.device))

    def _choose(self, schedule: Schedule, uses) -> int | None:
        """The depth predicted fastest (None when no block was used)."""
        seconds = per_block(uses)
        order = list(seconds)
        if not order:
            return None
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
        _log.info(
            "aimdo: offload on device %s predicts prefetch %d fastest, %.1f ms a forward "
            "(%s), from the compute of its blocks timed in one forward (%.1f ms); it tries "
            "it and deeper depths for real, one forward each",
            self.device,
            chosen,
            predicted[chosen] * 1000,
            ", ".join(f"{p}: {s * 1000:.1f} ms" for p, s in predicted.items()),
            sum(times) * 1000,
        )
        return chosen
