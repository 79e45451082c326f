"""The regimes of a two-GPU step, predicted on the simulator (``aimdo.predict.rank_regimes``),
next to what ``benchmarks.peer_split`` measured on GPUs (issue 13).

    python -m benchmarks.regimes [--measured results/peer_split-h200x2-b476ce1.json]

For the measured run: the same model (the streaming benchmark's 60 blocks of hidden 5120
in bf16), limit, bandwidths and compute times, the simulator's H200 NVLink topology with
the measured host and peer bandwidths, and the memory others used on each GPU in the
streaming run on that machine kind (2.37 GiB: CUDA context, activations, staging;
RESULTS.md). Then the same model on two RTX 4090s (``rtx4090-pcie``: x8/x8, no P2P; and
``rtx4090-pcie-shared``), with the H200's compute times scaled by 790 / 165: the H200's
measured bf16 matrix rate (docs/measurements.md) over the 4090's dense bf16 tensor
rate with fp32 accumulation (165.2 TFLOP/s, NVIDIA Ada GPU architecture whitepaper).
Each compute time is spread over the layers by their bytes (a linear layer's work).
"""

from __future__ import annotations

import argparse
import json
import os

import aimdo
from aimdo.predict import rank_regimes

from ._common import environment, write

GiB = 1 << 30
OTHERS_BYTES = int(2.37 * GiB)
H200_OVER_4090 = 790 / 165.2


def layer_bytes(blocks: int, hidden: int) -> list[int]:
    layer = [hidden * 3 * hidden * 2, hidden * hidden * 2, hidden * 4 * hidden * 2]
    layer.append(4 * hidden * hidden * 2)
    return layer * blocks


def spread(seconds: float, sizes: list[int]) -> list[float]:
    total = sum(sizes)
    return [seconds * n / total for n in sizes]


def predict(devices_spec, topology, limit: int, sizes, full, half) -> list[dict]:
    sim = aimdo.SimBackend(devices_spec, topology=topology)
    with aimdo.Manager(sim, [0, 1], vram_limit=limit) as manager:
        for device in (0, 1):
            sim.add_external_usage(device, OTHERS_BYTES)
        regimes = rank_regimes(manager, [0, 1], sizes, full, half)
    return [{"name": r.name, "seconds": r.seconds, "detail": r.detail} for r in regimes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(__file__)
    parser.add_argument(
        "--measured", default=os.path.join(here, "results", "peer_split-h200x2-b476ce1.json")
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with open(args.measured) as f:
        measured = json.load(f)
    run = measured["args"]
    sizes = layer_bytes(run["blocks"], run["hidden"])
    b2, b1 = measured["compute_seconds"]["batch 2"], measured["compute_seconds"]["batch 1"]
    host, peer = measured["host_bytes_per_s_both_at_once"], measured["peer_bytes_per_s"]
    h200 = [{"capacity": "141GiB", "bandwidth": host}] * 2
    nvlink = {"peers": [[None, {"bandwidth": peer, "latency": 2e-6}], [{"bandwidth": peer}, None]]}
    result = {"benchmark": "regimes", "environment": environment(), "measured": args.measured}
    result["h200-nvlink"] = predict(
        h200, nvlink, run["vram_limit"], sizes, spread(b2, sizes), spread(b1, sizes)
    )
    names = {
        "one device": "one GPU, batch 2",
        "split with peers": "two GPUs, guidance split, peers on",
        "split from the host": "two GPUs, guidance split, peers off",
    }
    print("two H200s over NVLink (measured on GPUs where a run exists):")
    for regime in result["h200-nvlink"]:
        line = f"  {regime['name']}: predicted {regime['seconds'] * 1000:.1f} ms"
        name = names.get(regime["name"])
        if name in measured["runs"]:
            actual = measured["runs"][name]["median_step_seconds"]
            regime["measured_seconds"] = actual
            line += f", measured {actual * 1000:.1f} ms ({regime['seconds'] / actual - 1:+.1%})"
        print(line + f"; {regime['detail']}")
    for preset in ("rtx4090-pcie", "rtx4090-pcie-shared"):
        full = spread(b2 * H200_OVER_4090, sizes)
        half = spread(b1 * H200_OVER_4090, sizes)
        result[preset] = predict("2x24GiB", preset, 24 * GiB, sizes, full, half)
        one = next(r["seconds"] for r in result[preset] if r["name"] == "one device")
        print(f"two RTX 4090s, {preset} (predicted):")
        for regime in result[preset]:
            print(
                f"  {regime['name']}: {regime['seconds'] * 1000:.1f} ms "
                f"({one / regime['seconds']:.2f}x one GPU); {regime['detail']}"
            )
    write("regimes", result, args.out, keep=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
