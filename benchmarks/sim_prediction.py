"""Simulator prediction (issue 6, item 5): the streaming and two-GPU runs predicted on the
simulator, calibrated with what the H100 runs measured, next to the measured step times.

    python -m benchmarks.sim_prediction [--streaming results/streaming-h100.json]
                                        [--two-gpu results/two_gpu_scaling-h100x2.json]
                                        [--page-churn results/page_churn-h100.json]

Calibration, all from the measured result files: each device's memory and the memory
others used on it (PyTorch's cache, which holds the activations and aimdo.torch's
staging buffers, and the CUDA context, as recorded at the end of each aimdo run), the
pinned host-to-device bandwidth (both GPUs copying at once for the two-GPU run), the
driver operations' costs (page churn), and the all-resident compute time of a step,
shared out among the layers by their weights (each layer is a matrix product over the
same tokens). No aimdo step time, residency or byte count goes in. The prediction is
aimdo.predict: the real core's faults, evictions and watermark on the simulator, in
OffloadedModule's schedule on the simulator's copy and compute engines.
"""

from __future__ import annotations

import argparse
import json

import aimdo
from aimdo.predict import predict_offload

from ._common import RESULTS, environment, median, write


def layer_bytes(blocks: int, hidden: int, element: int = 2) -> list[int]:
    """The weight bytes of streaming.Block's layers (qkv, proj, up, down) in run order."""
    one = [hidden * 3 * hidden, hidden * hidden, hidden * 4 * hidden, 4 * hidden * hidden]
    return [n * element for _ in range(blocks) for n in one]


