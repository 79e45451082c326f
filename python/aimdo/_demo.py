"""``python -m aimdo demo``: a model larger than each device's budget, run layer by
layer, first on one device at batch 2, then on two devices at batch 1 each (one thread
per device, as classifier-free guidance split across GPUs would), printing per-device
residency, evictions, bytes copied and step times.

Each layer's weights are one allocation in a VBAR on each device. A forward pass
faults each layer in turn: a matching signature means the weights are still resident
(no copy); a new one means they are copied in; None means the layer is offloaded and
streams through a temporary buffer. On the simulator the copies and the compute are
declared (``SimBackend.copy_to_device`` / ``compute``) and step times are virtual, shown
next to the physical floor max(compute, bytes copied / bandwidth). The demo queues each
layer's copy and compute in line, with no overlap, so the floor is what overlapping them,
as aimdo.torch's prefetch does, could reach (aimdo.predict models that overlap on the
simulator's copy engine). On real GPUs nothing is copied or
computed: the figures are the offloader's decisions and its own wall-clock cost.
"""

from __future__ import annotations

import argparse
import threading
import time

from . import _core
from ._core import ALLOCATION_ALIGNMENT_BYTES
from ._manager import Manager, resolve_backend
from ._sizes import format_size
from ._timings import ForwardTimings, TimedSpan
from .sim import SimBackend


