"""Fault/unpin throughput: one thread on one simulated device against one thread per
device on two devices. Each device has its own lock, so two devices should give close
to twice the operations per second of one (the target is at least 1.8x).

Three measurements, each against its own one-device baseline in the same run:
- native, "hit": C++ threads, every fault finds its pages resident;
- native, "churn": C++ threads, the working set is twice the budget (evictions and maps);
- python: Python threads calling Vbar.fault/unpin on resident pages. CPython runs one
  thread's bytecode at a time, so this shows what the GIL leaves, not the core's locks.

    python -m benchmarks.fault_scaling [--seconds 1.0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time

from ._common import build_native, environment, save

PAGE = 2 << 20


def python_threads(devices: list[int], seconds: float) -> float:
    import aimdo

    sim = aimdo.SimBackend("2x1GiB")
    with aimdo.Manager(
        sim, [0, 1], vram_limit=64 * PAGE, headroom=0, page_size=PAGE, poll_interval=1e9
    ) as manager:
        vbars = {d: manager.create_vbar(16 * PAGE, d) for d in devices}
        allocations = {d: [vbars[d].alloc(PAGE) for _ in range(16)] for d in devices}
        for d in devices:
            for allocation in allocations[d]:
                vbars[d].fault(allocation)
                vbars[d].unpin(allocation)
        counts = {}
        start_line = threading.Barrier(len(devices) + 1)
        stop = [False]

        def work(device):
            vbar, mine, n = vbars[device], allocations[device], 0
            start_line.wait()
            while not stop[0]:
                for allocation in mine:
                    vbar.fault(allocation)
                    vbar.unpin(allocation)
                n += len(mine)
            counts[device] = n

        threads = [threading.Thread(target=work, args=(d,)) for d in devices]
        for thread in threads:
            thread.start()
        start_line.wait()
        began = time.perf_counter()
        time.sleep(seconds)
        stop[0] = True
        for thread in threads:
            thread.join()
        return sum(counts.values()) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    program = build_native("aimdo_bench_fault_scaling")
    rows = {}
    for workload in ("hit", "churn"):
        runs = [
            json.loads(
                subprocess.run(
                    [str(program), str(args.seconds), workload],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            for _ in range(args.repeats)
        ]
        rows[f"native {workload}"] = runs
    python_runs = []
    for _ in range(args.repeats):
        one = python_threads([0], args.seconds)
        two = python_threads([0, 1], args.seconds)
        python_runs.append(
            {"one_device_ops_per_s": one, "two_devices_ops_per_s": two, "ratio": two / one}
        )
    rows["python hit"] = python_runs

    print(
        f"{'measurement':<14} {'1 device ops/s':>16} {'2 devices ops/s':>16} {'ratio (median)':>15}"
    )
    summary = {}
    for name, runs in rows.items():
        ratio = statistics.median(r["ratio"] for r in runs)
        one = statistics.median(r["one_device_ops_per_s"] for r in runs)
        two = statistics.median(r["two_devices_ops_per_s"] for r in runs)
        summary[name] = {
            "one_device_ops_per_s": one,
            "two_devices_ops_per_s": two,
            "ratio_median": ratio,
            "runs": runs,
        }
        print(f"{name:<14} {one:>16,.0f} {two:>16,.0f} {ratio:>15.2f}")
    result = {
        "benchmark": "fault_scaling",
        "seconds": args.seconds,
        "repeats": args.repeats,
        "environment": environment(),
        "results": summary,
    }
    print(f"written to {save('fault_scaling', result)}")


if __name__ == "__main__":
    main()
