"""The offload schedule, stated once: which block to fault, when to queue its copy, which
staging buffer it takes, what its compute waits for, and when it is let go.

``aimdo.torch`` runs it on CUDA streams (or in line on the CPU, over a simulator with
``real_bytes=True``); ``aimdo.predict`` runs it on the simulator's copy and compute engines
in virtual time. Each supplies an Executor; the decisions here depend on no backend (this
module imports neither torch nor the simulator), so the prediction follows the module's
schedule by construction.

Not thread-safe: one forward at a time per Schedule, as per OffloadedModule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ._placement import fill_window


@dataclass
class ForwardStats:
    """What one forward of an OffloadedModule did."""

    layers: int = 0  # blocks of weights faulted (modules with their own weights)
    hits: int = 0  # found resident and intact: no copy
    copied_layers: int = 0  # (re)mapped pages: weights copied in from the host
    offloaded_layers: int = 0  # above the watermark: streamed through a temporary buffer
    bytes_copied: int = 0


class Block:
    """One block of weights (one allocation in the VBAR) and its state in the schedule.
    Front ends subclass it with what they need to copy and run it."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.allocation = None
        self.signature = None  # of the last fault whose copy was queued; None: copy again
        self.loaded = False  # it holds its weights for this forward, in `storage`
        self.storage = None  # the executor's destination (see Executor.destination)
        self.pinned = False  # its last fault pinned its pages: unpin at release
        self.ready = None  # the executor's token for its queued copy; None: nothing to wait for
        self.slot = None  # the staging buffer holding its weights, if offloaded
        self.queued = False  # loaded ahead with a copy queued, not used yet
        self.offloaded = False  # its last fault said offloaded
        self.resident = False  # its last fault found its weights in place

    def unbind(self) -> None:
        """Called first when the block is released: `storage` stops being valid, so drop
        any view of it. Nothing by default."""


class Slot:
    """A staging buffer for offloaded weights, reused within a forward."""

    def __init__(self, buffer, nbytes: int, free):
        self.buffer = buffer  # the executor's (Executor.new_buffer)
        self.nbytes = nbytes
        self.free = free  # token: the compute that last read it is done


#: Destinations for Executor.destination besides a Slot.
PAGES = "pages"  # the block's allocation in the VBAR (faulted and pinned)
TEMPORARY = "temporary"  # a buffer for this block alone, in order on the compute engine

#: Executor.copy's `after` for a copy in order with the compute: the first forward (which
#: learns the order) and prefetch=0 copy this way.
IN_LINE = "in line"