def vbar_bytes(layers: int, layer_size: int) -> int:
    """Bytes of a VBAR that holds ``layers`` allocations of ``layer_size`` bytes: each
    starts on the next multiple of ALLOCATION_ALIGNMENT_BYTES, so every one but the last
    takes its size rounded up to that."""
    stride = -(-layer_size // ALLOCATION_ALIGNMENT_BYTES) * ALLOCATION_ALIGNMENT_BYTES
    return (layers - 1) * stride + layer_size


class _DeviceRun:
    def __init__(self, manager: Manager, device: int, args: argparse.Namespace, batch: int):
        self.manager = manager
        self.device = device
        self.batch = batch
        self.args = args
        self.sim = manager.backend if isinstance(manager.backend, SimBackend) else None
        self.vbar = manager.create_vbar(vbar_bytes(args.layers, args.layer_size), device=device)
        self.layers = [self.vbar.alloc(args.layer_size) for _ in range(args.layers)]
        self.signatures = [None] * args.layers
        self.error: BaseException | None = None
        self.step: dict = {}

    def forward(self) -> None:
        copied = hits = offloaded = 0
        compute_seconds = self.args.layer_compute_ms / 1000 * self.batch
        began = self.sim.now(self.device) if self.sim else time.perf_counter()
        evicted = self.manager.stats(self.device)["evicted_bytes"]
        spans = []  # on the simulator: the step's timeline, in virtual seconds from its start
        try:
            for index, layer in enumerate(self.layers):
                signature = self.vbar.fault(layer)
                if signature is None:
                    offloaded += 1  # streamed through a temporary buffer
                    copy = True
                elif signature == self.signatures[index]:
                    hits += 1
                    copy = False
                else:
                    copy = True
                self.signatures[index] = signature
                if copy:
                    copied += layer.size
                if self.sim:
                    name = f"layer {index}"
                    start = self.sim.now(self.device) - began
                    if copy:  # in line: the compute engine waits for it
                        self.sim.copy_to_device(self.device, layer.size)
                        copied_at = self.sim.now(self.device) - began
                        spans.append(TimedSpan("copy", name, start, copied_at, "host"))
                        spans.append(TimedSpan("stall", name, start, copied_at))
                        start = copied_at
                    self.sim.compute(self.device, compute_seconds)
                    spans.append(
                        TimedSpan("compute", name, start, self.sim.now(self.device) - began)
                    )
                if signature is not None:
                    self.vbar.unpin(layer)
        except BaseException as error:  # reported by the main thread
            self.error = error
        ended = self.sim.now(self.device) if self.sim else time.perf_counter()
        seconds = ended - began
        stalled = sum(span.end - span.start for span in spans if span.lane == "stall")
        self.timings = ForwardTimings(
            seconds=seconds,
            compute_seconds=seconds - stalled,
            stall_seconds=stalled,
            copy_seconds=stalled,
            bytes_from_host=copied,
            bytes_from_peers=0,
            bytes_from_files=0,
            clock="virtual",
            blocks=(),
            spans=tuple(spans),
        )
        self.step = {
            "copied": copied,
            "hits": hits,
            "offloaded": offloaded,
            "seconds": ended - began,
            "compute": compute_seconds * len(self.layers),
            "evicted": self.manager.stats(self.device)["evicted_bytes"] - evicted,
        }


def _run_config(args, label: str, devices: list[int], batch: int, plot=None) -> list[dict]:
    """Run `args.steps` forward passes on `devices` (one thread each); returns the last
    step's figures per device. With `plot` (a path), saves the picture of the devices'
    pages and (on the simulator) of the last step's timeline."""
    backend = resolve_backend(args.backend)
    with Manager(backend, devices, vram_limit=args.vram_limit, page_size=args.page_size) as manager:
        sim = backend if isinstance(backend, SimBackend) else None
        runs = [_DeviceRun(manager, d, args, batch) for d in devices]
        print(
            f"\n{label} ({manager.backend_name}, budget "
            + ", ".join(f"device {d}: {format_size(manager.budget_bytes(d))}" for d in devices)
            + ")"
        )
        clock = "virtual" if sim else "wall"
        print(
            f"{'step':>4} {'device':>6} {'resident':>11} {'hits':>5} {'offloaded':>9} "
            f"{'copied':>11} {'evicted':>11} {'step (' + clock + ')':>15}"
            + (f" {'floor':>9} {'of floor':>8}" if sim else "")
        )
        for step in range(1, args.steps + 1):
            threads = [threading.Thread(target=run.forward) for run in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for run in runs:
                if run.error is not None:
                    raise run.error
                st = run.step
                line = (
                    f"{step:>4} {run.device:>6} "
                    f"{format_size(manager.resident_bytes(run.device)):>11} "
                    f"{st['hits']:>5} {st['offloaded']:>9} {format_size(st['copied']):>11} "
                    f"{format_size(st['evicted']):>11} {st['seconds'] * 1000:>12.1f} ms"
                )
                if sim:
                    bandwidth = sim._specs[run.device][4]
                    floor = max(st["compute"], st["copied"] / bandwidth)
                    st["floor"] = floor
                    line += f" {floor * 1000:>6.1f} ms {floor / st['seconds']:>7.0%}"
                print(line)
        if plot is not None:
            from . import plot as pictures

            timings = {f"device {run.device}": run.timings for run in runs} if sim else {}
            if timings:
                pictures.overview(manager, timings, plot)
            else:  # nothing was timed on a GPU: nothing ran
                pictures.residency_map(manager, plot)
            print(f"\npicture: {plot}")
        return [run.step for run in runs]


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run_demo(args: argparse.Namespace) -> int:
    """The demo for arguments that ``python -m aimdo demo``'s parser checked."""
    backend = resolve_backend(args.backend)
    workload = args.workload
    if workload == "auto":
        real = not isinstance(backend, SimBackend) and _torch_installed()
        workload = "torch" if real else "declared"
    if workload == "torch":
        if not _torch_installed():
            raise _core.AimdoError("the torch workload needs PyTorch: pip install 'aimdo[torch]'")
        from ._demo_torch import run_torch_demo

        return run_torch_demo(args)
    count = backend.device_count
    devices = args.devices if args.devices is not None else list(range(min(count, 2)))
    print(
        f"aimdo demo: a {format_size(args.layers * args.layer_size)} model "
        f"({args.layers} layers of "
        f"{format_size(args.layer_size)}), each device limited to {format_size(args.vram_limit)}, "
        f"{args.layer_compute_ms:g} ms of compute per layer per batch item"
    )
    alone = len(devices) < 2
    one = _run_config(
        args,
        f"1 device at batch 2 (device {devices[0]})",
        devices[:1],
        2,
        args.plot if alone else None,
    )
    if alone:
        print("\n(one device only: the two-device run needs --devices with two ordinals)")
        return 0
    two = _run_config(
        args,
        f"2 devices at batch 1 each (devices {devices[0]}, {devices[1]})",
        devices[:2],
        1,
        args.plot,
    )
    one_step = one[0]["seconds"]
    two_step = max(run["seconds"] for run in two)
    if "floor" not in one[0]:
        print(
            f"\nlast step: aimdo's own cost (nothing was copied or computed): "
            f"{one_step * 1000:.2f} ms on 1 device, {two_step * 1000:.2f} ms on 2 devices"
        )
        return 0
    print(
        f"\nlast step (virtual): 1 device {one_step * 1000:.1f} ms, 2 devices "
        f"{two_step * 1000:.1f} ms: {one_step / two_step:.2f}x"
    )
    if "floor" in one[0]:
        two_floor = max(run["floor"] for run in two)
        print(
            f"physical floor: 1 device {one[0]['floor'] * 1000:.1f} ms, 2 devices "
            f"{two_floor * 1000:.1f} ms ({one[0]['floor'] / two_floor:.2f}x); "
            "the demo does not overlap copies with compute"
        )
    return 0
