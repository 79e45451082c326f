"""Pictures of what aimdo holds and does (needs matplotlib: ``pip install 'aimdo[plot]'``).

- ``residency_map(manager)``: per device, each VBAR's pages in priority order, marked
  pinned, resident, not resident, or offloaded (above the watermark).
- ``overview(manager, timings)``: both, one above the other.
- ``timeline(timings)``: one timed forward per device (``Offload.last_timings``), a lane
  for the compute engine (each block's compute, and the stalls on copies marked) and one
  for the copies (coloured by where they read).

Both return a matplotlib Figure (made without pyplot: no global state, no window) and
save it when given a path. ``residency_runs`` gives the map's data without matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._sizes import format_size
from ._timings import ForwardTimings

#: Page states of a residency map, in drawing order, with their colours.
PAGE_STATES = {
    "pinned": "#1f4e79",  # resident and pinned: a block in use, or copied from by a peer
    "resident": "#5b9bd5",
    "not resident": "#d9d9d9",  # under the watermark: mapped when next faulted
    "offloaded": "#ffffff",  # at or above the watermark: streamed through staging
}
LANE_COLOURS = {"compute": "#5b9bd5", "stall": "#c00000"}
SOURCE_COLOURS = {"host": "#70ad47", "peer": "#7030a0", "file": "#ed7d31"}


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "aimdo.plot needs matplotlib: pip install 'aimdo[plot]' (or matplotlib)"
        ) from error
    return Figure(figsize=(width, height), layout="constrained")


def residency_runs(manager, device: int) -> list[dict]:
    """Per VBAR of `device`, most important first: its size and watermark and its pages
    as runs, [(state, first page, page count), ...] in page order, state one of
    PAGE_STATES."""
    out = []
    for vbar in manager.vbars(device):
        pages = vbar.residency()
        watermark = -(-vbar.watermark_bytes // vbar.page_size_bytes)
        runs: list = []
        for index, (resident, pinned) in enumerate(pages):
            if pinned:
                state = "pinned"
            elif resident:
                state = "resident"
            elif index >= watermark:
                state = "offloaded"
            else:
                state = "not resident"
            if runs and runs[-1][0] == state:
                runs[-1] = (state, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((state, index, 1))
        out.append(
            {
                "vbar": vbar,
                "size_bytes": vbar.size_bytes,
                "page_size_bytes": vbar.page_size_bytes,
                "watermark_bytes": vbar.watermark_bytes,
                "runs": runs,
            }
        )
    return out


def _label(vbar, labels) -> str | None:
    if not labels:
        return None
    for key, text in labels.items():
        if key is vbar or getattr(key, "vbar", None) is vbar:
            return text
    return None


def residency_map(manager, path=None, *, devices=None, labels: Mapping | None = None):
    """The pages of every VBAR on `devices` (default: all the Manager's), a row each,
    most important first; `labels` names VBARs (keys: a Vbar, or an aimdo.torch Offload).
    Saved to `path` when given; returns the Figure."""
    rows = _rows(manager, devices)
    figure = _figure(10, 1.2 + 0.45 * _row_count(rows))
    _draw_residency(figure, manager, rows, labels)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def _row_count(rows) -> int:
    return sum(max(1, len(r)) for r in rows.values())


def _draw_residency(figure, manager, rows, labels) -> None:
    axes = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (device, vbars) in zip(axes, rows.items(), strict=True):
        for row, entry in enumerate(vbars):
            for state, first, pages in entry["runs"]:
                ax.broken_barh(
                    [(first, pages)],
                    (row - 0.4, 0.8),
                    facecolors=PAGE_STATES[state],
                    edgecolors="#7f7f7f",
                    linewidth=0.3,
                )
        names = []
        for index, entry in enumerate(vbars):
            name = _label(entry["vbar"], labels) or f"VBAR {index}"
            names.append(f"{name}\n{format_size(entry['size_bytes'])}")
        ax.set_yticks(range(len(vbars)), names)
        ax.set_ylim(len(vbars) - 0.5 if vbars else 0.5, -0.5)
        widest = max((sum(r[2] for r in e["runs"]) for e in vbars), default=1)
        ax.set_xlim(0, max(widest, 1))
        ax.set_xlabel(f"page ({format_size(vbars[0]['page_size_bytes'])})" if vbars else "page")
        ax.set_title(
            f"device {device}: {format_size(manager.resident_bytes(device))} resident of "
            f"{format_size(manager.budget_bytes(device))} budget",
            loc="left",
            fontsize=10,
        )
    _legend(figure, PAGE_STATES)


def _legend(figure, colours: Mapping[str, str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="#7f7f7f", label=name) for name, c in colours.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)


def timeline(timings, path=None, *, title: str | None = None):
    """One timed forward per row pair (`timings`: a ForwardTimings, or a mapping of
    labels, such as "device 0", to one each): the compute engine's lane, each block's
    compute with the stalls on its copies in red, and the copies' lane coloured by
    source. Milliseconds from each forward's start. Saved to `path` when given; returns
    the Figure."""
    timings = _named(timings)
    figure = _figure(10, 1.0 + 1.1 * len(timings))
    _draw_timeline(figure, timings, title)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def overview(manager, timings, path=None, *, devices=None, labels: Mapping | None = None):
    """The residency map above the timeline, in one Figure (``python -m aimdo demo
    --plot``). Saved to `path` when given; returns the Figure."""
    timings = _named(timings)
    rows = _rows(manager, devices)
    top, bottom = 1.2 + 0.45 * _row_count(rows), 1.0 + 1.1 * len(timings)
    figure = _figure(10, top + bottom)
    upper, lower = figure.subfigures(2, 1, height_ratios=[top, bottom])
    _draw_residency(upper, manager, rows, labels)
    _draw_timeline(lower, timings, None)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def _named(timings) -> Mapping:
    """`timings` as a mapping of labels to ForwardTimings; TypeError or ValueError for
    anything else (None is what Offload.last_timings gives when nothing was timed)."""
    named = timings if isinstance(timings, Mapping) else {"forward": timings}
    if not named:
        raise ValueError("nothing to draw: no timed forward given")
    for label, forward in named.items():
        if not isinstance(forward, ForwardTimings):
            raise TypeError(
                f"{label!r}: a timeline draws aimdo.torch.ForwardTimings (Offload.last_timings "
                f"of a timed forward: offload(timings=True)), not {type(forward).__name__}"
            )
    return named


def _rows(manager, devices) -> dict:
    devices = list(manager.devices if devices is None else devices)
    if not devices:
        raise ValueError("nothing to draw: no device given")
    return {device: residency_runs(manager, device) for device in devices}


def _draw_timeline(figure, timings: Mapping, title: str | None) -> None:
    ax = figure.subplots()
    ticks, names = [], []
    for index, (label, forward) in enumerate(timings.items()):
        compute_row, copy_row = 2 * index, 2 * index + 1
        for span in forward.spans:
            start, width = span.start * 1000, (span.end - span.start) * 1000
            if span.lane == "copy":
                row, colour = copy_row, SOURCE_COLOURS.get(span.source, "#a5a5a5")
            else:
                row, colour = compute_row, LANE_COLOURS[span.lane]
            ax.broken_barh(
                [(start, width)],
                (row - 0.4, 0.8),
                facecolors=colour,
                edgecolors="white",
                linewidth=0.2,
            )
        ticks += [compute_row, copy_row]
        stalled = forward.stall_seconds * 1000
        names += [f"{label}: compute\n(stalled {stalled:.1f} ms)", f"{label}: copies"]
    ax.set_yticks(ticks, names)
    ax.set_ylim(2 * len(timings) - 0.5, -0.5)
    ax.set_xlabel("ms from the forward's start")
    longest = max((f.seconds for f in timings.values()), default=0.0)
    ax.set_xlim(min([0.0] + [s.start * 1000 for f in timings.values() for s in f.spans]), None)
    ax.set_title(title or f"one forward ({longest * 1000:.1f} ms)", loc="left", fontsize=10)
    _legend(figure, {**LANE_COLOURS, **{f"copy from {k}": c for k, c in SOURCE_COLOURS.items()}})
