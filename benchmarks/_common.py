"""Shared by the benchmarks: where they ran, on what commit, and where results go."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def environment() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # AIMDO_COMMIT names the commit where the tree travelled without its .git.
        "commit": os.environ.get("AIMDO_COMMIT") or git("rev-parse", "--short", "HEAD"),
        # None where there is no git checkout (the tree travelled without its .git).
        "dirty": None
        if (status := git("status", "--porcelain", "--untracked-files=no")) == "unknown"
        else bool(status),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def show_log(level: str) -> None:
    """Print aimdo's log (logger ``aimdo``) at `level` and above on stderr: the choices it
    made and why (tiers, prefetch, regimes, evictions for others' memory)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  log %(levelname)s %(message)s"))
    logger = logging.getLogger("aimdo")
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper()))


def median(values) -> float:
    """The middle value (the upper one of an even count), as every benchmark reports it."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


#: Steps run, at most, untimed while offload(prefetch="auto") still chooses its depth.
TRIAL_STEPS = 32


def run_trials(handle, step) -> int:
    """Call `step()` (one untimed step) while `handle` (an aimdo.torch Offload with
    prefetch="auto") still chooses its depth, at most TRIAL_STEPS times; returns how
    many ran."""
    trials = 0
    while handle.prefetch_choosing and trials < TRIAL_STEPS:
        step()
        trials += 1
    return trials


def steady_median(step_seconds: list) -> float:
    """The median step after the first (which maps, learns the order or warms up)."""
    return median(step_seconds[1:] or step_seconds)


def build_native(target: str) -> Path:
    """Configure and build a native benchmark program; returns its path."""
    build = ROOT / "build" / "benchmarks"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            "-DAIMDO_BUILD_PYTHON=OFF",
            "-DAIMDO_BUILD_BENCHMARKS=ON",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", target, "--parallel"],
        check=True,
        capture_output=True,
    )
    return build / target


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def write(name: str, result: dict, out: str | None, keep: bool = True) -> None:
    """Write `result` as JSON to `out` when given, else (when `keep`) to results/NAME.json."""
    if out:
        with open(out, "w") as f:
            f.write(json.dumps(result, indent=2, default=str) + "\n")
    elif keep:
        save(name, result)
