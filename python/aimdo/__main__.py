"""Command line: ``python -m aimdo info`` and ``python -m aimdo demo``."""

from __future__ import annotations

import argparse
import os
import sys

from . import _core
from ._sizes import format_size, parse_size

# Bounds on the demo's counts: far above any real model, low enough that a typo does not
# build a billion allocations or loop for days.
MAX_LAYERS = 100_000
MAX_STEPS = 10_000
MAX_LAYER_COMPUTE_MS = 3_600_000.0  # an hour per layer per batch item


def _devices(text: str) -> list[int]:
    try:
        ordinals = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes ordinals such as 0,1; got {text!r}") from None
    if not ordinals:
        raise argparse.ArgumentTypeError(f"takes at least one ordinal, such as 0,1; got {text!r}")
    if min(ordinals) < 0:
        raise argparse.ArgumentTypeError(f"device ordinals are not negative; got {text!r}")
    if len(set(ordinals)) != len(ordinals):
        raise argparse.ArgumentTypeError(f"names a device twice: {text!r}")
    return ordinals


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_size(text: str) -> int:
    size = _size(text)
    if size == 0:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


#: What --plot can write (matplotlib picks the format from the name).
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _plot_path(text: str) -> str:
    """An argparse type: a picture's path whose folder exists and whose name says its
    format, checked before the demo runs (not after minutes of it)."""
    suffix = os.path.splitext(text)[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"names a {'/'.join(PLOT_SUFFIXES)} file; got {text!r}")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"its folder {folder!r} does not exist")
    return text


def _count(high: int):
    """An argparse type: a whole number from 1 to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from 1 to {high}, got {value}")
        return value

    return parse


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds, got {text!r}"
        ) from None
    if not 0 <= value <= MAX_LAYER_COMPUTE_MS:  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(
            f"must be from 0 to {MAX_LAYER_COMPUTE_MS:.0f} ms, got {text!r}"
        )
    return value


def _needs_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise _core.AimdoError(
            "--plot needs matplotlib: pip install 'aimdo[plot]' (or matplotlib)"
        ) from None


def _add_backend_arguments(
    parser: argparse.ArgumentParser,
    default: str = "sim (default, or what AIMDO_BACKEND says) or cuda",
) -> None:
    parser.add_argument("--backend", choices=["sim", "cuda"], default=None, help=default)
    parser.add_argument(
        "--devices",
        type=_devices,
        default=None,
        help="comma-separated device ordinals (default: every device)",
    )


def _info_backend(args: argparse.Namespace):
    """The backend info reports on, and why: --backend, else AIMDO_BACKEND, else the
    CUDA driver when it loads and reports a GPU, else the simulator."""
    import os

    from ._manager import CudaBackend

    if args.backend is not None:
        return args.backend, "chosen with --backend"
    named = os.environ.get("AIMDO_BACKEND", "").strip()
    if named:
        return named, f"chosen with AIMDO_BACKEND={named}"
    try:
        cuda = CudaBackend()
        count = cuda.device_count
    except _core.AimdoError as error:
        return "sim", f"the simulator: the CUDA driver is not usable here ({error})"
    if count == 0:
        return "sim", "the simulator: the CUDA driver reports no GPU"
    return cuda, f"the CUDA driver reports {count} GPU{'s' if count > 1 else ''}"


def _info(args: argparse.Namespace) -> int:
    from ._manager import Manager

    backend, why = _info_backend(args)
    with Manager(backend, args.devices) as manager:
        print(f"backend: {manager.backend_name}")
        print(f"why: {why}")
        for device in manager.devices:
            info = manager.device_info(device)
            free, total = manager.memory_info(device)
            print(
                f"device {device}: {info['name']}, {format_size(total)} total, "
                f"{format_size(free)} free, granularity {format_size(info['granularity_bytes'])}, "
                f"limit {format_size(manager.limit_bytes(device))}, "
                f"budget {format_size(manager.budget_bytes(device))}, "
                f"page size {format_size(info['page_size'])}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aimdo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="backend, devices, capacities and budgets")
    _add_backend_arguments(
        info,
        "sim or cuda (default: what AIMDO_BACKEND says, else cuda when the CUDA driver "
        "loads and reports a GPU, else sim)",
    )

    demo = commands.add_parser(
        "demo", help="run a model larger than the GPUs' budgets layer by layer on each device"
    )
    _add_backend_arguments(demo)
    demo.add_argument(
        "--layers",
        type=_count(MAX_LAYERS),
        default=48,
        help=f"layers in the model, 1 to {MAX_LAYERS} (default 48)",
    )
    demo.add_argument(
        "--layer-size",
        type=_positive_size,
        default=parse_size("256MiB"),
        help="bytes of weights per layer (default 256MiB)",
    )
    demo.add_argument(
        "--vram-limit",
        type=_positive_size,
        default=parse_size("8GiB"),
        help="memory aimdo treats each device as having (default 8GiB)",
    )
    demo.add_argument(
        "--steps",
        type=_count(MAX_STEPS),
        default=4,
        help=f"forward passes, 1 to {MAX_STEPS} (default 4)",
    )
    demo.add_argument(
        "--page-size",
        type=_positive_size,
        default=parse_size("32MiB"),
        help="VBAR page size (default 32MiB)",
    )
    demo.add_argument(
        "--layer-compute-ms",
        type=_milliseconds,
        default=1.5,
        help="declared compute per layer per batch item, simulator only, "
        f"0 to {MAX_LAYER_COMPUTE_MS:.0f} (default 1.5)",
    )

    demo.add_argument(
        "--workload",
        choices=["auto", "declared", "torch"],
        default="auto",
        help="torch: a real PyTorch model offloaded by aimdo.torch (computed on the CPU on "
        "the simulator); declared: layers whose copies and compute are declared, virtual "
        "time on the simulator and aimdo's decisions only on GPUs; auto (default): torch on "
        "cuda when PyTorch is installed, else declared",
    )
    demo.add_argument(
        "--tokens",
        type=_count(1 << 24),
        default=4096,
        help="tokens in a batch of the torch workload (two batch items; default 4096)",
    )
    demo.add_argument(
        "--plot",
        metavar="FILE.png",
        type=_plot_path,
        default=None,
        help="save a picture of each device's pages and of the last step's timeline "
        "(needs matplotlib: pip install 'aimdo[plot]')",
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.plot is not None:
            _needs_matplotlib()
        from ._demo import run_demo

        return run_demo(args)
    except (_core.AimdoError, ValueError, TypeError) as error:
        # The world's errors and bad arguments: one line, no traceback.
        print(f"aimdo: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
