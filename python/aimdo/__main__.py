"""Command line: ``python -m aimdo info`` and ``python -m aimdo demo``."""

from __future__ import annotations

import argparse
import sys

from . import _core
from ._sizes import format_size, parse_size


def _devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--devices takes ordinals such as 0,1; got {text!r}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["sim", "cuda"], default=None,
                        help="sim (default, or what AIMDO_BACKEND says) or cuda")
    parser.add_argument("--devices", type=_devices, default=None,
                        help="comma-separated device ordinals (default: every device)")


def _info(args: argparse.Namespace) -> int:
    from ._manager import Manager

    with Manager(args.backend, args.devices) as manager:
        print(f"backend: {manager.backend_name}")
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
    _add_backend_arguments(info)

    demo = commands.add_parser(
        "demo", help="run a model larger than the GPUs' budgets layer by layer on each device")
    _add_backend_arguments(demo)
    demo.add_argument("--layers", type=int, default=48, help="layers in the model (default 48)")
    demo.add_argument("--layer-size", type=_size, default=parse_size("256MiB"),
                      help="bytes of weights per layer (default 256MiB)")
    demo.add_argument("--vram-limit", type=_size, default=parse_size("8GiB"),
                      help="memory aimdo treats each device as having (default 8GiB)")
    demo.add_argument("--steps", type=int, default=4, help="forward passes (default 4)")
    demo.add_argument("--page-size", type=_size, default=parse_size("32MiB"),
                      help="VBAR page size (default 32MiB)")
    demo.add_argument("--layer-compute-ms", type=float, default=1.5,
                      help="declared compute per layer per batch item, simulator only (default 1.5)")

    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        from ._demo import run_demo

        return run_demo(args)
    except (_core.AimdoError, ValueError, TypeError) as error:
        # The world's errors and bad arguments: one line, no traceback.
        print(f"aimdo: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
