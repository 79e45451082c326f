"""The Qwen-Image transformer on two GPUs (issue 13), built as benchmarks.real_models builds
it: the guidance split with ``aimdo.torch.offload_group`` (a thread per GPU, batch 1
each, the peer tier on) against one GPU at batch 2 with the same per-GPU limit and against
accelerate's placement of the layers over both GPUs; and donor mode (GPU 0 computing at a
small limit, GPU 1 holding what it lacks) against GPU 0 alone at that limit. One run.

    python -m benchmarks.real_models_two_gpus [--vram-limit 24GiB] [--donor-limit 8GiB]
        [--steps 4] [--baselines dispatch]
    python -m benchmarks.real_models_two_gpus --tiny   # tiny config, CPU simulator

Floors: the split's is max(compute of one batch-1 call, bytes from the peer / peer
bandwidth, bytes from the host / host bandwidth); one GPU's and the donor's, max(compute
at batch 2, bytes from the host / host bandwidth, bytes from the peer / peer bandwidth).
Outputs are compared with the all-resident ones: the split's halves with batch-1 calls,
batch 2 with batch 2.
"""

from __future__ import annotations

import argparse

import aimdo
import aimdo.torch as atorch
import torch

from ._common import environment, steady_median, write
from .peer_split import peer_bandwidth, split
from .real_models import QWEN_HALF_SEEDS, qwen_image, qwen_inputs, rss_bytes, weight_bytes
from .streaming import pinned_bandwidth, time_steps

GiB = 1 << 30


