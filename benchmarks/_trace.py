"""Where a step's time goes on the GPU: one step under torch.profiler, its trace saved, and
the compute stream's idle gaps split by what the copy stream was doing meanwhile.

A gap in the compute stream while a host-to-device copy runs is compute waiting on a copy
(a stall the prefetch did not hide); a gap with the copy stream idle too is the host, a
synchronisation, or a copy that waited on a buffer. Used by benchmarks.real_models --trace.
"""

from __future__ import annotations

import gzip
import json

import torch


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _busy_within(busy: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in busy)


def summarize(events: list[dict], top: int = 12) -> dict:
    """The GPU side of a chrome trace (`events`: its traceEvents): per-stream busy time, the
    compute stream's gaps and how much of each the copy stream was busy, the largest gaps
    with the kernels around them and the CPU op that launched the next one."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    streams: dict[int, list[dict]] = {}
    for e in gpu:
        streams.setdefault(e["args"].get("stream", -1), []).append(e)
    compute = max(streams, key=lambda s: sum(e["cat"] == "kernel" for e in streams[s]))
    copies = [
        e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e.get("name", "") + str(e["args"])
    ]
    copy_busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in copies])
    ops = {  # kineto links a kernel to the op that launched it by "External id"
        e["args"]["External id"]: e
        for e in events
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
    }
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    ordered = sorted(streams[compute], key=lambda e: e["ts"])
    span_start = min(e["ts"] for e in gpu)
    span_end = max(e["ts"] + e["dur"] for e in gpu)
    gaps = []
    for before, after in zip(ordered, ordered[1:], strict=False):
        start, end = before["ts"] + before["dur"], after["ts"]
        if end - start > 1.0:
            gaps.append((end - start, start, end, before, after))
    busy = sum(b - a for a, b in _union([(e["ts"], e["ts"] + e["dur"]) for e in ordered]))
    stalled = sum(_busy_within(copy_busy, s, e) for _, s, e, _, _ in gaps)

    def label(event):
        corr = event["args"].get("correlation")
        launch = launches.get(corr)
        op = ops.get(event["args"].get("External id"))
        return {
            "kernel": event.get("name", "")[:80],
            "launch": launch.get("name") if launch else None,
            "op": op.get("name") if op else None,
            "shapes": op["args"].get("Input Dims") if op else None,
        }

    largest = sorted(gaps, key=lambda g: -g[0])[:top]
    return {
        "span_us": span_end - span_start,
        "compute_busy_us": busy,
        "copy_busy_us": sum(b - a for a, b in copy_busy),
        "copy_idle_us": (span_end - span_start) - sum(b - a for a, b in copy_busy),
        "copies": len(copies),
        "compute_gaps": len(gaps),
        "compute_idle_us": sum(g[0] for g in gaps),
        "compute_idle_copy_busy_us": stalled,
        "largest_gaps": [
            {
                "us": round(length, 1),
                "at_us": round(start - span_start, 1),
                "copy_busy_us": round(_busy_within(copy_busy, start, end), 1),
                "before": label(b),
                "after": label(a),
            }
            for length, start, end, b, a in largest
        ],
    }


def profile_step(run, model, device, path: str) -> dict:
    """One step of `run(model)` under the profiler (after a synchronisation, so only this
    step's work is in it); the trace goes to `path` (gzip JSON), the summary is returned."""
    torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        with torch.no_grad():
            run(model)
        torch.cuda.synchronize(device)
    raw = path + ".tmp.json"
    prof.export_chrome_trace(raw)
    with open(raw) as f:
        trace = json.load(f)
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    import os

    os.remove(raw)
    return summarize(trace.get("traceEvents", []))
