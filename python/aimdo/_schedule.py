"""The offload schedule, stated once: which block to fault, when to queue its copy, which
staging buffer it takes, what its compute waits for, and when it is let go.

``aimdo.torch`` runs it on CUDA streams (or in line on the CPU, over a simulator with
``real_bytes=True``); ``aimdo.predict`` runs it on the simulator's copy and compute engines
in virtual time. Each supplies an Executor (aimdo._executor); the decisions here depend on
no backend (this module imports neither torch nor the simulator), so the prediction
follows the module's schedule by construction.

Not thread-safe: one forward at a time per Schedule (the front end enforces it).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

from ._core import ALLOCATION_ALIGNMENT_BYTES, InvalidStateError
from ._executor import IN_LINE, PAGES, TEMPORARY, Executor

_log = logging.getLogger("aimdo")

#: Staging buffers of one offloaded model hold at most this many bytes in all when the
#: budget is small (prefetch + 1 buffers, each at most staging_bytes // (prefetch + 1)); a
#: block larger than one buffer goes through a temporary buffer of its own, in line with
#: the compute. See auto_staging_bytes.
DEFAULT_STAGING_BYTES = 256 << 20
#: With a larger budget, staging may take up to this fraction of it.
STAGING_BUDGET_FRACTION = 24


def auto_staging_bytes(block_bytes, prefetch: int, budget_bytes: int) -> int:
    """The default cap on staging: enough for prefetch + 1 buffers of the largest block (so
    no block goes through a temporary buffer, whose copy cannot be queued ahead), but at
    most DEFAULT_STAGING_BYTES or 1/STAGING_BUDGET_FRACTION of the budget, whichever is
    more. Measured on an H200: Qwen-Image's 108 MiB blocks through 72 MiB buffers took the
    step from 417.5 to 441.2 ms at a 24 GiB budget (benchmarks/RESULTS.md); a Llama-8B at a
    6 GiB budget keeps 256 MiB (its 1 GiB embedding and head go through temporaries)."""
    need = (prefetch + 1) * max(block_bytes, default=0)
    return min(need, max(DEFAULT_STAGING_BYTES, budget_bytes // STAGING_BUDGET_FRACTION))


#: How far the prefetch window looks, in uses per copy in flight.
LOOKAHEAD_PER_COPY = 8


@dataclass
class ForwardStats:
    """What one forward of an offloaded module did."""

    layers: int = 0  # blocks of weights faulted (a block in use already is not faulted again)
    hits: int = 0  # found resident and intact: no copy
    copied_layers: int = 0  # (re)mapped pages: weights copied in from the host
    offloaded_layers: int = 0  # above the watermark: through a staging or temporary buffer
    bytes_copied: int = 0
    bytes_from_peers: int = 0  # of bytes_copied: read from another device's pages
    bytes_from_files: int = 0  # of bytes_copied: read from a checkpoint's files (host_limit)
    peak_temporary_bytes: int = 0  # most bytes of temporary buffers held at one time


class Block:
    """One block of weights (one allocation in the VBAR) and its state in the schedule.
    Front ends subclass it with what they need to copy and run it (with __slots__ of their
    own: every module's forward reads these fields, and slots are the fastest to read)."""

    __slots__ = (
        "nbytes",
        "allocation",
        "signature",
        "loaded",
        "storage",
        "pinned",
        "ready",
        "slot",
        "temporary",
        "queued",
        "rides",
        "staged_at",
        "offloaded",
        "resident",
        "users",
        "in_pages",
        "filled",
    )

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.allocation = None
        self.signature = None  # of the last fault whose copy was queued; None: copy again
        self.loaded = False  # it holds its weights for this forward, in `storage`
        self.storage = None  # the executor's destination (see Executor.destination)
        self.pinned = False  # its last fault pinned its pages: unpin at release
        self.ready = None  # the executor's token for its queued copy; None: nothing to wait for
        self.slot = None  # the staging buffer holding its weights, if staged
        self.staged_at = 0  # where in that buffer its weights start
        self.temporary = False  # its weights are in a temporary buffer of its own
        self.queued = False  # loaded ahead with a copy queued, not used yet
        self.rides = False  # queued ahead in the room a block before it left in its buffer
        self.offloaded = False  # its last fault said offloaded
        self.resident = False  # its last fault found its weights in place
        self.users = 0  # uses in progress: before() calls not yet matched by release()
        self.in_pages = None  # the executor's PAGES destination, while the last one used
        # Set by an executor whose copies finish after they are queued: its token for the
        # copy that last filled the pages (a peer device reading them waits for it).
        self.filled = None

    def unbind(self) -> None:
        """Called first when the block is let go: `storage` stops being valid, so drop
        any view of it. Nothing by default."""


def pin_peer_copy(peers):
    """The first of `peers` (the same block on other devices, nearest first) whose pages
    hold its weights, with those pages pinned (the caller unpins them once its copy from
    them is done), or None. A peer serves when its last copy into its pages gave it a
    signature and pin_resident finds every page resident under that very signature (not
    remapped since); pin_resident takes only the peer device's lock and never maps or
    evicts (design.md §4.4)."""
    for peer in peers:
        expected = peer.signature
        if expected is None:  # never copied in there, or being copied again
            continue
        vbar = peer.allocation.vbar
        try:
            pinned = vbar.pin_resident(peer.allocation)
        except InvalidStateError:  # the peer's offload was undone meanwhile
            continue
        if pinned is None:
            continue
        if pinned != expected or peer.signature is not expected:
            unpin_peer(peer)  # remapped since its copy: not its weights
            continue
        return peer
    return None


def unpin_peer(peer) -> None:
    """Drop the pin pin_peer_copy took on `peer`'s pages; nothing if the peer's VBAR was
    closed meanwhile (its pins went with it)."""
    vbar = peer.allocation.vbar
    if not vbar.closed:
        vbar.unpin(peer.allocation)


def mark_stretches(marks, uses: list):
    """Each stretch between two consecutive Schedule.marks (which may begin and end with
    marks of the forward's own, of any other `what`), in order, as (lane, block, use,
    mark, following). Lane "stall": from a use's "enter" to its "ready" (its copy, in line
    or waited for) and between a "copy" and a "copied" mark (a copy the host made in line,
    where the compute runs on the CPU); `block` is the block entering or copied. Lane
    "compute" otherwise: `use` is the record of the innermost use running, or of the use
    that ended last when none runs (a parent's own compute between its children), or None
    before the first use; `block` is its block. `uses` receives a record [block, 0.0] for
    each use as it begins."""
    stack, moving, entering, ended = [], [], None, None
    for (what, block, mark), (_, _, following) in zip(marks, marks[1:], strict=False):
        if what == "enter":
            use = [block, 0.0]
            uses.append(use)
            stack.append(use)
            entering = block
        elif what == "ready":
            entering = None
        elif what == "exit" and stack:
            ended = stack.pop()
        elif what == "copy":
            moving.append(block)
        elif what == "copied" and moving:
            moving.pop()
        if moving:
            yield "stall", moving[-1], None, mark, following
        elif entering is not None:
            yield "stall", entering, None, mark, following
        else:
            use = stack[-1] if stack else ended
            yield "compute", None if use is None else use[0], use, mark, following


def use_seconds(marks, elapsed) -> list[tuple[Block, float]]:
    """The compute time of each use of a block in a forward timed with Schedule.marks, in
    the order the uses began; `elapsed(a, b)` gives the seconds between two marks. Every
    "compute" stretch (see mark_stretches) counts for its use, and the time before the
    first use for the first; copies count for none. So the uses' seconds add up to the
    forward's compute, copies left out."""
    uses, before_first = [], 0.0
    for lane, _, use, mark, following in mark_stretches(marks, uses):
        if lane != "compute":
            continue
        seconds = elapsed(mark, following)
        if use is None:
            before_first += seconds
        else:
            use[1] += seconds
    if uses:
        uses[0][1] += before_first
    return [(block, seconds) for block, seconds in uses]


def stall_seconds(marks, elapsed) -> dict:
    """The seconds the compute stalled for each block in a forward timed with
    Schedule.marks (the "stall" stretches of mark_stretches: waiting for its copy), per
    block; blocks that never stalled are absent."""
    stalls = {}
    for lane, block, _, mark, following in mark_stretches(marks, []):
        if lane == "stall" and block is not None:
            stalls[block] = stalls.get(block, 0.0) + elapsed(mark, following)
    return stalls


def per_block(uses) -> dict:
    """The seconds of `uses` (pairs of a block, or its index, and seconds, as use_seconds
    gives them) summed per block, the blocks in the order of their first use."""
    seconds = {}
    for block, spent in uses:
        seconds[block] = seconds.get(block, 0.0) + spent
    return seconds


#: Where a block staged after another in one staging buffer starts: the end of the one
#: before, rounded up to this (the VBAR's allocation alignment, as in the block's pages).
STAGING_ALIGNMENT = ALLOCATION_ALIGNMENT_BYTES


class Slot:
    """A staging buffer for offloaded weights, kept from one forward to the next. Blocks
    staged one after another share it while they fit (Schedule.take_slot): `filled` bytes
    of it are taken, by `holders` blocks not let go yet."""

    def __init__(self, buffer, nbytes: int, free):
        self.buffer = buffer  # the executor's (Executor.new_buffer)
        self.nbytes = nbytes
        self.free = free  # token: the compute that last read it is done
        self.filled = 0
        self.holders = 0

    def room(self, nbytes: int) -> int | None:
        """Where `nbytes` more would start in it (aligned after those taken), or None if
        they do not fit."""
        start = -(-self.filled // STAGING_ALIGNMENT) * STAGING_ALIGNMENT
        return start if start + nbytes <= self.nbytes else None


class Schedule:
    """The offload schedule of one model on one device (design.md §7 tells it in words).
    A forward is begin_forward(), then before(block) / the block's compute /
    release(block) for each use of a block in the order they run, then end_forward().

    `blocks` are every block (end_forward lets go of those still held), placed in `vbar`.
    `order` is the run order known so far, one entry per use: a block used twice in a
    forward (tied weights, a module called twice) appears twice. While `learning`, the
    first forward records it and nothing is prefetched. Staging buffers are at most
    `staging_bytes // (prefetch + 1)` each; a larger offloaded block takes a temporary
    buffer of its own.
    """

    def __init__(
        self,
        executor: Executor,
        vbar,
        blocks,
        prefetch: int,
        order,
        learning: bool,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ):
        self.executor = executor
        self.vbar = vbar
        self.blocks = list(blocks)
        self.prefetch = prefetch
        self.order = list(order)
        self.uses = {}  # block -> its positions in order (ascending)
        self.learning = learning
        if not learning:
            self._index_uses()
        self.slot_limit_bytes = staging_bytes // (prefetch + 1)
        self._tell_window()
        self.slots = []  # staging buffers, kept between forwards
        self.free_slots = []  # oldest released first
        self.current_slot = None  # the one taken last, while a block holds it
        self.step = 0  # position in order of the next use
        self.horizon = 0  # position of the first use not walked by the prefetch window
        self.in_flight = 0  # blocks loaded ahead with their copy queued, not used yet (no rider)
        self.unresident = len(self.blocks)  # blocks whose last fault did not find them in place
        self.standalone = False  # a call outside a forward: no order, no prefetch
        self.temporary_bytes = 0
        self.held = {}  # blocks loaded (pinned, if in their pages), in load order
        self.stats = ForwardStats()
        # While a list: (what, block, Executor.mark()) at each use's start ("enter"), once
        # its weights are current ("ready") and at its release ("exit"); see use_seconds.
        self.marks = None
        self._update_staging()

    def _update_staging(self) -> None:
        # Offloaded weights go through staging buffers and copies run ahead on the copy
        # engine only once the order is known, and only within a forward. A field, not a
        # property: every load reads it.
        self.following = not self.learning and not self.standalone  # the order is known
        self.staging = self.prefetch > 0 and self.following

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging buffers held now."""
        return sum(slot.nbytes for slot in self.slots)

    def _index_uses(self) -> None:
        self.uses = {}
        for position, block in enumerate(self.order):
            self.uses.setdefault(block, []).append(position)

    def begin_forward(self, standalone: bool = False) -> None:
        """Start a forward; `standalone`: one module called outside a forward of the
        whole, which neither learns the order nor prefetches."""
        self.stats = ForwardStats()
        self.step = self.horizon = 0
        self.standalone = standalone
        self._update_staging()

    def end_forward(self) -> None:
        """Let go every block still loaded (prefetched but never run, or left so by an
        exception), each whatever the others do; raise the first failure."""
        failure = None
        for block in list(self.held):
            try:
                self._let_go(block)
            except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                failure = failure or error
        if self.learning and self.order and not self.standalone:
            self.learning = False
            self._index_uses()
        self.standalone = False
        self._update_staging()
        if failure is not None:
            raise failure

    def fill(self, blocks) -> int:
        """Outside a forward: fault `blocks` in turn and copy in the weights of each whose
        pages do not hold them, until one is offloaded (the budget is full); then no later
        one would fit either. Returns the bytes copied. For a device that holds weights
        for its peers without computing (a donor)."""
        self.begin_forward(standalone=True)
        try:
            for block in blocks:
                if self.vbar.fault(block.allocation) is None:
                    block.offloaded = True
                    break
                self.vbar.unpin(block.allocation)  # load() faults it again: a hit now
                self.load(block, ahead=False)
                self._let_go(block)
        finally:
            self.end_forward()
        return self.stats.bytes_copied

    def set_prefetch(self, prefetch: int, staging_bytes: int) -> None:
        """Between forwards: keep `prefetch` copies in flight from now on, through
        staging buffers of at most staging_bytes // (prefetch + 1) each (made anew)."""
        self.drop_staging()
        self.prefetch = prefetch
        self.slot_limit_bytes = staging_bytes // (prefetch + 1)
        self._tell_window()
        self._update_staging()

    def _tell_window(self) -> None:
        # The executor's file stream (aimdo.torch's, when blocks stay in files): its
        # read-ahead follows the prefetch window (READ_AHEAD_BYTES).
        stream = getattr(self.executor, "file_stream", None)
        if stream is not None:
            stream.window = self.prefetch

    def drop_staging(self) -> None:
        """Give the staging buffers back (between forwards only: nothing reads them)."""
        self.slots, self.free_slots, self.current_slot = [], [], None

    def before(self, block: Block) -> None:
        """Make `block`'s weights current in block.storage for the compute queued next, and
        fill the prefetch window after it. A block in use already (by an enclosing module)
        only counts one more user."""
        marks = self.marks
        if marks is not None:
            marks.append(("enter", block, self.executor.mark()))
        step, order = self.step, self.order
        if self.following and step < len(order) and order[step] is block:
            position = step  # the common case, without a call
            self.step = step + 1
        else:
            position = self._advance(block)
        if not block.users:
            self.load(block, ahead=False)
            if block.queued:
                block.queued = False
                self.in_flight -= not block.rides
            if block.ready is not None:
                ready, block.ready = block.ready, None
                try:
                    self.executor.wait_for(ready)
                except BaseException:  # a copy made in the background failed
                    self._forget(block)
                    raise
        block.users += 1
        if marks is not None:
            marks.append(("ready", block, self.executor.mark()))
        if position is not None and self.unresident and self.staging:
            self._fill_window(position)

    def release(self, block: Block) -> None:
        """One use of the block is over; the last one lets it go."""
        if self.marks is not None:
            self.marks.append(("exit", block, self.executor.mark()))
        block.users -= 1
        if block.users <= 0:
            self._let_go(block)

    def _advance(self, block: Block) -> int | None:
        """The position of this use in the order (recording it while learning), or None
        when the forward left the order (another path through the model)."""
        if self.standalone:
            return None
        step, order = self.step, self.order
        if self.learning:
            order.append(block)
        elif step >= len(order) or order[step] is not block:
            uses = self.uses.get(block, ())
            found = bisect.bisect_left(uses, step)
            if found == len(uses):
                return None
            step = uses[found]
        self.step = step + 1
        return step

    def _fill_window(self, position: int) -> None:
        """Load the blocks used after `position` until `prefetch` copies are queued ahead,
        looking at most LOOKAHEAD_PER_COPY x prefetch uses ahead; past those, the blocks
        that ride in the room left in the staging buffer taken last (see take_slot) are
        loaded too, until one does not (one whose last fault said offloaded may fault into
        its pages now: then it is the one copy in flight beyond prefetch). Blocks found
        resident at their last fault are left to their turn (nothing to copy ahead, so
        they are not pinned before it); a block that finds no free staging buffer ends
        the walk."""
        prefetch = self.prefetch
        if self.in_flight >= prefetch:
            current = self.current_slot
            if current is None or current.filled >= current.nbytes:
                return  # no room for a rider
        order = self.order
        index = max(position + 1, self.horizon)
        limit = min(len(order), position + 1 + LOOKAHEAD_PER_COPY * prefetch)
        while index < limit:
            ahead = order[index]
            if self.in_flight < prefetch:
                if not ahead.loaded and not ahead.resident and not self.load(ahead, ahead=True):
                    break
            elif ahead.loaded:
                if not ahead.queued:
                    # In use now (a module called twice, a tied weight): its next use is
                    # the window's again once it is let go, so the walk ends before it.
                    break
            elif not ahead.resident:
                if not self._would_ride(ahead) or not self.load(ahead, ahead=True):
                    break
                if not ahead.rides:
                    # It faulted into its pages (a copy of its own, or none): the room is
                    # still there, but this one took a copy beyond prefetch; no more.
                    index += 1
                    break
            index += 1
        self.horizon = max(self.horizon, index)

    def _would_ride(self, block: Block) -> bool:
        """Whether `block`, offloaded at its last fault, would be staged in the room left
        in the staging buffer taken last."""
        current = self.current_slot
        return (
            block.offloaded
            and current is not None
            and block.nbytes <= self.slot_limit_bytes
            and current.room(block.nbytes) is not None
        )

    def slot_obtainable(self, nbytes: int) -> bool:
        current = self.current_slot
        if current is not None and current.room(nbytes) is not None:
            return True
        return bool(self.free_slots) or len(self.slots) <= self.prefetch

    def take_slot(self, block: Block) -> Slot | None:
        """A staging buffer for `block` (at most slot_limit_bytes), setting where in it the
        block starts (block.staged_at) and whether it rides (block.rides): the room left
        in the one taken last, while a block holds it and the block fits there (aligned
        after the blocks in it: a small block costs no buffer of its own, and a copy queued
        there counts in no prefetch); else the one released first (its compute is the
        earliest done), replaced by a bigger one if too small; a new one while fewer than
        prefetch + 1 exist; None if all are in use. Buffers grow to the largest block they
        stage, as many blocks in one as fit."""
        nbytes = block.nbytes
        current = self.current_slot
        if current is not None:
            start = current.room(nbytes)
            if start is not None:
                current.filled = start + nbytes
                current.holders += 1
                block.staged_at, block.rides = start, True
                return current
        if self.free_slots:
            slot = self.free_slots.pop(0)
            if slot.nbytes < nbytes:
                self.slots.remove(slot)  # too small: replaced by a bigger one below
                slot = None
        elif len(self.slots) > self.prefetch:
            return None
        else:
            slot = None
        if slot is None:
            buffer = self.executor.new_buffer(nbytes)
            slot = Slot(buffer, nbytes, self.executor.compute_point())
            self.slots.append(slot)
        slot.filled, slot.holders = nbytes, 1
        self.current_slot = slot
        block.staged_at, block.rides = 0, False
        return slot

    def load(self, block: Block, ahead: bool) -> bool:
        """Fault the block and make its weights current in block.storage, queueing a copy
        if they are not there. Idempotent within a forward. Returns False, with nothing
        changed, when `ahead` and an offloaded block finds no free staging buffer (a block
        offloaded at its last fault is not even faulted then). If anything fails, the block
        is let go and its signature forgotten, so that the next forward copies again
        instead of trusting pages that were never written."""
        if block.loaded:
            return True
        stageable = self.staging and block.nbytes <= self.slot_limit_bytes
        if ahead and stageable and block.offloaded and not self.slot_obtainable(block.nbytes):
            return False
        signature = self.vbar.fault(block.allocation)
        block.pinned = signature is not None
        block.offloaded = signature is None
        if signature is None or signature != block.signature:
            return self._copy_in(block, signature, ahead, stageable)
        # A hit: the weights are in the block's pages, as the last copy left them. The
        # executor is asked for the pages again only if the block was held elsewhere since.
        storage = block.in_pages
        if storage is None:
            try:
                storage = block.in_pages = self.executor.destination(block, PAGES)
            except BaseException:
                self._forget(block)
                raise
        block.storage = storage
        block.loaded = True
        self.held[block] = None
        if not block.resident:
            self._set_resident(block, True)
        stats = self.stats
        stats.hits += 1
        stats.layers += 1
        return True

    def _copy_in(self, block: Block, signature, ahead: bool, stageable: bool) -> bool:
        """Queue the copy of the block's weights into its pages (`signature`) or, offloaded
        (None), into a staging buffer or a temporary one."""
        try:
            into = PAGES
            if signature is None:
                into = self.take_slot(block) if stageable else TEMPORARY
                if into is None:  # every buffer in use (by blocks ahead, or enclosing ones)
                    if ahead:
                        return False
                    into = TEMPORARY
            self._hold(block, into)
            block.signature = None  # until the copy is queued
            self._set_resident(block, False)
            self._count(block, signature)
            block.ready = self.executor.copy(block, block.storage, self._copy_after(into))
            if ahead:
                block.queued = True
                self.in_flight += not block.rides
            block.signature = signature
            return True
        except BaseException:
            if self.staging:
                # Part of the copy may be queued with no token yet: let it finish before its
                # buffer can be reused.
                self.executor.drain_copies()
            self._forget(block)
            raise

    def _forget(self, block: Block) -> None:
        """After a failed load: let the block go and make the next fault copy again."""
        block.signature = None
        self._set_resident(block, False)
        self._let_go(block)

    def _hold(self, block: Block, into) -> None:
        if isinstance(into, Slot):
            block.slot = into
        block.storage = self.executor.destination(block, into)
        block.in_pages = block.storage if into is PAGES else None
        block.loaded = True
        self.held[block] = None
        if into is TEMPORARY:
            block.temporary = True
            self.temporary_bytes += block.nbytes
            stats = self.stats
            stats.peak_temporary_bytes = max(stats.peak_temporary_bytes, self.temporary_bytes)

    def _set_resident(self, block: Block, resident: bool) -> None:
        if resident != block.resident:
            self.unresident += -1 if resident else 1
            block.resident = resident

    def _copy_after(self, into):
        """What a copy into `into` waits for."""
        if not self.staging:
            return IN_LINE
        if isinstance(into, Slot):
            return into.free  # the compute that last read the buffer
        if into is TEMPORARY:
            return self.executor.compute_point()  # made in order on the compute engine
        return None  # pages just mapped: nothing queued reads them

    def _count(self, block: Block, signature) -> None:
        stats = self.stats
        if signature is None:
            stats.offloaded_layers += 1
        else:
            stats.copied_layers += 1
        stats.layers += 1
        stats.bytes_copied += block.nbytes

    def _let_go_buffer(self, block: Block) -> None:
        block.unbind()  # pages' views stay valid for the next hit; a buffer's go with it
        slot, block.slot = block.slot, None
        block.rides = False
        if slot is not None:
            slot.holders -= 1
            if slot.holders == 0:  # the last block in it: free once their compute is done
                slot.free = self.executor.compute_point()
                slot.filled = 0
                if slot is self.current_slot:
                    self.current_slot = None
                self.free_slots.append(slot)
        if block.temporary:
            block.temporary = False
            self.temporary_bytes -= block.nbytes

    def _let_go(self, block: Block) -> None:
        """Let the block go after its compute: unbind its weights, give back its staging
        buffer (free once the compute queued so far is done) and drop its pin, if any."""
        block.users = 0
        self.held.pop(block, None)
        failure = None
        if block.ready is not None:  # prefetched, never used: the copy must finish first
            ready, block.ready = block.ready, None
            try:
                self.executor.host_wait(ready)
            except BaseException as error:  # noqa: BLE001 - said below, once let go
                # The copy failed (one made in the background): never trust its pages. No
                # compute read them, so the forward stands; a use would copy again.
                block.signature = None
                self._set_resident(block, False)
                if block.queued and isinstance(error, Exception):
                    _log.warning(
                        "aimdo: a copy made ahead for a block this forward did not use "
                        "failed (%s); it is copied again when used",
                        error,
                    )
                else:
                    failure = error
        if block.queued:
            block.queued = False
            self.in_flight -= not block.rides
        if block.slot is not None or block.temporary:
            self._let_go_buffer(block)
        pinned, block.pinned = block.pinned, False
        block.loaded, block.storage = False, None
        if pinned:
            self.vbar.unpin(block.allocation)
        if failure is not None:
            raise failure
