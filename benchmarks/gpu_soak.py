"""Two GPUs, two threads, forced eviction every step, and a third thread allocating
outside memory through reclaim: run for a while and check that nothing fails, that
every step's output is bitwise identical to an all-resident reference, and that free
memory returns to its starting value after close. Needs CUDA and PyTorch.

    python -m benchmarks.gpu_soak [--minutes 2] [--layers 96] [--vram-limit 8GiB] [--out FILE]

Each GPU runs its own VBAR holding a stack of square bf16 layers (x = tanh(x @ W / 64))
larger than the device's vram_limit. Every step starts with vbar.prioritize(), so the
pages evicted last step are mapped again and others evicted: eviction on every step.
Weights are copied in from pinned host memory exactly when a fault's signature differs
from the last one; offloaded layers go through a temporary buffer.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import aimdo

from ._common import environment, median, write


class _DeviceView:
    """A CUDA array interface over VBAR memory, so torch.as_tensor views it in place."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


def release_torch_caches(torch, devices) -> None:
    """Give PyTorch's cached blocks and cuBLAS workspaces back to the driver, so that free
    memory shows what aimdo holds."""
    for d in devices:
        torch.cuda.synchronize(d)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=aimdo.parse_size("8GiB"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    devices = [0, 1]
    width, dtype = args.width, torch.bfloat16
    layer_bytes = width * width * 2

    # Weights made on the GPU (fast) and kept in pinned host memory, shared by both GPUs.
    generator = torch.Generator(device="cuda:0").manual_seed(0)
    host = []
    for _ in range(args.layers):
        w = torch.randn(width, width, device="cuda:0", dtype=dtype, generator=generator)
        host.append(w.cpu().pin_memory())
    x0 = torch.randn(args.batch, width, dtype=dtype, generator=torch.Generator().manual_seed(1))

    def forward(weights):
        x = x0.to(weights[0].device)
        for w in weights:
            x = torch.tanh(x @ w / 64)
        return x

    # All-resident reference on each device (same kernels, same device).
    reference = {}
    for d in devices:
        with torch.cuda.device(d):
            weights = [w.to(d) for w in host]
            reference[d] = forward(weights).cpu()
            del weights
            torch.cuda.synchronize(d)

    # The first cuBLAS call on a new thread keeps ~66 MiB of the driver's memory for the
    # rest of the process (measured on H100, PyTorch 2.11; it does not grow after). Pay
    # that once on a throwaway thread per device before taking the starting figure, so
    # that the comparison shows what aimdo holds.
    def warm(device):
        with torch.cuda.device(device):
            w = host[0].to(device)
            torch.tanh(x0.to(device) @ w / 64)
            release_torch_caches(torch, [device])

    for d in devices:
        warm_thread = threading.Thread(target=warm, args=(d,))
        warm_thread.start()
        warm_thread.join()
    release_torch_caches(torch, devices)
    start_free = {d: torch.cuda.mem_get_info(d)[0] for d in devices}

    manager = aimdo.Manager("cuda", devices, vram_limit=args.vram_limit, poll_interval=0)
    stop = threading.Event()
    failures = []
    steps = {d: [] for d in devices}
    outside = {"allocations": 0, "bytes": 0, "reclaimed": 0}

    def drive(device):
        try:
            torch.cuda.set_device(device)
            vbar = manager.create_vbar(args.layers * layer_bytes, device)
            allocations = [vbar.alloc(layer_bytes) for _ in range(args.layers)]
            # A view can only be made once its pages are mapped (PyTorch checks the pointer),
            # and stays valid after: the address never changes, only what backs it.
            views = [None] * args.layers

            def view(i):
                if views[i] is None:
                    # bf16 has no array-interface type string: view as fp16, then as bf16.
                    cai = _DeviceView(allocations[i].address, (width, width), "<f2")
                    views[i] = torch.as_tensor(cai).view(dtype)
                    assert views[i].device.index == device
                    assert views[i].data_ptr() == allocations[i].address
                return views[i]

            temporary = torch.empty(width, width, device=device, dtype=dtype)
            last = [None] * args.layers
            deadline = time.monotonic() + args.minutes * 60
            while time.monotonic() < deadline and not stop.is_set():
                began = time.perf_counter()
                evicted_before = manager.stats(device)["evicted_bytes"]
                vbar.prioritize()
                x = x0.to(device)
                copied = offloaded = 0
                for i, allocation in enumerate(allocations):
                    signature = vbar.fault(allocation)
                    if signature is None:
                        temporary.copy_(host[i], non_blocking=True)
                        x = torch.tanh(x @ temporary / 64)
                        last[i] = None
                        offloaded += 1
                        continue
                    if signature != last[i]:
                        view(i).copy_(host[i], non_blocking=True)
                        last[i] = signature
                        copied += 1
                    x = torch.tanh(x @ view(i) / 64)
                    vbar.unpin(allocation)
                out = x.cpu()
                steps[device].append(
                    {
                        "seconds": time.perf_counter() - began,
                        "identical": bool(torch.equal(out, reference[device])),
                        "copied_layers": copied,
                        "offloaded_layers": offloaded,
                        "evicted_bytes": manager.stats(device)["evicted_bytes"] - evicted_before,
                        "resident_bytes": manager.resident_bytes(device),
                    }
                )
            views = temporary = None  # drop the tensors before the VBAR closes
            torch.cuda.synchronize(device)
            vbar.close()
            # cuBLAS workspaces belong to this thread's handles: give them back here.
            release_torch_caches(torch, [device])
        except BaseException as error:  # reported below
            failures.append(f"device {device}: {type(error).__name__}: {error}")
            stop.set()

    def outsider():
        rng = random.Random(2)
        try:
            while not stop.is_set():
                device = rng.choice(devices)
                nbytes = rng.randrange(256, 2048) << 20
                outside["reclaimed"] += manager.reclaim(device, nbytes)
                tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
                tensor.fill_(1)
                outside["allocations"] += 1
                outside["bytes"] += nbytes
                time.sleep(0.05)
                del tensor
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
        except BaseException as error:  # reported below
            failures.append(f"outsider: {type(error).__name__}: {error}")
            stop.set()

    threads = [threading.Thread(target=drive, args=(d,)) for d in devices]
    third = threading.Thread(target=outsider)
    for thread in threads:
        thread.start()
    third.start()
    for thread in threads:
        thread.join()
    stop.set()
    third.join()
    aimdo_after = {d: {"usage_bytes": manager.usage_bytes(d), **manager.stats(d)} for d in devices}
    manager.close()
    release_torch_caches(torch, devices)
    end_free = {d: torch.cuda.mem_get_info(d)[0] for d in devices}

    summary = {}
    for d in devices:
        s = steps[d]
        summary[d] = {
            "steps": len(s),
            "all_identical": all(x["identical"] for x in s),
            "median_step_seconds": median(x["seconds"] for x in s) if s else None,
            "steps_with_eviction": sum(1 for x in s if x["evicted_bytes"] > 0),
            "copied_layers_median": median(x["copied_layers"] for x in s) if s else None,
            "offloaded_layers_median": median(x["offloaded_layers"] for x in s) if s else None,
            "max_resident_bytes": max((x["resident_bytes"] for x in s), default=0),
            "aimdo_usage_bytes_after_close": aimdo_after[d]["usage_bytes"],
            "aimdo_pages_mapped": aimdo_after[d]["pages_mapped"],
            "aimdo_pages_released": aimdo_after[d]["pages_released"],
            "free_bytes_start": start_free[d],
            "free_bytes_end": end_free[d],
        }
    result = {
        "benchmark": "gpu_soak",
        "environment": environment(),
        "gpus": [torch.cuda.get_device_name(d) for d in devices],
        "args": {k: v for k, v in vars(args).items()},
        "failures": failures,
        "outside": outside,
        "devices": summary,
    }
    print(json.dumps(result, indent=2))
    write("gpu_soak", result, args.out)
    ok = (
        not failures
        and all(v["all_identical"] and v["steps"] > 0 for v in summary.values())
        and all(v["free_bytes_end"] == v["free_bytes_start"] for v in summary.values())
    )
    print("gpu_soak:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
