"""``python -m aimdo demo`` with PyTorch (``--workload torch``, the default on CUDA when
PyTorch is installed): a real model, built here with random weights, run offloaded by
aimdo.torch on the devices given. It is a stack of transformer-style MLP blocks
(LayerNorm, Linear h -> 4h, GELU, Linear 4h -> h, residual), each about ``--layer-size``
bytes, run at batch 2 of ``--tokens`` tokens in all.

1. All resident, when the model fits on the first device: the compute floor and the
   reference output (on the simulator the "device" is the CPU and its time the host's).
2. Offloaded to the first device under ``--vram-limit``: each step against the floor,
   max(all-resident, bytes copied / the measured host-to-device bandwidth), with the
   compute's stall on copies from the step's timings.
3. With two devices, one group over both (aimdo.torch.offload_group, regime "auto"): the
   batch is split, a device copies what it lacks from the other's pages where the
   driver allows it, and the group chooses its regime from what it measured.
4. What each device holds, per VBAR; with ``--plot FILE.png``, its picture and a
   timeline of the last step on each device (aimdo.plot).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from . import _core
from . import torch as atorch
from ._manager import Manager, resolve_backend
from ._sizes import format_size
from ._torch_tiers import available_host_bytes
from .sim import SimBackend


class _Block(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def hidden_for(layer_size: int, element_size: int) -> int:
    """The width whose block holds about `layer_size` bytes (8 h^2 weights), a multiple
    of 64, at least 64."""
    return max(64, int(math.sqrt(layer_size / (8 * element_size))) // 64 * 64)


def build(layers: int, hidden: int, dtype, device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = torch.nn.Sequential(*[_Block(hidden) for _ in range(layers)])
    return model.to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    began = time.perf_counter()
    out = call()
    _sync(device)
    return time.perf_counter() - began, out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run_torch_demo(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except torch.cuda.OutOfMemoryError as error:
        first_line = str(error).splitlines()[0] if str(error) else "out of memory"
        raise _core.AimdoError(
            f"the GPU ran out of memory for the demo's activations ({first_line}): lower "
            "--tokens or --vram-limit"
        ) from error


def _run(args: argparse.Namespace) -> int:
    backend = resolve_backend(args.backend)
    sim = backend if isinstance(backend, SimBackend) else None
    if sim is not None and not sim.real_bytes:
        backend = sim = SimBackend(real_bytes=True)  # aimdo.torch needs the real bytes
    count = backend.device_count
    devices = args.devices if args.devices is not None else list(range(min(count, 2)))
    missing = [d for d in devices if d >= count]
    if missing:
        raise ValueError(
            f"device {missing[0]} is not here: the {backend.name} backend has {count} devices"
        )
    dtype = torch.float32 if sim else torch.bfloat16
    element = torch.tensor([], dtype=dtype).element_size()
    hidden = hidden_for(args.layer_size, element)
    first = torch.device("cpu") if sim else torch.device("cuda", devices[0])
    model_bytes = args.layers * (8 * hidden * hidden + 7 * hidden) * element
    tokens = max(1, args.tokens // 2)
    # The host holds the weights, and the input and an output or two of its size.
    batch_bytes = 2 * tokens * hidden * element
    available = available_host_bytes()
    if model_bytes + 4 * batch_bytes > available:
        raise _core.AimdoError(
            f"a {format_size(model_bytes)} model and {format_size(batch_bytes)} batches do not "
            f"fit in this host's available memory ({format_size(available)}): lower --layers, "
            "--layer-size or --tokens"
        )
    print(
        f"aimdo demo: a {format_size(model_bytes)} model ({args.layers} MLP blocks of width "
        f"{hidden}, {dtype}, random weights) at batch 2 x {tokens} tokens; each device "
        f"limited to {format_size(args.vram_limit)} ({backend.name})"
    )
    torch.manual_seed(1)
    x = torch.randn(2, tokens, hidden, dtype=dtype)

    # 1. All resident, if it fits: the compute floor and the reference.
    resident = reference = None
    free = torch.cuda.mem_get_info(first)[0] if first.type == "cuda" else None
    if free is None or model_bytes + 4 * x.numel() * element * 8 < 0.8 * free:
        model = build(args.layers, hidden, dtype, first)
        xd = x.to(first)
        with torch.no_grad():
            model(xd)  # warm-up
            times = [_timed(lambda: model(xd), first) for _ in range(args.steps)]
            halves = [model(xd[i : i + 1]).cpu() for i in range(2)]
        resident = min(t for t, _ in times)
        reference = (times[-1][1].cpu(), torch.cat(halves))
        model.to("cpu")
        del xd, times
        if first.type == "cuda":
            torch.cuda.empty_cache()  # the Manager sees the device's free memory
        print(f"\nall resident on {first}: {_ms(resident)} a step")
    else:
        model = build(args.layers, hidden, dtype, "cpu")
        print(f"\nall resident: does not fit on {first}; no compute floor or reference")

    with Manager(backend, devices, vram_limit=args.vram_limit, page_size=args.page_size) as manager:
        bandwidth = _host_bandwidth(first) if first.type == "cuda" else None
        two = len(devices) >= 2

        def finish(timings: dict) -> None:
            """While the last run still holds its pages: what they are, and the picture."""
            _print_residency(manager, devices)
            if args.plot:
                from . import plot

                plot.overview(manager, timings, args.plot)
                print(f"\npicture: {args.plot}")

        one = _one_device(
            model,
            x,
            manager,
            devices[0],
            first,
            args,
            resident,
            reference,
            bandwidth,
            None if two else finish,
        )
        if two:
            _two_devices(model, x, manager, devices[:2], args, reference, finish)
        else:
            print("\n(one device: the two-device run needs two)")
        if one is not None and resident is not None:
            print(f"\none device: {one / resident:.2f}x the all-resident step")
    return 0


def _host_bandwidth(device: torch.device) -> float:
    from ._torch_regime import _host_bandwidth as measure

    return measure(device.index)


def _one_device(model, x, manager, device, where, args, resident, reference, bandwidth, finish):
    """The model offloaded to `device`: the last step's seconds."""
    print(f"\noffloaded to device {device} (budget {format_size(manager.budget_bytes(device))})")
    print(
        f"{'step':>4} {'time':>10} {'copied':>11} {'stalled':>10} {'resident':>11}"
        + (f" {'floor':>10} {'of floor':>8}" if bandwidth else "")
    )
    xd = x.to(where)
    with atorch.offload(model, device, manager=manager, timings=True) as handle:
        for step in range(1, args.steps + 1):
            seconds, out = _timed(lambda: model(xd), where)
            t = handle.last_timings
            line = (
                f"{step:>4} {_ms(seconds):>10} {format_size(t.bytes_copied):>11} "
                f"{_ms(t.stall_seconds):>10} {format_size(manager.resident_bytes(device)):>11}"
            )
            if bandwidth:
                floor = max(resident or 0.0, t.bytes_copied / bandwidth)
                line += f" {_ms(floor):>10} {floor / seconds:>8.0%}"
            print(line)
        if reference is not None:
            same = torch.equal(out.cpu(), reference[0])
            print(f"identical to all resident: {'yes' if same else 'NO'}")
        if finish is not None:
            finish({f"device {device}": handle.last_timings})
        return seconds


