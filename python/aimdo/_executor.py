"""What the offload schedule (aimdo._schedule) asks of a backend: an Executor, and the
destinations and copy orders it names. Imports no backend."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

#: Destinations for Executor.destination besides a Slot.
PAGES = "pages"  # the block's allocation in the VBAR (faulted and pinned)
TEMPORARY = "temporary"  # a buffer for this block alone, in order on the compute engine

#: Executor.copy's `after` for a copy in order with the compute: the first forward (which
#: learns the order), a call outside a forward and prefetch=0 copy this way.
IN_LINE = "in line"


class Executor(ABC):
    """How a backend carries the schedule out on one device: a compute engine that runs the
    blocks in order, and (for prefetch) a copy engine beside it.

    A *token* is a point in the device's work, opaque to the Schedule: a CUDA event, or a
    virtual time on the simulator's engines, or None where the backend has nothing to wait
    for (the CPU runs everything in line). Errors propagate; the Schedule then lets the
    block go, so every method must leave nothing half done that letting go does not undo.

    Running a block is the front end's: between Schedule.before(block), which makes the
    next compute wait for the block's copy (wait_for), and Schedule.release(block), it
    queues the block's compute on the compute engine (PyTorch runs the module; the
    prediction calls SimBackend.compute_async).
    """

    @abstractmethod
    def new_buffer(self, nbytes: int):
        """A new staging buffer of `nbytes`, made in order on the compute engine (the
        Schedule takes compute_point() right after as the moment it is free)."""

    @abstractmethod
    def compute_point(self):
        """A token for the moment the compute queued so far is done. A staging buffer is
        free at the compute_point() taken when the block that read it is released."""

    @abstractmethod
    def destination(self, block, into):
        """Where `block`'s weights go and are read from this forward (kept in
        block.storage): into is PAGES (valid from the fault to the unpin), a Slot (its
        block.nbytes bytes from block.staged_at), or TEMPORARY (a new buffer of block.nbytes).

        A VBAR's addresses never move, so the PAGES destination of a block stays what it
        was while its allocation lives: after the first, the Schedule reuses it on a hit
        without asking again, unless the block was held elsewhere since (a Slot or a
        temporary buffer, after which Block.unbind was called)."""

    @abstractmethod
    def copy(self, block, storage, after):
        """Queue the copy of `block`'s weights from the host into `storage`, starting after
        `after`: IN_LINE (in order with the compute queued so far), None (on the copy
        engine, waiting for no compute: pages just mapped, which nothing queued reads,
        because an eviction synchronizes the device before it unmaps) or a token (on the
        copy engine, once that point is passed). Returns a token for the copy's end, which
        the block's compute waits for, or None if that compute needs no wait."""

    @abstractmethod
    def wait_for(self, token) -> None:
        """The compute queued next (the block about to run) starts after `token`."""

    @abstractmethod
    def host_wait(self, token) -> None:
        """Return once `token` is passed: a copy queued ahead and never used must be done
        before its buffer or pages go."""

    def mark(self):
        """A point on the compute engine, timed (Schedule.marks): by default the host's
        clock, right for a backend that computes in line."""
        return time.perf_counter()

    def elapsed(self, first, second) -> float:
        """Seconds from mark `first` to mark `second`, once the work before both is done."""
        return second - first

    @abstractmethod
    def drain_copies(self) -> None:
        """Return once every copy queued so far is done: a copy failed part way and may
        have been queued without a token."""
