"""Two GPUs, one model, the peer tier (issue 13): classifier-free guidance split across two
GPUs (a thread each, batch 1) with ``aimdo.torch.offload_group``, each GPU copying what it
lacks from the other's resident pages, against one GPU at batch 2 with the same per-GPU
limit, against the same split with peers off (every copy from the host), and (with
``--accelerate``) against accelerate's placement of the layers over both GPUs with the same
per-GPU limit, batch 2 through both in turn. One run.

    python -m benchmarks.peer_split [--blocks 60] [--hidden 5120] [--tokens 2048]
                                    [--vram-limit 24GiB] [--steps 10] [--accelerate]
    python -m benchmarks.peer_split --tiny    # CPU simulator (two H200s over NVLink)

The floor of a split step is max(compute at batch 1, bytes from the peer / peer bandwidth,
bytes from the host / host bandwidth with both GPUs copying); of one GPU at batch 2,
max(compute at batch 2, bytes copied / host bandwidth).
"""

from __future__ import annotations

import argparse
import threading
import time

import aimdo
import aimdo.torch as atorch
import torch
from aimdo._torch_group import CALLS_BEFORE_CHOICE

from ._common import environment, steady_median, write
from .streaming import build, dispatch_with_accelerate, pinned_bandwidth, sync, to_host
from .two_gpu_scaling import concurrent_bandwidth


def peer_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of a copy from GPU 0's memory to GPU 1's (five copies)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    dst.copy_(src)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return 5 * nbytes / (time.perf_counter() - start)


def compute_time(made, x, device) -> float:
    with torch.no_grad():
        for _ in range(2):
            made(x.to(device))
        sync(device)
        start = time.perf_counter()
        made(x.to(device))
        sync(device)
    return time.perf_counter() - start


def split(calls, devices, steps: int):
    """Device i runs `calls[i]()` (one step of its half) `steps` times in a thread of its
    own, each step timed between two synchronizations: per-device step times and the
    last outputs. The first failure of any thread is raised once all have ended."""
    times, outs, errors = {i: [] for i in range(len(calls))}, {}, []

    def run(index):
        try:
            device = devices[index]
            if device.type == "cuda":
                torch.cuda.set_device(device)
            for _ in range(steps):
                sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    outs[index] = calls[index]()
                sync(device)
                times[index].append(time.perf_counter() - start)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return times, outs


def auto_regime(model, both, reference, one_gpu_step, manager, device, args) -> dict:
    """``offload_group``'s own choice: the group called with the whole batch, its regime
    chosen on the second call from the links it measures and the compute it times."""
    with atorch.offload_group(model, [0, 1], manager=manager, prefetch=args.prefetch) as group:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            out = group(both.to(device))
            sync(device)
            times.append(time.perf_counter() - start)
        chosen, ranking = group.regime, group.ranking
    step = steady_median(times[CALLS_BEFORE_CHOICE:])
    identical = torch.equal(out.float().cpu(), reference)
    print(
        f"the group called as one model: chose {chosen.name!r} (predicted "
        f"{chosen.seconds * 1000:.1f} ms), {step * 1000:.1f} ms per step after the choice "
        f"({one_gpu_step / step:.2f}x one GPU); the first {CALLS_BEFORE_CHOICE} calls "
        f"{', '.join(f'{t * 1000:.0f}' for t in times[:CALLS_BEFORE_CHOICE])} ms; identical: "
        f"{identical}",
        flush=True,
    )
    return {
        "step_seconds": times,
        "median_step_seconds": step,
        "speedup_over_one_gpu": one_gpu_step / step,
        "chosen": chosen.name,
        "ranking": [(r.name, r.seconds, r.detail) for r in ranking],
        "identical": identical,
    }


