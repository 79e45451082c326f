"""Progress of long work (pinning weights, or reading them from a checkpoint, when they
are tens of GB; design.md §6): a bar where a terminal is attached (tqdm when installed,
else a line at each tenth), nothing otherwise."""

from __future__ import annotations

import sys

from ._sizes import format_size

#: Work of fewer bytes than this shows nothing: it is over in seconds.
MIN_BYTES = 4 << 30


class Progress:
    """`total` bytes of work called `what`, reported on standard error when it is a
    terminal and the work is at least MIN_BYTES. Call add() as bytes are done, close()
    at the end (also after a failure)."""

    def __init__(self, total: int, what: str):
        self.stream = sys.stderr
        self.total, self.what = total, what
        self.done = 0
        self.tenths = 0  # tenths reported in plain lines
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        self.on = total >= MIN_BYTES and total > 0 and callable(isatty) and isatty()
        if self.on:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, desc=what, file=self.stream, leave=False
            )

    def add(self, nbytes: int) -> None:
        if not self.on:
            return
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        while self.tenths < min(10, self.done * 10 // self.total):
            self.tenths += 1
            print(
                f"{self.what}: {self.tenths * 10}% ({format_size(self.done)} of "
                f"{format_size(self.total)})",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
