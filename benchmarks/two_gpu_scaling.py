"""Two-GPU scaling (issue 6, item 4): classifier-free guidance split across two GPUs (one
thread per GPU, batch 1 each, the same model offloaded to both) against one GPU at batch
2, with the same model and per-GPU vram_limit; repeated runs in one process; and
accelerate's placement of the layers across both GPUs with the same per-GPU budget.

    python -m benchmarks.two_gpu_scaling [--blocks 60] [--hidden 5120] [--tokens 2048]
                                         [--vram-limit 24GiB] [--steps 20] [--repeats 5]
    python -m benchmarks.two_gpu_scaling --tiny    # CPU simulator, to check the script

Reported: speedup, per-GPU residency against its budget (no device evicts for the other's
sake), per-GPU floor efficiency (floor = max(compute, bytes copied / bandwidth)), and
whether every repeat gave identical outputs. Which regime each run is in (copy-bound or
compute-bound) follows from which term of its floor is larger. The layers split across
the GPUs through aimdo (half the blocks offloaded to each, batch 2 through both in turn)
is measured too.
"""

from __future__ import annotations

import argparse
import copy
import threading
import time

import aimdo
import aimdo.torch as atorch
import torch

from ._common import environment, steady_median, write
from .streaming import build, dispatch_with_accelerate, pinned_bandwidth, sync, to_host


def available(manager, device: int) -> int:
    """The part of the device's budget that others' memory (PyTorch's cache, the CUDA
    context) leaves to aimdo now."""
    free, total = manager.memory_info(device)
    return manager.budget_bytes(device) - (total - free - manager.usage_bytes(device))


