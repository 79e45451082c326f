"""Timings of one forward of an offloaded module (docs/design.md §6.2b): per block, the
bytes its copy moved and where from, the copy's time, its compute and the exposed stall
(the compute engine waiting for the copy); per forward, their sums. Built from the marks
the schedule records on the compute engine (Schedule.marks) and the copies' own marks,
once asked for: on CUDA every mark is an event, read only then. Imports no backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._schedule import mark_stretches, use_seconds
from ._sizes import format_size

#: Where a copy read the weights from (BlockTiming.source).
SOURCES = ("host", "peer", "file")


@dataclass(frozen=True)
class BlockTiming:
    """One block of weights (one module's) in one forward."""

    name: str  # the module owning the weights ("" for the root module)
    nbytes: int
    uses: int  # times it ran this forward (tied weights, a module called twice)
    bytes_copied: int  # copied in this forward (0: found in place every use)
    source: str | None  # where its last copy read: "host", "peer", "file"; None: no copy
    copy_seconds: float  # the copies' time on the engine that ran them
    compute_seconds: float  # its uses' compute, copies left out (see use_seconds)
    stall_seconds: float  # the compute engine waiting for its weights (an exposed copy)


@dataclass(frozen=True)
class TimedSpan:
    """One stretch of one lane of a timed forward (for a timeline): the compute engine
    running a block ("compute") or waiting for its weights ("stall"), or a copy ("copy",
    with its source). Seconds from the forward's start on the forward's clock (a copy
    queued ahead may start before it)."""

    lane: str
    name: str  # the block's module ("" for the root module's own compute)
    start: float
    end: float
    source: str | None = None


@dataclass(frozen=True)
class ForwardTimings:
    """One forward of an offloaded module, timed (Offload.last_timings)."""

    seconds: float  # the forward on the compute engine, from its start to its end
    compute_seconds: float  # the blocks' compute (sums to seconds with the stall)
    stall_seconds: float  # compute waiting for copies: what the copies cost the forward
    copy_seconds: float  # copy work, overlapped with the compute or not
    bytes_from_host: int
    bytes_from_peers: int
    bytes_from_files: int
    clock: str  # "cuda events", or "host clock" where the compute runs on the CPU
    blocks: tuple[BlockTiming, ...]  # in the order of their first use
    spans: tuple[TimedSpan, ...] = ()  # the compute engine's, then the copies', in time order

    @property
    def bytes_copied(self) -> int:
        return self.bytes_from_host + self.bytes_from_peers + self.bytes_from_files

    def as_dict(self) -> dict:
        """Plain values (for JSON)."""
        out = asdict(self)
        out["bytes_copied"] = self.bytes_copied
        return out

    def table(self, top: int | None = 10) -> str:
        """A text summary: the forward's totals, then the `top` blocks by stall and copy
        time (every block when None)."""
        ms = 1000.0
        lines = [
            f"forward {self.seconds * ms:.2f} ms ({self.clock}): compute "
            f"{self.compute_seconds * ms:.2f} ms, stalled on copies "
            f"{self.stall_seconds * ms:.2f} ms; copies {self.copy_seconds * ms:.2f} ms moving "
            f"{format_size(self.bytes_copied)} (host {format_size(self.bytes_from_host)}, "
            f"peers {format_size(self.bytes_from_peers)}, files "
            f"{format_size(self.bytes_from_files)})"
        ]
        ranked = sorted(self.blocks, key=lambda b: (b.stall_seconds, b.copy_seconds), reverse=True)
        shown = ranked if top is None else ranked[:top]
        if shown:
            lines.append(
                f"{'block':<40} {'size':>10} {'copied':>10} {'from':>5} {'copy ms':>8} "
                f"{'compute ms':>10} {'stall ms':>8}"
            )
        for b in shown:
            name = b.name or "(root)"
            lines.append(
                f"{name[-40:]:<40} {format_size(b.nbytes):>10} {format_size(b.bytes_copied):>10} "
                f"{b.source or '-':>5} {b.copy_seconds * ms:>8.2f} {b.compute_seconds * ms:>10.2f} "
                f"{b.stall_seconds * ms:>8.2f}"
            )
        if top is not None and len(ranked) > top:
            lines.append(f"... and {len(ranked) - top} more blocks")
        return "\n".join(lines)


class Recorded:
    """What one timed forward left: the schedule's marks (starting with "start" and ending
    with "end"), the copies' marks (block, source, bytes, start mark, end mark) and the
    executor's `elapsed`. Turned into ForwardTimings once (reading CUDA events waits for
    them, so that happens when the timings are asked for, not in the forward)."""

    def __init__(self, marks: list, copies: list, elapsed, clock: str):
        self.marks = marks
        self.copies = copies
        self.elapsed = elapsed
        self.clock = clock
        self._timings = None

    def timings(self) -> ForwardTimings:
        if self._timings is None:
            self._timings = self._build()
            self.marks = self.copies = self.elapsed = None  # the events can go
        return self._timings

    def _build(self) -> ForwardTimings:
        marks, elapsed = self.marks, self.elapsed
        # Every mark as seconds from the forward's start, read once.
        origin = marks[0][2]
        timed = [("start", None, 0.0)]
        timed += [(what, block, elapsed(origin, mark)) for what, block, mark in marks[1:]]
        rows: dict = {}  # block -> [uses, copied, source, copy, compute, stall]

        def row(block):
            found = rows.get(block)
            if found is None:
                found = rows[block] = [0, 0, None, 0.0, 0.0, 0.0]
            return found

        for block, seconds in use_seconds(timed, _after):
            r = row(block)
            r[0] += 1
            r[4] += seconds
        spans = _compute_spans(timed)
        for span in spans:
            if span.lane == "stall":
                row(span.block)[5] += span.end - span.start
        by_source = dict.fromkeys(SOURCES, 0)
        copy_seconds = 0.0
        for block, source, nbytes, start, end in self.copies:
            if hasattr(start, "result"):  # made in the background: its marks came later
                try:
                    _, start, end = start.result()
                except Exception:  # noqa: BLE001 - it failed (the forward said so): no time
                    continue
            r = row(block)
            began, ended = elapsed(origin, start), elapsed(origin, end)
            r[1] += nbytes
            r[2] = source
            r[3] += ended - began
            by_source[source] += nbytes
            copy_seconds += ended - began
            spans.append(Span("copy", block, began, ended, source))
        blocks = tuple(
            BlockTiming(block.name, block.nbytes, r[0], r[1], r[2], r[3], r[4], r[5])
            for block, r in rows.items()
        )
        return ForwardTimings(
            seconds=timed[-1][2],
            compute_seconds=sum(b.compute_seconds for b in blocks),
            stall_seconds=sum(b.stall_seconds for b in blocks),
            copy_seconds=copy_seconds,
            bytes_from_host=by_source["host"],
            bytes_from_peers=by_source["peer"],
            bytes_from_files=by_source["file"],
            clock=self.clock,
            blocks=blocks,
            spans=tuple(span.named() for span in spans),
        )


def _after(first: float, second: float) -> float:
    return second - first


def _compute_spans(timed) -> list:
    """The compute engine's stretches (see mark_stretches) from marks in seconds, as
    Spans, neighbours of one lane and block merged; compute before the first use counts
    for the first use's block, as use_seconds counts it."""
    stretches = [s for s in mark_stretches(timed, []) if s[4] > s[3]]
    first = next((block for _, block, _, _, _ in stretches if block is not None), None)
    spans = []
    for lane, block, _, began, ended in stretches:
        if block is None:
            block = first
        previous = spans[-1] if spans else None
        if previous and previous.lane == lane and previous.block is block:
            previous.end = ended
        else:
            spans.append(Span(lane, block, began, ended))
    return spans


class Span:
    """One stretch of a lane while it is built: `block` is the schedule's (named() gives
    the TimedSpan kept)."""

    __slots__ = ("lane", "block", "start", "end", "source")

    def __init__(self, lane: str, block, start: float, end: float, source: str | None = None):
        self.lane, self.block, self.start, self.end, self.source = lane, block, start, end, source

    def named(self) -> TimedSpan:
        name = "" if self.block is None else self.block.name
        return TimedSpan(self.lane, name, self.start, self.end, self.source)
