"""Where a two-GPU split of Qwen-Image loses its time (a probe, issue 13): each member's
call alone and both at once, at the real size and at a tiny latent (whose GPU time is
small, so the time to return is the host's own), and a host profile of one call.

    python -m benchmarks.split_probe [--vram-limit 24GiB]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import aimdo
import aimdo.torch as atorch
import torch

from .real_models import QWEN_HALF_SEEDS, qwen_image, qwen_inputs

GiB = 1 << 30


def small_inputs(model, seed: int, device, side: int = 8, text: int = 16) -> dict:
    """A batch-1 call with a side x side latent and `text` text tokens."""
    g = torch.Generator().manual_seed(seed)
    channels = model.config.in_channels
    width = model.config.joint_attention_dim
    return {
        "hidden_states": torch.randn(1, side * side, channels, generator=g).to(
            device, torch.bfloat16
        ),
        "encoder_hidden_states": torch.randn(1, text, width, generator=g).to(
            device, torch.bfloat16
        ),
        "encoder_hidden_states_mask": torch.ones(1, text).to(device),
        "timestep": torch.full((1,), 0.5).to(device),
        "img_shapes": [(1, side, side)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=24 * GiB)
    args = parser.parse_args()
    devices = [torch.device("cuda", d) for d in (0, 1)]
    model, _ = qwen_image(False, devices[0])
    model.to("cpu")
    torch.cuda.empty_cache()
    inputs = {
        "full": [
            qwen_inputs(False, model, 1, seed, device)
            for seed, device in zip(QWEN_HALF_SEEDS, devices, strict=True)
        ],
        "tiny latent": [
            small_inputs(model, seed, device)
            for seed, device in zip(QWEN_HALF_SEEDS, devices, strict=True)
        ],
    }
    with aimdo.Manager("cuda", [0, 1], vram_limit=args.vram_limit) as manager:
        group = atorch.offload_group(model, [0, 1], manager=manager)

        def step(size, i, record):
            torch.cuda.set_device(devices[i])
            torch.cuda.synchronize(devices[i])
            start = time.perf_counter()
            group[i](**inputs[size][i], return_dict=True)
            returned = time.perf_counter()
            torch.cuda.synchronize(devices[i])
            record.append((i, returned - start, time.perf_counter() - start))

        def both(size, record):
            threads = [threading.Thread(target=step, args=(size, i, record)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def show(what, record):
            per = {}
            for i, host, total in record:
                per.setdefault(i, []).append((host, total))
            print(
                f"{what}: "
                + "; ".join(
                    f"GPU {i} returned {statistics.median(h for h, _ in v) * 1000:.1f} ms, "
                    f"done {statistics.median(t for _, t in v) * 1000:.1f} ms"
                    for i, v in sorted(per.items())
                ),
                flush=True,
            )

        for size in inputs:
            for _ in range(3):
                both(size, [])
        for size in inputs:
            for i in (0, 1):
                record = []
                for _ in range(3):
                    step(size, i, record)
                show(f"{size}, GPU {i} alone", record)
            record = []
            for _ in range(4):
                both(size, record)
            show(f"{size}, both at once", record)
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        step("tiny latent", 0, [])
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
        group.undo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
