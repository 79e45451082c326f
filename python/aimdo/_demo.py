"""``python -m aimdo demo``: a model larger than each device's budget, run layer by
layer on every device at once (one thread per device, as classifier-free guidance
split across GPUs would), printing per-device residency, evictions and bytes copied.

Each layer's weights are one allocation in a VBAR on each device. A forward pass
faults each layer in turn: a matching signature means the weights are still resident
(no copy); a new one means they must be copied in; None means the layer is offloaded
and streams through a temporary buffer. Nothing is computed; the figures are what the
offloader decided.
"""

from __future__ import annotations

import argparse
import threading
import time

from ._manager import Manager
from ._sizes import format_size


class _DeviceRun:
    def __init__(self, manager: Manager, device: int, layers: int, layer_size: int):
        self.device = device
        self.vbar = manager.create_vbar(layers * layer_size, device=device)
        self.layers = [self.vbar.alloc(layer_size) for _ in range(layers)]
        self.signatures = [None] * layers
        self.error: BaseException | None = None
        self.step: dict = {}

    def forward(self) -> None:
        copied = hits = offloaded = 0
        started = time.perf_counter()
        try:
            for index, layer in enumerate(self.layers):
                signature = self.vbar.fault(layer)
                if signature is None:
                    offloaded += 1
                    copied += layer.size  # streamed through a temporary buffer
                    self.signatures[index] = None
                    continue
                if signature == self.signatures[index]:
                    hits += 1
                else:
                    copied += layer.size
                    self.signatures[index] = signature
                self.vbar.unpin(layer)
        except BaseException as error:  # reported by the main thread
            self.error = error
        self.step = {
            "copied": copied,
            "hits": hits,
            "offloaded": offloaded,
            "seconds": time.perf_counter() - started,
        }


def run_demo(args: argparse.Namespace) -> int:
    if args.layers < 1 or args.steps < 1:
        raise SystemExit("--layers and --steps must be positive")
    with Manager(args.backend, args.devices, vram_limit=args.vram_limit,
                 page_size=args.page_size) as manager:
        devices = manager.devices
        model = args.layers * args.layer_size
        print(
            f"aimdo demo: backend {manager.backend_name}, devices {devices}; model "
            f"{format_size(model)} ({args.layers} layers of {format_size(args.layer_size)}) on "
            f"every device; budget per device "
            + ", ".join(f"{d}: {format_size(manager.budget_bytes(d))}" for d in devices)
        )
        runs = [_DeviceRun(manager, d, args.layers, args.layer_size) for d in devices]
        print(f"{'step':>4} {'device':>6} {'resident':>12} {'budget':>12} {'hits':>5} "
              f"{'offloaded':>9} {'copied':>12} {'evicted':>12}")
        evicted_before = {d: manager.stats(d)["evicted_bytes"] for d in devices}
        for step in range(1, args.steps + 1):
            threads = [threading.Thread(target=run.forward) for run in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for run in runs:
                if run.error is not None:
                    raise run.error
                d = run.device
                evicted = manager.stats(d)["evicted_bytes"]
                print(f"{step:>4} {d:>6} {format_size(manager.resident_bytes(d)):>12} "
                      f"{format_size(manager.budget_bytes(d)):>12} {run.step['hits']:>5} "
                      f"{run.step['offloaded']:>9} {format_size(run.step['copied']):>12} "
                      f"{format_size(evicted - evicted_before[d]):>12}")
                evicted_before[d] = evicted
        print()
        for run in runs:
            d = run.device
            resident_layers = sum(1 for s in run.signatures if s is not None)
            print(
                f"device {d}: {resident_layers} of {args.layers} layers stay resident "
                f"({format_size(manager.resident_bytes(d))} of a "
                f"{format_size(manager.budget_bytes(d))} budget); the other "
                f"{args.layers - resident_layers} stream "
                f"{format_size(run.step['copied'])} from the host each step"
            )
    return 0
