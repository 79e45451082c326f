"""How host-to-device copies and reads from the page cache slow each other (issue 14): the
pinned copy's bandwidth alone, then beside 2-16 threads reading a checkpoint's files (warm
in the page cache) into pinned 16 MiB buffers, as the file stream's readers do; and the
reads' own rate with and without the copies. Needs CUDA and a checkpoint written by
``benchmarks.from_files`` (read from its page cache: run that first).

    python -m benchmarks.dma_beside_reads [--dir /tmp/aimdo-checkpoint] [--readers 2,4,8]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

GiB = 1 << 30
PIECE = 16 << 20


def copy_rate(host: torch.Tensor, device: torch.Tensor, copies: int = 12) -> float:
    """Bytes a second of `copies` pinned host-to-device copies of `host`, one after another."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(copies):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return copies * host.numel() / (time.perf_counter() - began)


class Readers:
    """`count` threads reading `files` round and round in PIECE reads into pinned buffers
    (os.preadv lets the GIL go while it copies), counting the bytes read."""

    def __init__(self, files: list[str], count: int):
        self.files, self.count = files, count
        self.read = 0
        self._stop = False
        self._threads = []

    def _run(self, index: int) -> None:
        fd = os.open(self.files[index % len(self.files)], os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            buffer = torch.empty(PIECE, dtype=torch.uint8).pin_memory().numpy()
            offset = index * (256 << 20) % (size - PIECE)
            while not self._stop:
                got = os.preadv(fd, [buffer], offset)
                self.read += got
                offset = (offset + got) % (size - PIECE)
        finally:
            os.close(fd)

    def __enter__(self):
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(self.count)]
        for thread in self._threads:
            thread.start()
        time.sleep(0.5)  # every reader going
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        for thread in self._threads:
            thread.join()

    def rate_over(self, work) -> float:
        """Bytes a second read while `work()` runs."""
        before, began = self.read, time.perf_counter()
        work()
        return (self.read - before) / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/aimdo-checkpoint")
    parser.add_argument("--readers", default="2,4,8,12,16")
    args = parser.parse_args()
    files = [
        os.path.join(args.dir, name)
        for name in sorted(os.listdir(args.dir))
        if name.endswith(".safetensors")
    ]
    if not files:
        raise SystemExit(f"no .safetensors file in {args.dir}: run benchmarks.from_files first")
    host = torch.empty(GiB, dtype=torch.uint8).pin_memory()
    device = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    print(f"copies alone {copy_rate(host, device) / 1e9:.1f} GB/s", flush=True)
    for count in (int(n) for n in args.readers.split(",")):
        copies = []
        with Readers(files, count) as readers:
            reads = readers.rate_over(lambda out=copies: out.append(copy_rate(host, device)))
        with Readers(files, count) as readers:
            alone = readers.rate_over(lambda: time.sleep(1.0))
        print(
            f"{count} readers: copies {copies[0] / 1e9:.1f} GB/s with reads at "
            f"{reads / 1e9:.1f} GB/s; reads alone {alone / 1e9:.1f} GB/s",
            flush=True,
        )
    print(f"copies alone again {copy_rate(host, device) / 1e9:.1f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
