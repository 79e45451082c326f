"""An offload that chooses its own prefetch depth (``offload(prefetch="auto")``; design.md
§7): its first forward with the order known is timed block by block, and each depth of
CANDIDATES is predicted on a simulator of this machine with those compute times (a deeper
one counts as faster only if MARGIN faster: it holds more staging). Then the depths are
tried for real, from the one predicted fastest deeper, one forward each (after one that
lets the new depth settle), until one is much slower than the fastest measured (GIVE_UP)
or none is left; then CONFIRMED of them are measured once more (a forward slowed by
something else, once, must not decide; not when a single depth was measured), the
fastest of all the measurements stays, and the choice is logged. Needs PyTorch;
imported by aimdo.torch only."""

from __future__ import annotations

import logging
import time

import torch

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
#: Once the sweep of the depths ends, this many depths are measured once more (the one kept
#: by then and the fastest of the others; a settling forward first, unless the module runs
#: at it already, and, shallower than the depth it runs at, the residency the deeper one's
#: staging took grown back (_try); each at the staging the budget gives it then), and each
#: counts with the fastest of its measurements: a forward is only ever slowed by what else
#: the machine did meanwhile (a page cache written back, a read from the disk, another
#: process), so one slowed that way would otherwise decide. None is measured again when a
#: single depth was, nor when the trials end on failures or disturbances (FAILED_LIMIT,
#: NOT_COMPARED_LIMIT). On an H200, Qwen-Image at host_limit 8 GiB measured 550.5, 541.6,
#: 489.1 and 598.8 ms at 2, 3, 4 and 6 in one run and kept 4 (495.8 ms a step), where four
#: other runs at 79dad59 measured 3 at 432.6-463.3 ms and kept it (426.2-462.1 ms a step;
#: benchmarks/RESULTS.md, eleventh session).
CONFIRMED = 2
#: Forwards of the trials not compared (unlike the one measured before, or disturbed: the
#: module's watermark moved while it ran or since the last forward of the trials, or it
#: was paused and resumed); after this many, the trials end with the depth measured
#: fastest so far.
NOT_COMPARED_LIMIT = 12
#: Forwards of the trials failing one after another that end them, back at the depth
#: measured fastest (or START): a depth whose staging cannot be had fails every forward.
FAILED_LIMIT = 2
#: Two forwards are alike, for the trials, when they pass tensors of the same dtypes and
#: ranks, in the same places, each with a number of elements within this fraction of the
#: other's (each measured forward is compared with the one measured before it): a
#: decode's attention mask, one column longer at each token, is alike; a prefill among
#: decodes is not.
LIKE_TOLERANCE = 0.25


def signature(args, kwargs) -> tuple:
    """What the trials compare forwards by: (place, dtype, rank, elements) of each tensor
    passed at the top level of the arguments. Never raises: a tensor whose sizes cannot
    be read (a nested tensor) is known by its place and dtype only."""
    found = []
    places = [(index, value) for index, value in enumerate(args)]
    places += [(name, value) for name, value in kwargs.items()]
    for place, value in places:
        if not isinstance(value, torch.Tensor):
            continue
        try:
            found.append((place, str(value.dtype), value.dim(), value.numel()))
        except Exception:  # noqa: BLE001 - no sizes to compare: its place and dtype only
            found.append((place, str(value.dtype), -1, -1))
    return tuple(found)


def alike(first: tuple, other: tuple) -> bool:
    """Whether two signature()s are alike (see LIKE_TOLERANCE)."""
    if len(first) != len(other):
        return False
    for (place, dtype, rank, count), (place2, dtype2, rank2, count2) in zip(
        first, other, strict=True
    ):
        if (place, dtype, rank) != (place2, dtype2, rank2):
            return False
        if count2 != count and abs(count2 - count) > LIKE_TOLERANCE * count:
            return False
    return True


