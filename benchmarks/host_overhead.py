"""Host time aimdo.torch.offload adds to a forward, per module: a model of many small
modules, each a block of its own, run plain on the device and offloaded in place,
forwards interleaved, every block a hit once warm (the budget holds them all) unless
--budget says otherwise. Two models: LayerNorms (a real kernel per module), and probes,
modules with a weight whose forward returns its input without reading it, so that the
difference is aimdo's own time alone (dispatch, fault, views, unpin, the output check).

    python -m benchmarks.host_overhead [--backend sim|cuda] [--modules 1000] [--width 64]
                                       [--forwards 50] [--budget 8MiB] [--out FILE]

On the simulator the "device" is the CPU, and the LayerNorms read their weights from the
simulator's mapped pages (spread over many pages) rather than the plain model's heap,
which costs the kernels a little: the probe figure is the one to compare. On cuda each
forward is followed by a synchronize, in both runs, so the figures include the GPU's
time, which for modules this small is below the host's. Target (issue 12): at most 5
microseconds of host time per module per forward on a hit, on the GPU machine's CPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import aimdo
import torch
from aimdo.torch import offload

from ._common import environment, median, write


class Probe(torch.nn.Module):
    """A block of its own whose forward does not read it."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x


def build(kind: str, modules: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    make = Probe if kind == "probe" else torch.nn.LayerNorm
    return torch.nn.Sequential(*[make(width) for _ in range(modules)]).eval()


def timed(model, x, synchronize) -> float:
    start = time.perf_counter()
    model(x)
    synchronize()
    return time.perf_counter() - start


def measure(args, manager, device: torch.device, kind: str) -> dict:
    model = build(kind, args.modules, args.width)
    x = torch.randn(8, args.width, device=device)
    plain = copy.deepcopy(model).to(device)
    if device.type == "cuda":

        def synchronize():
            torch.cuda.synchronize(device)
    else:

        def synchronize():
            return None

    with offload(model, args.device, manager=manager) as handle:
        with torch.no_grad():
            expected = plain(x)
            assert torch.equal(model(x), expected), "offloaded output differs"  # learns
            model(x)
            plain_s, offloaded_s = [], []
            for _ in range(args.forwards):
                plain_s.append(timed(plain, x, synchronize))
                offloaded_s.append(timed(model, x, synchronize))
        stats = handle.last_stats
        return {
            "plain_us_per_module": median(plain_s) / args.modules * 1e6,
            "offloaded_us_per_module": median(offloaded_s) / args.modules * 1e6,
            "overhead_us_per_module": (median(offloaded_s) - median(plain_s)) / args.modules * 1e6,
            "overhead_min_us_per_module": (min(offloaded_s) - min(plain_s)) / args.modules * 1e6,
            "hits": stats.hits,
            "offloaded_layers": stats.offloaded_layers,
            "copied_layers": stats.copied_layers,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sim", "cuda"], default="sim")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--modules", type=int, default=1000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--forwards", type=int, default=50)
    parser.add_argument("--budget", default=None, help="vram_limit (default: the device's)")
    parser.add_argument("--out", default=None, help="JSON file (default: results/)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the host's own time, not a thread pool's
    if args.backend == "sim":
        backend = aimdo.SimBackend(f"{args.device + 1}x4GiB", real_bytes=True)
        device = torch.device("cpu")
    else:
        backend = aimdo.CudaBackend()
        device = torch.device("cuda", args.device)
    options = {} if args.budget is None else {"vram_limit": aimdo.parse_size(args.budget)}
    result = {}
    for kind in ("layernorm", "probe"):
        with aimdo.Manager(backend, [args.device], **options) as manager:
            result[kind] = measure(args, manager, device, kind)
        figures = result[kind]
        print(
            f"{args.modules} {kind} modules on {args.backend}: plain "
            f"{figures['plain_us_per_module']:.2f} us/module, offloaded "
            f"{figures['offloaded_us_per_module']:.2f}: "
            f"{figures['overhead_us_per_module']:.2f} us/module added "
            f"(from the fastest forwards: {figures['overhead_min_us_per_module']:.2f}); "
            f"{figures['hits']} hits, {figures['offloaded_layers']} offloaded"
        )
    result.update(
        backend=args.backend,
        modules=args.modules,
        width=args.width,
        forwards=args.forwards,
        budget=args.budget,
        environment=environment(),
    )
    write(f"host_overhead-{args.backend}", result, args.out)


if __name__ == "__main__":
    main()
