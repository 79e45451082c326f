"""One piece read the way aimdo's native pump reads it, for tests: aimdo._core.FileReads
with a Reader's descriptors, stamps and errors (aimdo._torch_stream.FileStream hands the
same requests to aimdo._core.FilePump, which reads through FileReads)."""

from __future__ import annotations

import torch
from aimdo import _core
from aimdo._safetensors import Tensor
from aimdo._torch_checkpoint import Reader, raise_for_read


class NativeReads:
    """A Reader's reads on the threads of aimdo._core.FileReads, which never take the GIL:
    the descriptors, stamps and errors are the Reader's (the same CheckpointErrors, the
    same O_DIRECT rules and fallback).

    submit() queues a read of `count` bytes of a tensor from byte `start` into a ring
    buffer and returns its ticket; wait(ticket) waits (GIL released) until it is done
    (True) or poke() was called since the last wait (False); take(ticket) returns where
    the bytes begin in the buffer, or raises the read's error; close() reads what is
    queued and stops the threads."""

    def __init__(self, reader: Reader, threads: int):
        self.reader = reader
        self.reads = _core.FileReads(threads)

    def submit(self, tensor: Tensor, into: torch.Tensor, start: int, count: int):
        if start + count > tensor.nbytes:
            raise ValueError(f"{count} bytes from {start} are past tensor {tensor.name}")
        reader = self.reader
        direct = reader._open_direct(tensor) if reader.direct else None
        fd = reader._open(tensor)
        expected = reader.stamps.get(tensor.path)
        # No stamp: the read fails as changed, as Reader._check has it.
        size, mtime_ns, inode = (
            (expected.size, expected.mtime_ns, expected.inode) if expected else (-1, 0, 0)
        )
        view = memoryview(into.numpy()).cast("B")
        ticket = self.reads.submit(
            fd,
            -1 if direct is None else direct,
            tensor.offset + start,
            count,
            view,
            size,
            mtime_ns,
            inode,
        )
        return ticket, tensor, direct

    def wait(self, ticket) -> bool:
        return self.reads.wait(ticket[0])

    def poke(self) -> None:
        self.reads.poke()

    def take(self, ticket) -> int:
        number, tensor, direct = ticket
        status, error, lead, refused = self.reads.take(number)
        if refused:
            self.reader._retire_direct(direct)
        raise_for_read(status, error, tensor)
        return lead

    def close(self) -> None:
        self.reads.close()