def fits(schedule: Schedule) -> bool:
    """Whether the forward just run took no block through staging or a temporary buffer:
    every block it used fits the budget (pages it filled once, after a pause or an
    eviction, are not copies to hide)."""
    return schedule.stats.offloaded_layers == 0


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
        self.trials = []  # (prefetch, measured seconds), in the order measured
        # The depths still to measure again once the sweep ended (CONFIRMED), or None
        # while it goes on.
        self.confirming = None
        self.trying = None  # the depth on trial
        self.settling = False  # the next forward runs at the depth on trial, not measured
        self.like = None  # signature() of the first forward measured
        self.not_compared = 0  # forwards of the trials not compared (NOT_COMPARED_LIMIT)
        self.clock = time.perf_counter  # seconds (tests script it)
        self.grow = None  # lets the residency grow back (_regrower), once shallower
        self.first = []  # the offload's keep_first blocks: the prediction places them so
        # Evicts now what the staging of the depth on trial displaced (_steadier), so that
        # its measured forward runs at the residency that depth keeps.
        self.steady = None
        self.watermark = None  # the VBAR's watermark after the last forward of the trials
        # disturbed() counts (from any thread); `seen`: the count a forward started with
        self.disturbances = 0
        self.seen = 0
        self.done = False
        # The last forward timed for the choice offloaded nothing: no choice until one
        # does (a model that fits now may not once others take memory).
        self.fitting = False
        self.failures = 0  # forwards of the trials failed one after another

    def choosing(self, schedule: Schedule) -> bool:
        """Whether the depth is still to be chosen: not chosen for good, nor waiting while
        every block fits (as the last forward found)."""
        return not self.done and not (self.fitting and fits(schedule))

    def wants(self, schedule: Schedule) -> str | None:
        """What the next forward is for (see the class), once the order is known. A
        forward to be measured settles instead when the module's watermark moved since
        the last forward of the trials (evictions for others' memory, a budget changed)
        or disturbed() was called since."""
        if self.done or schedule.learning:
            return None
        if self.fitting:
            if fits(schedule):  # the last forward's
                return None
            self.fitting = False
            _log.info(
                "aimdo: offload on device %s offloads blocks now: it chooses its prefetch "
                "depth again",
                self.device,
            )
        if self.predicted is None:
            return "blocks"
        if self._moved(schedule) and not self.settling:
            self.settling = True
            self._not_compared(schedule)
            if self.done:
                return None
        return "settle" if self.settling else "measure"

    def after(self, schedule: Schedule, failed: bool, marks) -> None:
        """Predict from the forward just timed: `marks` are its Schedule.marks, from
        "start" to "end", or None when it was not timed (one that failed is timed again
        next); then start the trials, unless that forward offloaded nothing (every block
        fits): then no depth is tried until a forward offloads one (wants())."""
        if marks is None or failed:
            return
        if fits(schedule):  # no copy to hide
            self.fitting = True
            _log.info(
                "aimdo: offload on device %s keeps prefetch %d: its forward offloaded "
                "nothing (every block fits), so no depth is tried until one does",
                self.device,
                schedule.prefetch,
            )
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
        self._moved(schedule)  # what the trials' first forward is compared with
        self._try(schedule, chosen)

    def after_trial(self, schedule: Schedule, kind: str, failed: bool, seconds, like) -> None:
        """After a forward of the trials: `kind` what wants() said it was for ("settle" or
        "measure"), `seconds` it took when measured (None when it settled or failed),
        `like` its signature() (None when not measured). A failed forward's step is run
        again (FAILED_LIMIT failing one after another end the trials: _give_up); one
        disturbed while it ran (its watermark moved, or disturbed() was called) is followed
        by a settling one."""
        if self.done:
            return
        if failed:
            self.failures += 1
            if self.failures >= FAILED_LIMIT:
                self._give_up(schedule)
            return
        self.failures = 0
        if self._moved(schedule):
            self.settling = True
            self._not_compared(schedule)
            return
        if kind == "settle":
            self.settling = False
            if self.steady is not None:
                # The staging this forward made is others' memory the budget sees at its
                # next poll, up to 2 s away: poll now and evict, and record the watermark
                # that leaves, so the measured forward neither runs above it nor is
                # disturbed by that eviction.
                self.steady()
                # The watermark it leaves, not the disturbances: one counted meanwhile
                # (a budget grown from another thread) still makes the next forward settle.
                self.watermark = schedule.vbar.watermark_bytes
            return
        if seconds is None:  # not timed after all: measured again
            return
        if self.like is not None and not alike(self.like, like):
            self._not_compared(schedule)
            return
        self.like = like  # the next is compared with this one: a decode's mask grows
        self.trials.append((self.trying, seconds))
        if self.confirming is None:
            deeper = [p for p in CANDIDATES if p > self.trying]
            if deeper and seconds <= min(self.measured.values()) * (1 + GIVE_UP):
                self._try(schedule, deeper[0])
                return
            self.confirming = self._to_confirm(schedule.prefetch)
        if self.confirming:
            self._try(schedule, self.confirming.pop(0))
        else:
            self._finish(schedule, None)

    @property
    def measured(self) -> dict:
        """{prefetch: the fastest of its measured seconds}, in the order first measured."""
        fastest: dict = {}
        for prefetch, seconds in self.trials:
            fastest[prefetch] = min(seconds, fastest.get(prefetch, seconds))
        return fastest

    def _to_confirm(self, now: int) -> list:
        """The depths to measure again once the sweep ended (each was measured once): the
        one _fastest() keeps now and the fastest of the others (CONFIRMED in all; the
        shallower first among equals), none when only one depth was measured; the one
        the module runs at (`now`) first, as it needs no settling forward, else the one
        kept now last."""
        if len(self.measured) < 2:  # no choice to confirm
            return []
        kept = self._fastest()
        others = sorted(
            (p for p in self.measured if p != kept), key=lambda p: (self.measured[p], p)
        )
        chosen = [*others[: CONFIRMED - 1][::-1], kept]
        return sorted(chosen, key=lambda p: p != now)

    def _moved(self, schedule: Schedule) -> bool:
        """Whether the module's watermark or disturbed()'s count changed since this was
        last asked; records both for the next asking."""
        now, count = schedule.vbar.watermark_bytes, self.disturbances
        moved = now != self.watermark or count != self.seen
        self.watermark, self.seen = now, count
        return moved

    def disturbed(self) -> None:
        """The module's memory changed (paused and resumed, its budget grown; from any
        thread): in the middle of the trials, the forward running (if any) is not
        compared, and the next one settles again."""
        self.disturbances += 1

    def stop(self, schedule: Schedule, error: BaseException) -> None:
        """The trials failed (a bookkeeping error, not the forward's): they end here, the
        module running on at its depth, and a warning says why."""
        self.done = True
        self.settling = False
        _log.warning(
            "aimdo: offload on device %s keeps prefetch %d: choosing it failed (%s)",
            self.device,
            schedule.prefetch,
            error,
        )

    def _give_up(self, schedule: Schedule) -> None:
        """End the trials after FAILED_LIMIT failed forwards, back at the depth measured
        fastest, or START when none was."""
        depth = self._fastest() if self.measured else START
        self._end_at(schedule, depth)
        _log.warning(
            "aimdo: offload on device %s keeps prefetch %d: %d forwards of its trials failed "
            "one after another (at prefetch %s)",
            self.device,
            depth,
            self.failures,
            self.trying,
        )
        # The deepest depth tried (measured, or failing now): measuring the fastest again
        # may fail at a shallower one than the sweep reached.
        tried = [*self.measured, *([self.trying] if self.trying is not None else [])]
        if self.grow is not None and tried and depth < max(tried):
            self.grow()  # the deeper depth's staging took residency: let it grow back

    def _end_at(self, schedule: Schedule, depth: int) -> None:
        """End the trials, the module running on at `depth` from its next forward."""
        self.done = True
        self.settling = False
        if depth != schedule.prefetch:
            schedule.set_prefetch(depth, self.staging_for(schedule, depth))

    def _not_compared(self, schedule: Schedule) -> None:
        self.not_compared += 1
        if self.not_compared >= NOT_COMPARED_LIMIT:
            self._finish(
                schedule, f"{self.not_compared} forwards were disturbed or unlike the one before"
            )

    def _fastest(self) -> int:
        """The depth measured fastest: the shallowest within MARGIN of the fastest."""
        best = min(self.measured.values())
        return min(p for p, s in self.measured.items() if s <= best * (1 + MARGIN))

    def _try(self, schedule: Schedule, prefetch: int) -> None:
        """Run the next forwards at `prefetch`: one to settle (when it is a change), then
        one measured. Shallower than the depth it runs at (a depth measured again after a
        deeper one, or a first trial shallower than START), the residency the deeper
        staging took grows back first (grow: the budget polled afresh as the settling
        forward ends, the watermark raised into the room when it holds the next block, and
        the forward after it settles again, filling it), so that each depth is measured at
        the residency its own staging leaves. Measured again at the deeper one's, the
        synthetic 35 GiB model's depths took 8-35 ms longer than at their first measurement
        on an H200 (23-58 ms at host_limit 0; all pinned, 0.78 GiB less resident:
        benchmarks/RESULTS.md, twelfth session)."""
        if prefetch != schedule.prefetch:
            shallower = prefetch < schedule.prefetch
            schedule.set_prefetch(prefetch, self.staging_for(schedule, prefetch))
            self.settling = True
            if shallower and self.grow is not None:
                self.grow()
        self.trying = prefetch

    def _finish(self, schedule: Schedule, why: str | None) -> None:
        """Keep the depth measured fastest (or, none measured, the one it runs at), and
        let the module's residency grow back into what the deeper depths' staging took."""
        if not self.measured:
            self._end_at(schedule, schedule.prefetch)
            _log.info(
                "aimdo: offload on device %s keeps prefetch %d, none measured: %s",
                self.device,
                schedule.prefetch,
                why,
            )
            return
        chosen = self._fastest()
        self._end_at(schedule, chosen)
        _log.info(
            "aimdo: offload on device %s keeps prefetch %d, measured %.1f ms a forward "
            "(tried %s)%s",
            self.device,
            chosen,
            self.measured[chosen] * 1000,
            self._tried(),
            f"; {why}" if why else "",
        )
        if self.grow is not None and chosen < max(self.measured):
            self.grow()  # the deeper depths' staging took residency: let it grow back

    def _tried(self) -> str:
        """The measurements of each depth tried, for the log: "2: 441.5 ms, 3: 432.6 and
        440.1 ms", in the order first measured."""
        each: dict = {}
        for prefetch, seconds in self.trials:
            each.setdefault(prefetch, []).append(f"{seconds * 1000:.1f}")
        return ", ".join(f"{p}: {' and '.join(times)} ms" for p, times in each.items())

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
        index = {id(block): i for i, block in enumerate(order)}
        first = [index[id(block)] for block in self.first if id(block) in index]
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
                    first=first,
                )
            predicted[prefetch] = steps[-1].seconds
        best = min(predicted.values())
        chosen = min(p for p, s in predicted.items() if s <= best * (1 + MARGIN))
        self.predicted = predicted
        _log.info(
            "aimdo: offload on device %s predicts prefetch %d fastest, %.1f ms a forward "
            "(%s), from the compute of its blocks timed in one forward (%.1f ms); it tries "
            "it and deeper depths for real, one forward each, then the two fastest again",
            self.device,
            chosen,
            predicted[chosen] * 1000,
            ", ".join(f"{p}: {s * 1000:.1f} ms" for p, s in predicted.items()),
            sum(times) * 1000,
        )
        return chosen
