"""python -m aimdo demo: runs on the backend the suite runs on, and says what it did."""

from __future__ import annotations

import subprocess
import sys

import aimdo
import pytest
from conftest import BACKEND


def demo_process(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "aimdo", "demo", "--backend", BACKEND, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_demo(*extra):
    return demo_process(
        *("--steps", "2", "--layers", "8", "--layer-size", "64MiB"),
        *("--vram-limit", "384MiB", "--page-size", "32MiB", "--workload", "declared"),
        *extra,
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


def run_torch_demo(*extra, workload="torch"):
    # On a GPU the budget must leave room for the CUDA context the demo's PyTorch makes.
    limit = "272MiB" if BACKEND == "sim" else "4GiB"
    return demo_process(
        *("--workload", workload, "--steps", "2", "--layers", "8", "--layer-size", "4MiB"),
        *("--vram-limit", limit, "--page-size", "2MiB", "--tokens", "64"),
        *extra,
    )


def test_the_torch_workload_runs_a_real_model_offloaded_and_draws_it(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    picture = tmp_path / "demo.png"
    result = run_torch_demo("--plot", str(picture))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "all resident on " in out
    assert "offloaded to device 0 (budget " in out
    two = BACKEND == "sim" or aimdo.CudaBackend().device_count >= 2
    # Bit for bit what the model computes all resident: one device, then the group.
    assert out.count("identical to all resident: yes") == (2 if two else 1), out
    assert "identical to all resident: NO" not in out
    if two:
        assert "one group over devices 0 and 1, the batch split (regime auto)" in out
        assert "regime chosen: " in out
    assert "what each device holds now:" in out and "    VBAR 0: " in out
    assert f"picture: {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_runs_the_torch_workload_on_gpus_and_the_declared_one_on_the_simulator():
    pytest.importorskip("torch")
    result = run_torch_demo(workload="auto")
    assert result.returncode == 0, result.stderr
    if BACKEND == "sim":
        assert "1 device at batch 2 (device 0)" in result.stdout
        assert "offloaded to device 0" not in result.stdout
    else:
        assert "offloaded to device 0 (budget " in result.stdout


def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch, capsys):
    import builtins

    from aimdo import __main__

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = __main__.main(["demo", "--backend", BACKEND, "--plot", "x.png"])
    err = capsys.readouterr().err
    assert code == 1
    assert (
        err
        == "aimdo: AimdoError: --plot needs matplotlib: pip install 'aimdo[plot]' (or matplotlib)\n"
    )


def test_demo_reports_a_clean_error_for_a_device_it_does_not_have():
    result = run_demo("--devices", "0,99")
    assert result.returncode == 1
    assert "aimdo: " in result.stderr or "ValueError" in result.stderr
    assert "Traceback" not in result.stderr


def assert_reported(result):
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1 device at batch 2 (device 0)" in out
    assert "2 devices at batch 1 each (devices 0, 1)" in out
    report = "last step (virtual): 1 device" if BACKEND == "sim" else "last step: aimdo's own cost"
    assert report in out


@pytest.mark.parametrize("layer_size", [1000, (1 << 20) + 1])
def test_demo_runs_with_a_layer_size_that_is_not_a_multiple_of_the_allocation_alignment(layer_size):
    if BACKEND == "cuda" and aimdo.CudaBackend().device_count < 2:
        pytest.skip("the demo's second configuration needs two GPUs")
    assert layer_size % aimdo.ALLOCATION_ALIGNMENT_BYTES != 0
    result = run_demo("--layer-size", str(layer_size))
    assert_reported(result)
    assert f"(8 layers of {aimdo.format_size(layer_size)})" in result.stdout


@pytest.mark.parametrize(
    "option, value",
    [
        ("--layers", "0"),
        ("--layers", "-1"),
        ("--layers", "1000000000"),
        ("--layers", "2.5"),
        ("--steps", "0"),
        ("--steps", "-3"),
        ("--steps", "100000000000"),
        ("--layer-size", "0"),
        ("--layer-size", "-5"),
        ("--layer-size", "0.1"),
        ("--vram-limit", "0"),
        ("--page-size", "0"),
        ("--layer-compute-ms", "-1"),
        ("--layer-compute-ms", "nan"),
        ("--layer-compute-ms", "inf"),
        ("--layer-compute-ms", "1e300"),
        ("--devices", ","),
        ("--devices", "0,0"),
        ("--devices", "-1"),
    ],
)
def test_demo_rejects_an_option_out_of_range_before_it_runs(option, value, monkeypatch, capsys):
    from aimdo import __main__, _demo

    def must_not_run(args):
        pytest.fail(f"the demo ran with {option} {value}")

    monkeypatch.setattr(_demo, "run_demo", must_not_run)
    with pytest.raises(SystemExit) as exited:
        __main__.main(["demo", "--backend", BACKEND, option, value])
    assert exited.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("workload", ["declared", "torch"])
def test_demo_reports_a_model_too_large_for_the_backend_in_one_line(workload, capsys):
    from aimdo import __main__

    if workload == "torch":
        pytest.importorskip("torch")
    code = __main__.main(
        [
            "demo",
            "--backend",
            BACKEND,
            "--workload",
            workload,
            "--layers",
            "4",
            "--steps",
            "1",
            "--layer-size",
            "100000000TiB",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("aimdo: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "path, error",
    [("/no/such/folder/demo.png", "does not exist"), ("demo.txt", "names a .png/.svg/.pdf")],
)
def test_a_plot_path_that_cannot_be_written_is_refused_before_the_demo_runs(
    path, error, monkeypatch, capsys
):
    from aimdo import __main__, _demo

    monkeypatch.setattr(_demo, "run_demo", lambda args: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as exited:
        __main__.main(["demo", "--backend", BACKEND, "--plot", path])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --plot: " in err and error in err and "Traceback" not in err


def test_the_torch_workload_refuses_a_device_it_does_not_have_in_one_line(capsys):
    pytest.importorskip("torch")
    from aimdo import __main__

    code = __main__.main(["demo", "--backend", BACKEND, "--workload", "torch", "--devices", "0,99"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("aimdo: ValueError: device 99 is not here") and err.count("\n") == 1