class Executor(ABC):
    """How a backend carries the schedule out on one device: a compute engine that runs the
    blocks in order, and (for prefetch) a copy engine beside it.

    A *token* is a point in the device's work, opaque to the Schedule: a CUDA event, or a
    virtual time on the simulator's engines, or None where the backend has nothing to wait
    for (the CPU runs everything in line). Errors propagate; the Schedule then releases the
    block, so every method must leave nothing half done that a release does not undo.

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
    def destination(self, block: Block, into):
        """Where `block`'s weights go and are read from this forward (kept in
        block.storage): into is PAGES (valid from the fault to the unpin), a Slot (its
        first block.nbytes bytes), or TEMPORARY."""

    @abstractmethod
    def copy(self, block: Block, storage, after):
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

    @abstractmethod
    def drain_copies(self) -> None:
        """Return once every copy queued so far is done: a copy failed part way and may
        have been queued without a token."""


class Schedule:
    """The offload schedule of one model on one device (OffloadedModule's docstring tells
    it in words). A forward is begin_forward(), then before(block) / the block's compute /
    release(block) for each block in the order they run, then end_forward().

    `blocks` are every block in the front end's order (the one released in at the end),
    placed in `vbar`. `order` is the run order known so far; while `learning`, the first
    forward extends it and nothing is prefetched.
    """

    def __init__(self, executor: Executor, vbar, blocks, prefetch: int, order, learning: bool):
        self.executor = executor
        self.vbar = vbar
        self.blocks = list(blocks)
        self.prefetch = prefetch
        self.order = list(order)
        self.position = {block: index for index, block in enumerate(self.order)}
        self.learning = learning
        self.slots = []  # staging buffers of this forward
        self.free_slots = []  # oldest released first
        self.horizon = 0  # position of the first block not walked by the prefetch window
        self.stats = ForwardStats()

    @property
    def staging(self) -> bool:
        """Offloaded weights go through staging buffers and copies run ahead on the copy
        engine: only once the order is known."""
        return self.prefetch > 0 and not self.learning

    def begin_forward(self) -> None:
        self.stats = ForwardStats()
        self.horizon = 0

    def end_forward(self) -> None:
        """Let go every block still loaded or pinned (prefetched but never run, or left so
        by an exception), each whatever the others do; raise the first failure."""
        failure = None
        for block in self.blocks:
            if block.loaded or block.pinned:
                try:
                    self.release(block)
                except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                    failure = failure or error
        # Every copy into a staging buffer was waited for by the compute or by release:
        # dropping the buffers now is ordered after their last use.
        self.slots, self.free_slots = [], []
        if self.learning and self.order:
            self.learning = False
        if failure is not None:
            raise failure

    def before(self, block: Block) -> None:
        """Make `block`'s weights current in block.storage for the compute queued next, and
        fill the prefetch window after it."""
        if block not in self.position:  # learning, or left out of a declared order
            self.position[block] = len(self.order)
            self.order.append(block)
        self.load(block, ahead=False)
        block.queued = False
        if block.ready is not None:
            self.executor.wait_for(block.ready)
            block.ready = None
        if self.staging:
            self.horizon = fill_window(
                self.order,
                self.position[block],
                self.horizon,
                self.prefetch,
                lambda ahead: self.load(ahead, ahead=True),
            )

    def slot_obtainable(self) -> bool:
        return bool(self.free_slots) or len(self.slots) <= self.prefetch

    def take_slot(self, nbytes: int) -> Slot | None:
        """A staging buffer of at least `nbytes`: the one released first (its compute is
        the earliest done), replaced by a bigger one if too small; a new one while fewer
        than prefetch + 1 exist; None if all are in use."""
        if self.free_slots:
            slot = self.free_slots.pop(0)
            if slot.nbytes >= nbytes:
                return slot
            self.slots.remove(slot)  # too small: replaced by a bigger one below
        elif len(self.slots) > self.prefetch:
            return None
        buffer = self.executor.new_buffer(nbytes)
        slot = Slot(buffer, nbytes, self.executor.compute_point())
        self.slots.append(slot)
        return slot

    def load(self, block: Block, ahead: bool) -> bool:
        """Fault the block and make its weights current in block.storage, queueing a copy
        if they are not there. Idempotent within a forward. Returns False, with nothing
        changed, when `ahead` and an offloaded block finds no free staging buffer (a block
        offloaded at its last fault is not even faulted then). If anything fails, the block
        is released and its signature forgotten, so that the next forward copies again
        instead of trusting pages that were never written."""
        if block.loaded:
            return True
        staging = self.staging
        if ahead and staging and block.offloaded and not self.slot_obtainable():
            return False
        signature = self.vbar.fault(block.allocation)
        block.pinned = signature is not None
        block.offloaded = signature is None
        block.resident = False  # until it is known to be
        try:
            slot = None
            if signature is None and staging:
                slot = self.take_slot(block.nbytes)
                if slot is None and ahead:
                    return False
                block.slot = slot
            if signature is not None:
                into = PAGES
            else:
                into = slot if slot is not None else TEMPORARY
            block.storage = self.executor.destination(block, into)
            block.loaded = True
            copy_in = signature is None or signature != block.signature
            block.signature = None  # until the copy is queued
            block.resident = not copy_in
            self._count(block, signature, copy_in)
            if copy_in:
                block.ready = self.executor.copy(block, block.storage, self._copy_after(into))
                block.queued = ahead
            block.signature = signature
            return True
        except BaseException:
            block.signature = None
            if staging:
                # Part of the copy may be queued with no token yet: let it finish before its
                # buffer can be reused.
                self.executor.drain_copies()
            self.release(block)
            raise

    def _copy_after(self, into):
        """What a copy into `into` waits for."""
        if not self.staging:
            return IN_LINE
        if isinstance(into, Slot):
            return into.free  # the compute that last read the buffer
        if into is TEMPORARY:
            return self.executor.compute_point()  # made in order on the compute engine
        return None  # pages just mapped: nothing queued reads them

    def _count(self, block: Block, signature, copy_in: bool) -> None:
        stats = self.stats
        if signature is None:
            stats.offloaded_layers += 1
        elif copy_in:
            stats.copied_layers += 1
        else:
            stats.hits += 1
        stats.layers += 1
        if copy_in:
            stats.bytes_copied += block.nbytes

    def release(self, block: Block) -> None:
        """Let the block go after its compute: unbind its weights, give back its staging
        buffer (free once the compute queued so far is done) and drop its pin, if any."""
        block.unbind()
        if block.ready is not None:  # prefetched, never used: the copy must finish first
            self.executor.host_wait(block.ready)
            block.ready = None
        block.queued = False
        slot, block.slot = block.slot, None
        if slot is not None:
            slot.free = self.executor.compute_point()
            self.free_slots.append(slot)
        pinned, block.pinned = block.pinned, False
        block.loaded, block.storage = False, None
        if pinned:
            self.vbar.unpin(block.allocation)
