"""Growing back (design.md, Steering): after a forward of an offloaded module, its VBAR's
watermark is raised into room others gave back. Imported by aimdo.torch's runner only."""

from __future__ import annotations

import bisect
import logging

from ._sizes import format_size

_log = logging.getLogger("aimdo")

#: Forwards a raise of the watermark waits after a futile one (twice as many after each
#: futile one in a row, up to 64 times), unless the room grew.
FUTILE_WAIT = 4


class GrowBack:
    """One offload's raises of its watermark, and what the last ones taught."""

    def __init__(self):
        self.block_ends = None  # the end of every block's allocation, sorted (made once)
        self.raised = None  # (watermark, room) of a raise the next forward judges
        # The room the last futile raise had (the next waits for more, or for `wait` more
        # forwards), and how many were futile in a row.
        self.futile_room = None
        self.futile_raises = 0
        self.wait = 0
        self.begun = 0  # forwards of the whole begun (Runner.call counts them)
        # poll_after_next: the forwards begun when it was asked (a fresh poll is due as
        # the first forward begun after that ends); None, none asked.
        self.fresh_after = None

    def poll_after_next(self) -> None:
        """Poll the budget afresh as the next forward of the whole to begin ends, and read
        no room before: memory given back now (PyTorch's cache emptied) is seen without
        counting as room what that forward takes again (its staging, its activations),
        which a poll in the forward running now (due, or fresh) would. What earlier raises
        taught no longer holds the next back."""
        self.forget()
        self.fresh_after = self.begun

    def forget(self) -> None:
        """The watermark was raised to the top (Offload._grow: a resume, a budget grown),
        or a fresh poll was asked (poll_after_next): a raise pending is not judged by the
        next forward, and a futile one no longer holds the next back."""
        self.raised = self.futile_room = None
        self.futile_raises = self.wait = 0

    def after_forward(self, runner, schedule) -> None:
        """After a forward of the whole (`runner`'s, a Runner) that ended with the VBAR's
        watermark below its top: raise it by the room the budget has now, when that room
        holds the block just above it (others gave memory back: PyTorch's cache emptied,
        staging dropped, another model's pages freed), so that residency an eviction took
        grows back by itself. Raised by the room, not to the top: from the top, the next
        forward's faults fill in the order of use, and a fault for a block the budget has
        room for can find the room held by pages a less important block pins in the
        window, and lower the watermark to its own start (§3.2), below where it was. A
        raise is judged by the next forward's watermark: not higher (the room was others'
        memory between two polls), and the next raise waits for more room than this one
        had, or for FUTILE_WAIT forwards, twice as many after each futile raise in a row.
        The prefetch trials count a raise as a disturbance (their next forward settles).
        Only an optimization: a failure here (the VBAR closed by another thread) is
        logged, and the forward's result stands."""
        try:
            self._step(runner, schedule)
        except Exception as error:  # noqa: BLE001 - the forward's result stands
            _log.debug("aimdo: growing back after a forward failed: %s", error)

    def _step(self, runner, schedule) -> None:
        asked = self.fresh_after is not None
        fresh = asked and self.begun > self.fresh_after
        if fresh:
            self.fresh_after = None
        vbar = schedule.vbar
        manager = runner.manager_ref()
        if manager is None or vbar.closed or runner.paused or runner.device_paused:
            return
        watermark, top = vbar.watermark_bytes, vbar.size
        raised, self.raised = self.raised, None
        if raised is not None:
            before, room = raised
            if watermark > before:
                self.futile_room, self.futile_raises = None, 0
            else:
                self.futile_room = room
                self.futile_raises += 1
                self.wait = FUTILE_WAIT << min(self.futile_raises - 1, 6)
        elif self.wait > 0:
            self.wait -= 1
        if asked and not fresh:
            return  # PyTorch's cache was emptied in this forward: no room read until the next
        if watermark >= top:
            return
        if self.block_ends is None:
            self.block_ends = sorted(
                b.allocation.offset + b.allocation.size for b in schedule.blocks
            )
        at = bisect.bisect_right(self.block_ends, watermark)
        if at == len(self.block_ends):
            return  # no block above the watermark (only pages of padding)
        if fresh:
            manager.poll(vbar.device, fresh=True)
        room = -manager.deficit_bytes(vbar.device)
        page = vbar.page_size
        raise_to = min((watermark + max(room, 0)) // page * page, top)
        if raise_to < min(-(-self.block_ends[at] // page) * page, top):
            return  # not room for the next block
        futile = self.futile_room
        if futile is not None and room < futile + page and self.wait > 0:
            _log.debug(
                "aimdo: device %d: the budget has room (%s), but no more than a raise the "
                "next forward undid had: the watermark stays at %s for %d more forwards",
                vbar.device,
                format_size(room),
                format_size(watermark),
                self.wait,
            )
            return
        # Under the Manager's pause lock, so that a pause of the device (which lowers the
        # watermark to 0 under it) is not undone; and only upwards (a budget grown may
        # have raised it to the top meanwhile).
        with manager._pause_lock:
            if runner.device_paused or vbar.watermark_bytes >= raise_to:
                return
            _log.debug(
                "aimdo: device %d: the budget has room again: the watermark is raised from "
                "%s to %s",
                vbar.device,
                format_size(watermark),
                format_size(raise_to),
            )
            self.raised = (watermark, room)
            if runner.tuner is not None:
                runner.tuner.disturbed()
            vbar.set_watermark(raise_to)
