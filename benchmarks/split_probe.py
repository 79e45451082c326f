"""Where a two-GPU split of Qwen-Image loses its time (a probe, issue 13): each member's
step alone and both at once, the host time of a member's forward, synchronizing calls."""

from __future__ import annotations

import sys
import threading
import time

import aimdo
import aimdo.torch as atorch
import torch

from .real_models import QWEN_HALF_SEEDS, qwen_image, qwen_inputs

GiB = 1 << 30


def main() -> int:
    devices = [torch.device("cuda", d) for d in (0, 1)]
    model, _ = qwen_image(False, devices[0])
    model.to("cpu")
    torch.cuda.empty_cache()
    halves = [
        qwen_inputs(False, model, 1, seed, device)
        for seed, device in zip(QWEN_HALF_SEEDS, devices, strict=True)
    ]
    with aimdo.Manager("cuda", [0, 1], vram_limit=24 * GiB) as manager:
        group = atorch.offload_group(model, [0, 1], manager=manager)

        def step(i, host=None):
            torch.cuda.set_device(devices[i])
            torch.cuda.synchronize(devices[i])
            start = time.perf_counter()
            group[i](**halves[i], return_dict=True)
            launched = time.perf_counter()
            torch.cuda.synchronize(devices[i])
            end = time.perf_counter()
            if host is not None:
                host.append((i, launched - start, end - start))
            return launched - start, end - start

        def both(record):
            threads = [threading.Thread(target=step, args=(i, record)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        for _ in range(3):
            both([])
        for i in (0, 1):
            times = [step(i) for _ in range(3)]
            print(
                f"GPU {i} alone: host {[round(h * 1000, 1) for h, _ in times]} ms, "
                f"step {[round(s * 1000, 1) for _, s in times]} ms; stats {group.last_stats[i]}",
                flush=True,
            )
        for _ in range(3):
            record = []
            both(record)
            print(
                "both at once: "
                + "; ".join(
                    f"GPU {i} host {h * 1000:.1f} step {s * 1000:.1f} ms" for i, h, s in record
                ),
                flush=True,
            )
        print("stats:", group.last_stats, flush=True)
        torch.cuda.set_sync_debug_mode("warn")
        step(0)
        torch.cuda.set_sync_debug_mode(0)
        for interval in (1e-3,):
            sys.setswitchinterval(interval)
            record = []
            both(record)
            print(
                f"switch interval {interval}: "
                + "; ".join(
                    f"GPU {i} host {h * 1000:.1f} step {s * 1000:.1f} ms" for i, h, s in record
                ),
                flush=True,
            )
        # One step of GPU 0 profiled on the host: where its Python time goes.
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        step(0)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)
        group.undo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