def split_steps(group, model, tiny, devices, steps: int):
    """Each GPU runs its guidance half in a thread of its own, `steps` times."""
    halves = [
        qwen_inputs(tiny, model, 1, seed, device)
        for seed, device in zip(QWEN_HALF_SEEDS, devices, strict=True)
    ]
    calls = [
        lambda i=i, kwargs=kwargs: group[i](**kwargs, return_dict=True).sample
        for i, kwargs in enumerate(halves)
    ]
    return split(calls, devices, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=24 * GiB)
    parser.add_argument("--donor-limit", type=aimdo.parse_size, default=8 * GiB)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--baseline-steps", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--baselines", default="dispatch")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.vram_limit, args.donor_limit, args.steps = 8 << 20, 4 << 20, 3
    devices = [torch.device("cpu")] * 2 if args.tiny else [torch.device("cuda", d) for d in (0, 1)]
    model, forms = qwen_image(args.tiny, devices[0])
    compute, reference = {}, {}
    for name, run in forms.items():
        times, out = time_steps(run, model, 3, devices[0])
        compute[name] = min(times[1:])
        reference[name] = out.float().cpu()
    compute["one batch-1 call"] = compute["guidance as two batch-1 calls"] / 2
    model.to("cpu")
    if not args.tiny:
        torch.cuda.empty_cache()
    host = 50e9 if args.tiny else pinned_bandwidth(devices[0])
    peer = 390e9 if args.tiny else peer_bandwidth()
    result = {
        "benchmark": "real_models_two_gpus",
        "environment": environment(),
        "args": vars(args),
        "weight_bytes": weight_bytes(model),
        "compute_seconds": compute,
        "host_bytes_per_s": host,
        "peer_bytes_per_s": peer,
        "runs": {},
    }
    print(
        f"qwen-image: {weight_bytes(model) / GiB:.2f} GiB; all resident: batch 2 "
        f"{compute['guidance as batch 2'] * 1000:.1f} ms, one batch-1 call "
        f"{compute['one batch-1 call'] * 1000:.1f} ms; host {host / 1e9:.1f} GB/s, peer "
        f"{peer / 1e9:.1f} GB/s",
        flush=True,
    )
    backend = (
        aimdo.SimBackend("2x1GiB", real_bytes=True, topology="h200-nvlink") if args.tiny else "cuda"
    )
    page = {"page_size": 2 << 20, "headroom": 0} if args.tiny else {}
    batch2 = forms["guidance as batch 2"]

    def floor(base, copied, from_peers):
        return max(base, (copied - from_peers) / host, from_peers / peer)

    def record(name, step, base, stats, identical, extra=None):
        copied = sum(s.bytes_copied for s in stats)
        from_peers = sum(s.bytes_from_peers for s in stats)
        worst = max(floor(base, s.bytes_copied, s.bytes_from_peers) for s in stats)
        result["runs"][name] = {
            "median_step_seconds": step,
            "floor_seconds": worst,
            "of_floor": worst / step,
            "bytes_copied": copied,
            "bytes_from_peers": from_peers,
            "identical": identical,
            **(extra or {}),
        }
        print(
            f"  {name}: {step * 1000:.1f} ms, floor {worst * 1000:.1f} ms ({worst / step:.0%}); "
            f"{from_peers / GiB:.2f} of {copied / GiB:.2f} GiB from the peer; identical: "
            f"{identical}",
            flush=True,
        )

    limits = {0: args.vram_limit, 1: args.vram_limit}
    with aimdo.Manager(backend, [0, 1], vram_limit=limits, **page) as manager:
        with atorch.offload(model, 0, manager=manager, prefetch=args.prefetch) as one:
            times, out = time_steps(batch2, model, args.steps, devices[0])
            identical = torch.equal(out.float().cpu(), reference["guidance as batch 2"])
            record(
                "one GPU, batch 2",
                steady_median(times),
                compute["guidance as batch 2"],
                [one.last_stats],
                identical,
            )
        with atorch.offload_group(model, [0, 1], manager=manager, prefetch=args.prefetch) as group:
            times2, outs = split_steps(group, model, args.tiny, devices, args.steps)
            stats = group.last_stats
            rss, pinned = rss_bytes(), group.pinned_bytes
        step = max(steady_median(times2[0]), steady_median(times2[1]))
        both = torch.cat([outs[0].float().cpu(), outs[1].float().cpu()])
        record(
            "two GPUs, guidance split, offload_group",
            step,
            compute["one batch-1 call"],
            stats,
            torch.equal(both, reference["guidance as two batch-1 calls"]),
            {"pinned_bytes": pinned, "rss_bytes": rss},
        )
    limits = {0: args.donor_limit, 1: args.vram_limit}
    with aimdo.Manager(backend, [0, 1], vram_limit=limits, **page) as manager:
        with atorch.offload(model, 0, manager=manager, prefetch=args.prefetch) as alone:
            times, out = time_steps(batch2, model, args.steps, devices[0])
            identical = torch.equal(out.float().cpu(), reference["guidance as batch 2"])
            record(
                f"GPU 0 alone at {args.donor_limit / GiB:g} GiB, batch 2",
                steady_median(times),
                compute["guidance as batch 2"],
                [alone.last_stats],
                identical,
            )
        with atorch.offload_group(
            model, [0, 1], manager=manager, prefetch=args.prefetch, donors=[1]
        ) as group:
            times, out = time_steps(batch2, model, args.steps, devices[0])
            identical = torch.equal(out.float().cpu(), reference["guidance as batch 2"])
            record(
                f"GPU 0 at {args.donor_limit / GiB:g} GiB, GPU 1 as donor, batch 2",
                steady_median(times),
                compute["guidance as batch 2"],
                [group.last_stats[0]],
                identical,
            )
    if "dispatch" in args.baselines.split(",") and not args.tiny:
        import copy

        from accelerate import dispatch_model, infer_auto_device_map

        replica = copy.deepcopy(model)
        device_map = infer_auto_device_map(
            replica,
            max_memory={0: args.vram_limit, 1: args.vram_limit, "cpu": 1 << 40},
            no_split_module_classes=getattr(replica, "_no_split_modules", None),
        )
        replica = dispatch_model(replica, device_map=device_map)
        times, _ = time_steps(batch2, replica, args.baseline_steps, devices[0])
        step = steady_median(times)
        result["runs"]["accelerate dispatch_model over both GPUs, batch 2"] = {
            "median_step_seconds": step
        }
        print(f"  accelerate dispatch_model over both GPUs, batch 2: {step * 1000:.1f} ms")
        del replica
    write("real_models_two_gpus", result, args.out, keep=not args.tiny)
    return 0 if all(run.get("identical", True) for run in result["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
