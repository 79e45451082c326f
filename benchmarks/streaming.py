"""Streaming efficiency (issue 6, item 3): a synthetic DiT-like model larger than the GPU
budget, run step after step through aimdo.torch.offload, against the physical floor and
the baselines a user would pick instead.

    python -m benchmarks.streaming [--blocks 60] [--hidden 5120] [--tokens 2048] [--batch 2]
                                   [--vram-limit 24GiB] [--steps 20] [--prefetch 2]
                                   [--variants spread:2,in-order:2]
                                   [--baselines resident,accelerate-offload,accelerate-dispatch]
    python -m benchmarks.streaming --tiny   # a small model on the CPU simulator: checks the script

Floor: max(compute time per step with everything resident, bytes aimdo copied per step /
measured pinned host-to-device bandwidth). Each block is attention-shaped projections and
an MLP (qkv, proj, up, down) with no attention kernel: the weights, not the attention
arithmetic, are what is streamed. Weights are made on the GPU and copied to pinned host
memory (initializing ~38 GB of random numbers on the CPU would take minutes).
"""

from __future__ import annotations

import argparse
import time

import aimdo
import aimdo.torch as atorch
import torch

from ._common import environment, steady_median, write


class Block(torch.nn.Module):
    def __init__(self, hidden: int, dtype, device):
        super().__init__()

        def make(i, o):
            return torch.nn.Linear(i, o, bias=False, dtype=dtype, device=device)

        self.qkv = make(hidden, 3 * hidden)
        self.proj = make(hidden, hidden)
        self.up = make(hidden, 4 * hidden)
        self.down = make(4 * hidden, hidden)
        self.hidden = hidden

    def forward(self, x):
        q = self.qkv(x)[..., : self.hidden]
        x = x + self.proj(torch.nn.functional.gelu(q))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def build(blocks: int, hidden: int, dtype, device: str) -> torch.nn.Sequential:
    """The model on `device`, weights scaled so activations stay finite over 60 blocks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block(hidden, dtype, device) for _ in range(blocks)]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return model


def to_host(model: torch.nn.Module, pin: bool) -> torch.nn.Module:
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                host = p.detach().cpu()
                module._parameters[name] = torch.nn.Parameter(
                    host.pin_memory() if pin else host, requires_grad=False
                )
    return model


def dispatch_with_accelerate(model: torch.nn.Module, max_memory: dict):
    """What a user would pick instead of aimdo: accelerate's placement of whole blocks on
    the GPUs (within `max_memory`), the rest streamed from the host every step. Returns
    the dispatched copy of `model` and its device map."""
    import copy

    from accelerate import dispatch_model, infer_auto_device_map

    replica = copy.deepcopy(model)
    device_map = infer_auto_device_map(
        replica, max_memory=max_memory, no_split_module_classes=["Block"]
    )
    return dispatch_model(replica, device_map=device_map), device_map


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run, x, steps: int, device) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = run(x)
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def pinned_bandwidth(device, nbytes: int = 1 << 30, ready=None) -> float:
    """Pinned host-to-device bytes per second over five copies of `nbytes`. `ready` (a
    threading.Barrier) starts the timing only once every copier has its buffers: pinning
    host memory in one thread would otherwise slow the copies timed in another."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    if ready is not None:
        ready.wait()
    start = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    sync(device)
    seconds = time.perf_counter() - start
    del host, dev
    empty_host_cache()
    return 5 * nbytes / seconds