def predict(
    sizes,
    compute: float,
    *,
    capacity: int,
    others: int,
    bandwidth: float,
    costs: dict,
    vram_limit: int,
    prefetch: int,
    spread: bool,
    steps: int = 3,
) -> dict:
    total = sum(sizes)
    seconds = [compute * n / total for n in sizes]
    sim = aimdo.SimBackend([{"capacity": capacity, "bandwidth": bandwidth}], costs=costs)
    sim.add_external_usage(0, others)
    with aimdo.Manager(sim, [0], vram_limit=vram_limit) as manager:
        predicted = predict_offload(
            manager, 0, sizes, seconds, steps=steps, prefetch=prefetch, spread=spread
        )
    last = predicted[-1]
    return {
        "step_seconds": last.seconds,
        "first_step_seconds": predicted[0].seconds,
        "hits": last.hits,
        "offloaded_layers": last.offloaded_layers,
        "bytes_copied": last.bytes_copied,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streaming", default=str(RESULTS / "streaming-h100.json"))
    parser.add_argument("--two-gpu", default=str(RESULTS / "two_gpu_scaling-h100x2.json"))
    parser.add_argument("--page-churn", default=str(RESULTS / "page_churn-h100.json"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with open(args.streaming) as f:
        streaming = json.load(f)
    with open(args.two_gpu) as f:
        two_gpu = json.load(f)
    with open(args.page_churn) as f:
        driver_us = json.load(f)["driver_us"]
    costs = {
        "cuMemCreate": driver_us["create"] / 1e6,
        "cuMemMap": driver_us["map"] / 1e6,
        "cuMemSetAccess": driver_us["set_access"] / 1e6,
        "cuMemUnmap": driver_us["unmap"] / 1e6,
        "cuMemRelease": driver_us["release"] / 1e6,
    }
    rows = []

    def row(label, measured, prediction, measured_run=None):
        error = prediction["step_seconds"] / measured - 1
        rows.append(
            {
                "configuration": label,
                "measured_seconds": measured,
                **prediction,
                "error": error,
                "measured_hits": (measured_run or {}).get("hits"),
                "measured_offloaded_layers": (measured_run or {}).get("offloaded_layers"),
            }
        )
        print(
            f"{label:<52} measured {measured * 1000:7.1f} ms  predicted "
            f"{prediction['step_seconds'] * 1000:7.1f} ms  ({error:+.1%}); predicted "
            f"{prediction['hits']} hits / {prediction['offloaded_layers']} offloaded"
            + (
                f", measured {measured_run['hits']} / {measured_run['offloaded_layers']}"
                if measured_run
                else ""
            )
        )

    # Item 3: one GPU, each configuration streaming.py ran.
    a = streaming["args"]
    sizes = layer_bytes(a["blocks"], a["hidden"])
    compute = min(streaming["runs"]["resident"]["step_seconds"][1:])
    for name, run in streaming["runs"].items():
        if not name.startswith("aimdo "):
            continue
        placement, prefetch = name.split()[1], int(name.split()[-1])
        prediction = predict(
            sizes,
            compute,
            capacity=run["total_bytes"],
            others=run["others_bytes"],
            bandwidth=streaming["pinned_h2d_bytes_per_s"],
            costs=costs,
            vram_limit=a["vram_limit"],
            prefetch=prefetch,
            spread=placement == "spread",
        )
        row(
            f"streaming, 1 GPU, {placement}, prefetch {prefetch}",
            run["median_step_seconds"],
            prediction,
            run,
        )

    # Item 4: one GPU at batch 2 and each GPU at batch 1, both copying at once.
    a = two_gpu["args"]
    sizes = layer_bytes(a["blocks"], a["hidden"])
    repeats = two_gpu["repeats"]
    gpu = {d: repeats[-1]["per_gpu"][d] for d in ("0", "1")}
    prediction = predict(
        sizes,
        two_gpu["compute_seconds"]["batch 2"],
        capacity=gpu["0"]["total_bytes"],
        others=gpu["0"]["others_bytes"],
        bandwidth=two_gpu["pinned_h2d_bytes_per_s"],
        costs=costs,
        vram_limit=a["vram_limit"],
        prefetch=a["prefetch"],
        spread=True,
    )
    row(
        "two-GPU run: 1 GPU, batch 2 (median of repeats)",
        median([r["one_gpu_batch2_step_seconds"] for r in repeats]),
        prediction,
    )
    for d in ("0", "1"):
        prediction = predict(
            sizes,
            two_gpu["compute_seconds"]["batch 1"],
            capacity=gpu[d]["total_bytes"],
            others=gpu[d]["others_bytes"],
            bandwidth=two_gpu["pinned_h2d_bytes_per_s_both_at_once"],
            costs=costs,
            vram_limit=a["vram_limit"],
            prefetch=a["prefetch"],
            spread=True,
        )
        row(
            f"two-GPU run: GPU {d}, batch 1, both copying",
            median([r["per_gpu"][d]["step_seconds"] for r in repeats]),
            prediction,
        )
    split = two_gpu["aimdo_layer_split"]
    half = len(sizes) // 2
    halves = [
        predict(
            part,
            two_gpu["compute_seconds"]["batch 2"] * sum(part) / sum(sizes),
            capacity=gpu["0"]["total_bytes"],
            others=gpu["0"]["others_bytes"],
            bandwidth=two_gpu["pinned_h2d_bytes_per_s"],
            costs=costs,
            vram_limit=a["vram_limit"],
            prefetch=a["prefetch"],
            spread=True,
        )
        for part in (sizes[:half], sizes[half:])
    ]
    combined = {
        "step_seconds": sum(h["step_seconds"] for h in halves),
        "first_step_seconds": sum(h["first_step_seconds"] for h in halves),
        "hits": sum(h["hits"] for h in halves),
        "offloaded_layers": sum(h["offloaded_layers"] for h in halves),
        "bytes_copied": sum(h["bytes_copied"] for h in halves),
    }
    row("two-GPU run: layers split, batch 2 through both", split["median_step_seconds"], combined)

    result = {
        "benchmark": "sim_prediction",
        "environment": environment(),
        "inputs": {
            "streaming": args.streaming,
            "two_gpu": args.two_gpu,
            "page_churn": args.page_churn,
        },
        "costs_seconds": costs,
        "rows": rows,
    }
    write("sim_prediction", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