def _two_devices(model, x, manager, devices, args, reference, finish) -> None:
    where = [
        torch.device("cpu") if manager.backend_name == "sim" else torch.device("cuda", d)
        for d in devices
    ]
    print(f"\none group over devices {devices[0]} and {devices[1]}, the batch split (regime auto)")
    with atorch.offload_group(model, devices, manager=manager) as group:
        for member in group.offloads:
            member.timings = True
        # The first three calls measure (design.md §4.4); the steps after run the choice.
        for _ in range(3):
            group(x.to(where[0]))
        regime = group.regime
        print(f"regime chosen: {regime.name} ({regime.detail})")
        # A split computes on both; "one device" and "donor" on the first.
        computing = list(range(len(devices))) if "split" in regime.name else [0]
        print(
            f"{'step':>4} {'time':>10} "
            + " ".join(f"{'copied d' + str(devices[i]):>12}" for i in computing)
            + " ".join(f" {'from peer d' + str(devices[i]):>14}" for i in computing)
        )
        for step in range(1, args.steps + 1):
            seconds, out = _timed(lambda: group(x.to(where[0])), where[0])
            for w in where[1:]:
                _sync(w)
            stats = [group.offloads[i].last_stats for i in computing]
            print(
                f"{step:>4} {_ms(seconds):>10} "
                + " ".join(f"{format_size(s.bytes_copied):>12}" for s in stats)
                + " ".join(f" {format_size(s.bytes_from_peers):>14}" for s in stats)
            )
        if reference is not None:
            same = torch.equal(out.cpu(), reference[1 if "split" in regime.name else 0])
            print(f"identical to all resident: {'yes' if same else 'NO'}")
        finish(
            {
                f"device {devices[i]}": group.offloads[i].last_timings
                for i in computing
                if group.offloads[i].last_timings is not None
            }
        )


def _print_residency(manager, devices) -> None:
    print("\nwhat each device holds now:")
    for device in devices:
        report = manager.report(device)
        print(
            f"  device {device}: {format_size(report['resident_bytes'])} resident of "
            f"{format_size(report['budget_bytes'])}, {report['faults']} faults, "
            f"{format_size(report['evicted_bytes'])} evicted, {report['driver_calls']} driver "
            f"calls ({report['driver_seconds'] * 1000:.1f} ms)"
        )
        for index, vbar in enumerate(report["vbars"]):
            print(
                f"    VBAR {index}: {format_size(vbar['size_bytes'])}, "
                f"{format_size(vbar['resident_bytes'])} resident, "
                f"{format_size(vbar['pinned_bytes'])} pinned, watermark "
                f"{format_size(vbar['watermark_bytes'])}"
            )