def empty_host_cache() -> None:
    """Give back the pinned host memory PyTorch's host allocator keeps cached after its
    tensors are freed (it keeps each block, rounded up to a power of two, for reuse): a
    1 GiB buffer pinned to measure the bandwidth would otherwise stay in the process's
    resident set and be counted against the offload's host memory."""
    memory = getattr(getattr(torch, "accelerator", None), "memory", None)
    empty = getattr(memory, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def timings_cost(offloaded, model, x, args, device) -> dict:
    """What Offload.timings costs (issue 15): steps with timings off and on, alternating in
    one run, their medians; and the host time of reading a step's timings (its events)."""
    off, on, reads = [], [], []
    for step in range(2 * args.steps):
        timed = step % 2 == 1
        offloaded.timings = timed
        seconds, _ = time_steps(model, x, 1, device)
        (on if timed else off).append(seconds[0])
        if timed:
            began = time.perf_counter()
            timings = offloaded.last_timings
            reads.append(time.perf_counter() - began)
    offloaded.timings = False
    median_off, median_on = steady_median(off), steady_median(on)
    cost = {
        "off_step_seconds": off,
        "on_step_seconds": on,
        "read_seconds": reads,
        "median_off_seconds": median_off,
        "median_on_seconds": median_on,
        "cost_fraction": median_on / median_off - 1,
        "last": {k: v for k, v in timings.as_dict().items() if k not in ("blocks", "spans")},
    }
    print(
        f"  timings: a step {median_off * 1000:.2f} ms off, {median_on * 1000:.2f} ms on "
        f"({cost['cost_fraction']:+.2%}); reading them {steady_median(reads) * 1000:.2f} ms; "
        f"last step compute {timings.compute_seconds * 1000:.1f} ms, stalled "
        f"{timings.stall_seconds * 1000:.1f} ms, copies {timings.copy_seconds * 1000:.1f} ms"
    )
    return cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=aimdo.parse_size("24GiB"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--baseline-steps", type=int, default=3, help="steps for the slow baselines"
    )
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument(
        "--variants",
        default=None,
        help="aimdo configurations to run, PLACEMENT:PREFETCH with PLACEMENT spread "
        "or in-order, comma-separated (default: spread:PREFETCH); the first "
        "is the headline",
    )
    parser.add_argument("--baselines", default="resident,accelerate-offload,accelerate-dispatch")
    parser.add_argument(
        "--timings",
        action="store_true",
        help="also measure what Offload.timings costs: steps with it off and on, alternating",
    )
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU simulator")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.blocks, args.hidden, args.tokens, args.steps = 6, 256, 64, 3
        args.vram_limit, args.baselines = 6 << 20, "resident"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    baselines = [b for b in args.baselines.split(",") if b]

    made = build(args.blocks, args.hidden, dtype, "cpu" if args.tiny else "cuda:0")
    weight_bytes = sum(p.numel() * p.element_size() for p in made.parameters())
    x = torch.randn(
        args.batch,
        args.tokens,
        args.hidden,
        dtype=dtype,
        generator=torch.Generator().manual_seed(1),
    )
    x = x.to(device)
    result = {
        "benchmark": "streaming",
        "environment": environment(),
        "args": vars(args),
        "weight_bytes": weight_bytes,
        "runs": {},
    }
    print(
        f"model {weight_bytes / 2**30:.2f} GiB ({args.blocks} blocks, hidden {args.hidden}), "
        f"batch {args.batch} x {args.tokens} tokens, vram_limit {args.vram_limit / 2**30:.2f} GiB"
    )

    # Everything resident: the compute floor (and the reference output).
    resident_times, reference = time_steps(made, x, max(3, min(args.steps, 10)), device)
    compute = min(resident_times[1:] or resident_times)
    result["runs"]["resident"] = {"step_seconds": resident_times}
    reference = reference.float().cpu()
    model = to_host(made, pin=not args.tiny)
    if not args.tiny:
        torch.cuda.empty_cache()
    bandwidth = 50e9 if args.tiny else pinned_bandwidth(device)
    result["pinned_h2d_bytes_per_s"] = bandwidth

    # aimdo, in each configuration asked for
    variants = []
    for text in (args.variants or f"spread:{args.prefetch}").split(","):
        placement, _, prefetch = text.partition(":")
        if placement not in ("spread", "in-order") or not prefetch.isdigit():
            parser.error(f"--variants: {text!r} is not PLACEMENT:PREFETCH (spread:2, in-order:2)")
        variants.append((placement, int(prefetch)))
    backend = aimdo.SimBackend("1x1GiB", real_bytes=True) if args.tiny else "cuda"
    for placement, prefetch in variants:
        name = f"aimdo {placement} prefetch {prefetch}"
        with aimdo.Manager(
            backend,
            [0],
            vram_limit=args.vram_limit,
            page_size=(2 << 20) if args.tiny else None,
            headroom=0 if args.tiny else None,
        ) as manager:
            offloaded = atorch.offload(
                model, 0, manager=manager, prefetch=prefetch, spread=placement == "spread"
            )
            times, out = time_steps(model, x, args.steps, device)
            stats = offloaded.last_stats
            floor = max(compute, stats.bytes_copied / bandwidth)
            step = steady_median(times)
            identical = torch.equal(out.float().cpu(), reference)
            free, total = manager.memory_info(0)
            # PyTorch's cache (activations, staging buffers) and the CUDA context
            others = total - free - manager.usage_bytes(0)
            # design.md §3.2: a full budget stays full. What the others leave of the budget is
            # filled with resident pages, short of it by less than the one block whose
            # missing pages did not fit (and the page it shares with the block below).
            left = manager.budget_bytes(0) - others
            largest = max(size for _, _, size in offloaded.placement())
            page = manager.device_info(0)["page_size"]
            result["runs"][name] = {
                "total_bytes": total,
                "budget_bytes": manager.budget_bytes(0),
                "others_bytes": others,
                "left_by_others_bytes": left,
                "unfilled_bytes": left - manager.resident_bytes(0),
                "largest_block_bytes": largest,
                "page_bytes": page,
                "step_seconds": times,
                "median_step_seconds": step,
                "bytes_copied_per_step": stats.bytes_copied,
                "hits": stats.hits,
                "offloaded_layers": stats.offloaded_layers,
                "floor_seconds": floor,
                "efficiency": floor / step,
                "identical_to_resident": identical,
                "resident_bytes": manager.resident_bytes(0),
            }
            print(
                f"{name}: {step * 1000:.1f} ms per step (median of steps 2..), floor "
                f"{floor * 1000:.1f} ms = max(compute {compute * 1000:.1f} ms, "
                f"{stats.bytes_copied / 2**30:.2f} GiB / {bandwidth / 1e9:.1f} GB/s): "
                f"{floor / step:.0%} of the floor; {stats.hits} hits, {stats.offloaded_layers} "
                f"offloaded; identical output: {identical}"
            )
            print(
                f"  resident {manager.resident_bytes(0) / 2**30:.3f} GiB of the "
                f"{left / 2**30:.3f} GiB the others leave of the "
                f"{manager.budget_bytes(0) / 2**30:.2f}"
                f" GiB budget: {(left - manager.resident_bytes(0)) / 2**20:.0f} MiB unfilled "
                f"(largest block {largest / 2**20:.0f} MiB, page {page / 2**20:.0f} MiB)"
            )
            if args.timings:
                result["runs"][name]["timings"] = timings_cost(offloaded, model, x, args, device)
            offloaded.undo()  # the model back on the host, for the next run
        if not args.tiny:
            torch.cuda.empty_cache()
    result["headline"] = f"aimdo {variants[0][0]} prefetch {variants[0][1]}"

    if "accelerate-offload" in baselines:
        import copy

        from accelerate import cpu_offload

        replica = cpu_offload(copy.deepcopy(model), execution_device=device)
        times, _ = time_steps(replica, x, args.baseline_steps, device)
        result["runs"]["accelerate cpu_offload"] = {"step_seconds": times}
        print(f"accelerate cpu_offload: {min(times) * 1000:.1f} ms per step")
        del replica
    if "accelerate-dispatch" in baselines:
        replica, device_map = dispatch_with_accelerate(model, {0: args.vram_limit, "cpu": 1 << 40})
        times, _ = time_steps(replica, x, args.baseline_steps, device)
        on_gpu = sum(1 for v in device_map.values() if v == 0)
        result["runs"]["accelerate dispatch_model"] = {
            "step_seconds": times,
            "modules_on_gpu": on_gpu,
        }
        print(
            f"accelerate dispatch_model ({on_gpu} of {len(device_map)} entries on the GPU): "
            f"{min(times) * 1000:.1f} ms per step"
        )
        del replica

    write("streaming", result, args.out, keep=not args.tiny)
    aimdo_runs = [run for key, run in result["runs"].items() if key.startswith("aimdo")]
    return 0 if all(run["identical_to_resident"] for run in aimdo_runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
