"""How file reads and a busy Python thread slow each other (issue 14), on the host alone
(no GPU): a file is read in pieces into a ring of buffers, as the host tiers read a
checkpoint, once by aimdo's native readers (aimdo._core.FileReads, which never take the
GIL) and once by Python threads calling os.preadv (how the ring read before), each alone
and then beside a thread that runs Python without pause (standing in for a forward's
thread: hooks and kernel launches).

    python -m benchmarks.file_reads_gil [--file-mib 1024] [--piece-mib 16] [--readers 8]
                                        [--seconds 2] [--out results.json]

Reported for each reader: read speed alone and beside the busy thread, and the busy
thread's Python calls per second alone and beside the reads. Python's switch interval is
left at its default (5 ms) unless --switch-interval is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from aimdo import _core

from ._common import environment, write

MiB = 1 << 20


def busy_python(stop: threading.Event, counter: list) -> None:
    """Python calls without pause until `stop`: counter[0] counts them."""

    def step(x):
        return x + 1

    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n = step(n)
        counter[0] = n


def read_native(fd: int, size: int, piece: int, ring: list, readers: int) -> float:
    """Read the file once through FileReads, the pump's way; returns seconds."""
    status = os.fstat(fd)
    stamp = (status.st_size, status.st_mtime_ns, status.st_ino)
    reads = _core.FileReads(readers)
    start = time.perf_counter()
    pending: deque = deque()
    turn = 0
    for offset in range(0, size, piece):
        if len(pending) == len(ring):
            ticket = pending.popleft()
            while not reads.wait(ticket):
                pass
            assert reads.take(ticket)[0] == "done"
        count = min(piece, size - offset)
        pending.append(reads.submit(fd, -1, offset, count, ring[turn], *stamp))
        turn = (turn + 1) % len(ring)
    for ticket in pending:
        while not reads.wait(ticket):
            pass
        assert reads.take(ticket)[0] == "done"
    seconds = time.perf_counter() - start
    reads.close()
    return seconds


def read_python(fd: int, size: int, piece: int, ring: list, readers: int) -> float:
    """Read the file once with Python threads calling os.preadv (stamp checked with
    os.fstat first, as the Reader did); returns seconds."""

    def read(view, offset, count):
        os.fstat(fd)
        done = 0
        while done < count:
            done += os.preadv(fd, [view[done:count]], offset + done)

    pool = ThreadPoolExecutor(readers)
    start = time.perf_counter()
    pending: deque = deque()
    turn = 0
    for offset in range(0, size, piece):
        if len(pending) == len(ring):
            pending.popleft().result()
        count = min(piece, size - offset)
        pending.append(pool.submit(read, ring[turn], offset, count))
        turn = (turn + 1) % len(ring)
    for future in pending:
        future.result()
    seconds = time.perf_counter() - start
    pool.shutdown()
    return seconds


def measure(reader, fd, size, piece, ring, readers, seconds: float) -> dict:
    """Reads for `seconds` alone, then beside the busy thread; the busy thread alone."""

    def reads_for(duration):
        total, spent = 0, 0.0
        while spent < duration:
            spent += reader(fd, size, piece, ring, readers)
            total += size
        return total / spent

    alone = reads_for(seconds)
    stop, counter = threading.Event(), [0]
    busy = threading.Thread(target=busy_python, args=(stop, counter))
    busy.start()
    time.sleep(0.05)
    before, clock = counter[0], time.perf_counter()
    beside = reads_for(seconds)
    calls = (counter[0] - before) / (time.perf_counter() - clock)
    stop.set()
    busy.join()
    return {
        "read_bytes_per_s": alone,
        "read_bytes_per_s_beside_busy": beside,
        "busy_calls_per_s_beside_reads": calls,
    }


def busy_alone(seconds: float) -> float:
    stop, counter = threading.Event(), [0]
    busy = threading.Thread(target=busy_python, args=(stop, counter))
    busy.start()
    time.sleep(0.05)
    before, clock = counter[0], time.perf_counter()
    time.sleep(seconds)
    calls = (counter[0] - before) / (time.perf_counter() - clock)
    stop.set()
    busy.join()
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-mib", type=int, default=1024)
    parser.add_argument("--piece-mib", type=int, default=16)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--switch-interval", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    size, piece = args.file_mib * MiB, args.piece_mib * MiB
    with tempfile.NamedTemporaryFile(prefix="aimdo-reads-") as f:
        block = os.urandom(MiB)
        for _ in range(args.file_mib):
            f.write(block)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        ring = [memoryview(bytearray(piece)) for _ in range(2 * args.readers)]
        read_python(fd, size, piece, ring, args.readers)  # the file into the page cache
        result = {
            "benchmark": "file_reads_gil",
            "environment": environment(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "switch_interval_s": sys.getswitchinterval(),
            "busy_calls_per_s_alone": busy_alone(args.seconds),
        }
        for name, reader in (("python threads", read_python), ("native", read_native)):
            result[name] = measure(reader, fd, size, piece, ring, args.readers, args.seconds)
        os.close(fd)
    alone = result["busy_calls_per_s_alone"]
    print(
        f"file {args.file_mib} MiB in {args.piece_mib} MiB pieces, {args.readers} readers, "
        f"switch interval {result['switch_interval_s'] * 1000:g} ms; busy thread alone "
        f"{alone / 1e6:.1f} M calls/s"
    )
    for name in ("python threads", "native"):
        r = result[name]
        print(
            f"  {name}: reads {r['read_bytes_per_s'] / 1e9:.2f} GB/s alone, "
            f"{r['read_bytes_per_s_beside_busy'] / 1e9:.2f} GB/s beside the busy thread; "
            f"the busy thread beside them {r['busy_calls_per_s_beside_reads'] / 1e6:.1f} M "
            f"calls/s ({r['busy_calls_per_s_beside_reads'] / alone:.0%} of alone)"
        )
    write("file_reads_gil", result, args.out, keep=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
