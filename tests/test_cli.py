"""python -m aimdo demo: runs on the backend the suite runs on, and says what it did."""

from __future__ import annotations

import subprocess
import sys

import pytest

import aimdo
from conftest import BACKEND


def run_demo(*extra):
    return subprocess.run(
        [sys.executable, "-m", "aimdo", "demo", "--backend", BACKEND, "--steps", "2",
         "--layers", "8", "--layer-size", "64MiB", "--vram-limit", "384MiB", "--page-size", "32MiB",
         *extra],
        capture_output=True, text=True, timeout=300,
    )


def test_demo_runs_one_device_then_two_and_compares_them():
    if BACKEND == "cuda" and aimdo.CudaBackend().device_count < 2:
        pytest.skip("the demo's second configuration needs two GPUs")
    result = run_demo()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"1 device at batch 2 (device 0) ({BACKEND}," in out
    assert f"2 devices at batch 1 each (devices 0, 1) ({BACKEND}," in out
    if BACKEND == "sim":
        assert "last step (virtual): 1 device" in out
        assert "physical floor: 1 device" in out
    else:
        assert "last step: aimdo's own cost (nothing was copied or computed)" in out


def test_demo_reports_a_clean_error_for_a_device_it_does_not_have():
    result = run_demo("--devices", "0,99")
    assert result.returncode == 1
    assert "aimdo: " in result.stderr or "ValueError" in result.stderr
    assert "Traceback" not in result.stderr