def accelerate_split(result, model, both, devices, args, reference) -> None:
    """accelerate's layer split over both GPUs, each given the same limit as aimdo (what
    does not fit stays on the host, streamed by accelerate's hooks); batch 2 through both
    in turn. Its speedup is against the peer split measured above."""
    limit = args.vram_limit
    replica, device_map = dispatch_with_accelerate(model, {0: limit, 1: limit, "cpu": 1 << 40})
    times, out = [], None
    with torch.no_grad():
        for _ in range(max(3, args.steps // 2)):
            start = time.perf_counter()
            out = replica(both.to(devices[0]))
            for device in set(devices):
                sync(device)
            times.append(time.perf_counter() - start)
    step = steady_median(times)
    split_step = result["runs"]["two GPUs, guidance split, peers on"]["median_step_seconds"]
    placed = {
        str(k): sum(1 for v in device_map.values() if v == k) for k in set(device_map.values())
    }
    result["runs"]["accelerate layer split over both GPUs, batch 2"] = {
        "step_seconds": times,
        "median_step_seconds": step,
        "peer_split_speedup_over_it": step / split_step,
        "device_map_counts": placed,
        # Not counted in the exit status: accelerate's output is compared, not required equal.
        "identical_to_one_gpu": torch.equal(out.float().cpu(), reference),
    }
    print(
        f"accelerate layer split over both GPUs, batch 2: {step * 1000:.1f} ms; the peer split "
        f"is {step / split_step:.2f}x faster; modules placed {placed}",
        flush=True,
    )
    del replica


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=aimdo.parse_size("24GiB"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--accelerate", action="store_true", help="also run accelerate's split")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.blocks, args.hidden, args.tokens, args.steps = 6, 256, 64, 3
        args.vram_limit = 6 << 20
    dtype = torch.float32 if args.tiny else torch.bfloat16
    devices = [torch.device("cpu")] * 2 if args.tiny else [torch.device("cuda", d) for d in (0, 1)]
    made = build(args.blocks, args.hidden, dtype, "cpu" if args.tiny else "cuda:0")
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(1, args.tokens, args.hidden, dtype=dtype, generator=gen)
    uncond = torch.randn(1, args.tokens, args.hidden, dtype=dtype, generator=gen)
    both = torch.cat([cond, uncond])
    compute_b2 = compute_time(made, both, devices[0])
    compute_b1 = compute_time(made, cond, devices[0])
    with torch.no_grad():
        reference = made(both.to(devices[0])).float().cpu()
    model = to_host(made, pin=False)
    if not args.tiny:
        torch.cuda.empty_cache()
    host = 50e9 if args.tiny else pinned_bandwidth(devices[0])
    host_both = 50e9 if args.tiny else concurrent_bandwidth(devices)
    peer = 390e9 if args.tiny else peer_bandwidth()
    result = {
        "benchmark": "peer_split",
        "environment": environment(),
        "args": vars(args),
        "compute_seconds": {"batch 2": compute_b2, "batch 1": compute_b1},
        "host_bytes_per_s": host,
        "host_bytes_per_s_both_at_once": host_both,
        "peer_bytes_per_s": peer,
        "runs": {},
    }
    print(
        f"compute: batch 2 {compute_b2 * 1000:.1f} ms, batch 1 {compute_b1 * 1000:.1f} ms; "
        f"host {host / 1e9:.1f} GB/s ({host_both / 1e9:.1f} each with both), peer "
        f"{peer / 1e9:.1f} GB/s",
        flush=True,
    )
    backend = (
        aimdo.SimBackend("2x1GiB", real_bytes=True, topology="h200-nvlink") if args.tiny else "cuda"
    )
    options = dict(page_size=(2 << 20) if args.tiny else None, headroom=0 if args.tiny else None)
    with aimdo.Manager(backend, [0, 1], vram_limit=args.vram_limit, **options) as manager:
        # One GPU, batch 2.
        with atorch.offload(model, 0, manager=manager, prefetch=args.prefetch) as one:
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                out = model(both.to(devices[0]))
                sync(devices[0])
                times.append(time.perf_counter() - start)
            copied = one.last_stats.bytes_copied
        step = steady_median(times)
        floor = max(compute_b2, copied / host)
        result["runs"]["one GPU, batch 2"] = {
            "step_seconds": times,
            "median_step_seconds": step,
            "bytes_copied": copied,
            "floor_seconds": floor,
            "identical": torch.equal(out.float().cpu(), reference),
        }
        print(
            f"one GPU, batch 2: {step * 1000:.1f} ms (floor {floor * 1000:.1f}, "
            f"{floor / step:.0%}); {copied / 2**30:.2f} GiB copied",
            flush=True,
        )
        for peers in (True, False):
            name = f"two GPUs, guidance split, peers {'on' if peers else 'off'}"
            with atorch.offload_group(
                model, [0, 1], manager=manager, prefetch=args.prefetch, peers=peers
            ) as group:
                calls = [
                    lambda i=i, half=half: group[i](half.to(devices[i]))
                    for i, half in enumerate([cond, uncond])
                ]
                times2, outs = split(calls, devices, args.steps)
                stats = group.last_stats
            steps2 = {i: steady_median(times2[i]) for i in (0, 1)}
            step2 = max(steps2.values())
            floors = {
                i: max(
                    compute_b1,
                    stats[i].bytes_from_peers / peer,
                    (stats[i].bytes_copied - stats[i].bytes_from_peers) / host_both,
                )
                for i in (0, 1)
            }
            identical = torch.equal(
                torch.cat([outs[0].float().cpu(), outs[1].float().cpu()]), reference
            )
            result["runs"][name] = {
                "step_seconds": times2,
                "median_step_seconds": step2,
                "speedup_over_one_gpu": step / step2,
                "per_gpu": {
                    i: {
                        "median_step_seconds": steps2[i],
                        "bytes_copied": stats[i].bytes_copied,
                        "bytes_from_peers": stats[i].bytes_from_peers,
                        "floor_seconds": floors[i],
                        "of_floor": floors[i] / steps2[i],
                    }
                    for i in (0, 1)
                },
                "identical": identical,
            }
            print(
                f"{name}: {step2 * 1000:.1f} ms ({step / step2:.2f}x one GPU); "
                + "; ".join(
                    f"GPU {i} {steps2[i] * 1000:.1f} ms, floor {floors[i] * 1000:.1f} "
                    f"({floors[i] / steps2[i]:.0%}), {stats[i].bytes_from_peers / 2**30:.2f} "
                    f"of {stats[i].bytes_copied / 2**30:.2f} GiB from the peer"
                    for i in (0, 1)
                )
                + f"; identical: {identical}",
                flush=True,
            )
        result["runs"]["the group called as one model, regime chosen"] = auto_regime(
            model, both, reference, step, manager, devices[0], args
        )
    if args.accelerate and not args.tiny:  # accelerate places on CUDA devices only
        accelerate_split(result, model, both, devices, args, reference)
    write("peer_split", result, args.out, keep=not args.tiny)
    return 0 if all(run.get("identical", True) for run in result["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