def concurrent_bandwidth(devices, nbytes: int = 1 << 30) -> float:
    """The lower of the devices' pinned host-to-device bandwidths while all copy at once."""
    results, errors = {}, []
    ready = threading.Barrier(len(devices))

    def copy(device):
        try:
            results[device] = pinned_bandwidth(device, nbytes, ready)
        except BaseException as error:  # re-raised below; the others must not wait for it
            errors.append(error)
            ready.abort()

    threads = [threading.Thread(target=copy, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return min(results.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=aimdo.parse_size("24GiB"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--accelerate", action="store_true", help="also run accelerate's placement")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.blocks, args.hidden, args.tokens, args.steps, args.repeats = 6, 256, 64, 3, 2
        args.vram_limit = 6 << 20
    dtype = torch.float32 if args.tiny else torch.bfloat16
    devices = [torch.device("cpu")] * 2 if args.tiny else [torch.device("cuda", d) for d in (0, 1)]
    made = build(args.blocks, args.hidden, dtype, "cpu" if args.tiny else "cuda:0")
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(1, args.tokens, args.hidden, dtype=dtype, generator=gen)
    uncond = torch.randn(1, args.tokens, args.hidden, dtype=dtype, generator=gen)
    both = torch.cat([cond, uncond])

    # Compute floors, all resident on GPU 0: batch 2 and batch 1.
    with torch.no_grad():
        x2 = both.to(devices[0])
        x1 = cond.to(devices[0])
        for _ in range(2):
            made(x2)
        sync(devices[0])
        start = time.perf_counter()
        made(x2)
        sync(devices[0])
        compute_b2 = time.perf_counter() - start
        start = time.perf_counter()
        made(x1)
        sync(devices[0])
        compute_b1 = time.perf_counter() - start
    model = to_host(made, pin=not args.tiny)
    if not args.tiny:
        torch.cuda.empty_cache()
    bandwidth = 50e9 if args.tiny else min(pinned_bandwidth(d) for d in devices)
    # Both GPUs copying from the host at once share its memory bandwidth: the two-GPU
    # floors use what each reached then.
    together = 50e9 if args.tiny else concurrent_bandwidth(devices)
    backend = aimdo.SimBackend("2x1GiB", real_bytes=True) if args.tiny else "cuda"
    result = {
        "benchmark": "two_gpu_scaling",
        "environment": environment(),
        "args": vars(args),
        "compute_seconds": {"batch 2": compute_b2, "batch 1": compute_b1},
        "pinned_h2d_bytes_per_s": bandwidth,
        "pinned_h2d_bytes_per_s_both_at_once": together,
        "repeats": [],
    }
    page = (2 << 20) if args.tiny else None
    with aimdo.Manager(
        backend,
        [0, 1],
        vram_limit=args.vram_limit,
        page_size=page,
        headroom=0 if args.tiny else None,
    ) as manager:
        # A module is offloaded to one device at a time: GPU 1 runs a twin that holds the
        # same weight tensors (pinned, so neither offload copies them on the host).
        weights = list(model.parameters()) + list(model.buffers())
        modules = {0: model, 1: copy.deepcopy(model, {id(t): t for t in weights})}
        one = atorch.offload(model, 0, manager=manager, prefetch=args.prefetch)
        # GPU 0's module serves both configurations: one VBAR per GPU, so neither
        # configuration evicts the other's weights.
        two = {0: one, 1: atorch.offload(modules[1], 1, manager=manager, prefetch=args.prefetch)}
        first_outputs = None
        for repeat in range(args.repeats):
            # One GPU, batch 2.
            times1 = []
            for _ in range(args.steps):
                start = time.perf_counter()
                out1 = model(both.to(devices[0]))
                sync(devices[0])
                times1.append(time.perf_counter() - start)
            copied1 = one.last_stats.bytes_copied
            # Two GPUs, batch 1 each, one thread each.
            outs, times2, copied2 = {}, {0: [], 1: []}, {}

            # The threads are joined within this repeat: the loop's variables are current.
            def run(d, x):
                for _ in range(args.steps):
                    start = time.perf_counter()
                    outs[d] = modules[d](x.to(devices[d]))  # noqa: B023
                    sync(devices[d])
                    times2[d].append(time.perf_counter() - start)  # noqa: B023
                copied2[d] = two[d].last_stats.bytes_copied  # noqa: B023

            evicted = {d: manager.stats(d)["evicted_bytes"] for d in (0, 1)}
            threads = [
                threading.Thread(target=run, args=(0, cond)),
                threading.Thread(target=run, args=(1, uncond)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            step1 = steady_median(times1)
            step2 = max(steady_median(times2[0]), steady_median(times2[1]))
            # Evictions during the two-GPU run (in repeat 1 that includes GPU 1's first
            # forward, which maps its weights): none means no device evicted for the other.
            evicted = {d: manager.stats(d)["evicted_bytes"] - evicted[d] for d in (0, 1)}
            outputs = (out1.float().cpu(), outs[0].float().cpu(), outs[1].float().cpu())
            if first_outputs is None:
                first_outputs = outputs
            identical = all(torch.equal(a, b) for a, b in zip(outputs, first_outputs, strict=True))
            split_equal = torch.equal(outputs[0][:1], outputs[1]) and torch.equal(
                outputs[0][1:], outputs[2]
            )
            floor1 = max(compute_b2, copied1 / bandwidth)
            floors2 = {d: max(compute_b1, copied2[d] / together) for d in (0, 1)}
            entry = {
                "one_gpu_batch2_step_seconds": step1,
                "two_gpus_step_seconds": step2,
                "speedup": step1 / step2,
                "one_gpu_floor_efficiency": floor1 / step1,
                "one_gpu_bytes_copied_per_step": copied1,
                "one_gpu_regime": "copy-bound"
                if copied1 / bandwidth > compute_b2
                else "compute-bound",
                "per_gpu": {
                    d: {
                        "residency_of_budget": manager.resident_bytes(d) / manager.budget_bytes(d),
                        "residency_of_available": manager.resident_bytes(d) / available(manager, d),
                        "resident_bytes": manager.resident_bytes(d),
                        "budget_bytes": manager.budget_bytes(d),
                        "others_bytes": manager.budget_bytes(d) - available(manager, d),
                        "total_bytes": manager.memory_info(d)[1],
                        "evicted_bytes_during_two_gpu_run": evicted[d],
                        "step_seconds": steady_median(times2[d]),
                        "floor_efficiency": floors2[d] / steady_median(times2[d]),
                        "regime": "copy-bound"
                        if copied2[d] / together > compute_b1
                        else "compute-bound",
                        "bytes_copied_per_step": copied2[d],
                    }
                    for d in (0, 1)
                },
                "identical_to_first_repeat": identical,
                "two_gpu_halves_equal_one_gpu_batch": split_equal,
            }
            result["repeats"].append(entry)
            print(
                f"repeat {repeat + 1}: 1 GPU batch 2 {step1 * 1000:.1f} ms, "
                f"2 GPUs {step2 * 1000:.1f} ms "
                f"({step1 / step2:.2f}x); residency of budget "
                + ", ".join(
                    f"GPU {d} {entry['per_gpu'][d]['residency_of_budget']:.0%} "
                    f"({entry['per_gpu'][d]['residency_of_available']:.0%} of what others leave)"
                    for d in (0, 1)
                )
                + f"; floor efficiency 1 GPU {floor1 / step1:.0%}, 2 GPUs "
                + ", ".join(f"{entry['per_gpu'][d]['floor_efficiency']:.0%}" for d in (0, 1))
                + "; evicted during the 2-GPU run "
                + ", ".join(f"{evicted[d] / 2**20:.0f} MiB" for d in (0, 1))
                + f"; identical: {identical}"
            )
        # The layers split instead: the first half of the blocks on GPU 0, the rest on GPU 1,
        # batch 2 through both in turn (what accelerate's placement does, through aimdo).
        half = args.blocks // 2
        for offloaded in (one, two[1]):  # their weights would compete with the halves'
            offloaded.undo()
        one = two = None
        head, tail = model[:half], model[half:]
        first = atorch.offload(head, 0, manager=manager, prefetch=args.prefetch)
        second = atorch.offload(tail, 1, manager=manager, prefetch=args.prefetch)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            out = tail(head(both.to(devices[0])).to(devices[1]))
            sync(devices[1])
            times.append(time.perf_counter() - start)
        split_step = steady_median(times)
        copied = first.last_stats.bytes_copied + second.last_stats.bytes_copied
        result["aimdo_layer_split"] = {
            "step_seconds": times,
            "median_step_seconds": split_step,
            "bytes_copied_per_step": copied,
            "floor_seconds": max(compute_b2, copied / bandwidth),
            "identical_to_one_gpu": torch.equal(out.float().cpu(), first_outputs[0]),
            "resident_bytes": {d: manager.resident_bytes(d) for d in (0, 1)},
        }
        print(
            f"aimdo, layers split across both GPUs (batch 2): {split_step * 1000:.1f} ms per step, "
            f"{copied / 2**30:.2f} GiB copied per step; identical: "
            f"{result['aimdo_layer_split']['identical_to_one_gpu']}"
        )
        first.undo()
        second.undo()
    if args.accelerate and not args.tiny:
        replica, device_map = dispatch_with_accelerate(
            model, {0: args.vram_limit, 1: args.vram_limit, "cpu": 1 << 40}
        )
        times = []
        with torch.no_grad():
            for _ in range(3):
                start = time.perf_counter()
                replica(both.to(devices[0]))
                for d in devices:
                    sync(d)
                times.append(time.perf_counter() - start)
        result["accelerate_layer_split"] = {
            "step_seconds": times,
            "device_map_counts": {
                str(k): sum(1 for v in device_map.values() if v == k)
                for k in set(device_map.values())
            },
        }
        print(f"accelerate across both GPUs: {min(times) * 1000:.1f} ms per step")
    write("two_gpu_scaling", result, args.out, keep=not args.tiny)
    ok = all(
        r["identical_to_first_repeat"] and r["two_gpu_halves_equal_one_gpu_batch"]
        for r in result["repeats"]
    )
    ok = ok and result["aimdo_layer_split"]["identical_to_one_gpu"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
