"""The handle of a module offloaded in place (aimdo.torch.offload; design.md §7): it lays
the module out in blocks, places them in a VBAR, moves the weights to the host once, puts
the offloaded forwards in place and takes them out again. Needs PyTorch; imported by
aimdo.torch only."""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from . import _core, _torch_stream
from ._manager import Manager
from ._placement import place, placement_order
from ._schedule import ForwardStats, Schedule, auto_staging_bytes, stall_seconds, use_seconds
from ._sizes import format_size
from ._torch_checkpoint import attach
from ._torch_host import HostWeights
from ._torch_layout import Binding, lay_out
from ._torch_offload import _ABSENT, Runner, _TorchExecutor, make_forward
from ._torch_options import declared_order, forced_tiers, kept_first
from ._torch_stream import FileStream, ring_bytes_for
from ._torch_tiers import (
    STALL_FLOOR,
    pinned_by_stall,
    plan_tiers,
    read_bandwidth,
    reads_direct,
)
from ._torch_tune import START, PrefetchTuner
from .sim import SimBackend

_log = logging.getLogger("aimdo")


class Offload:
    """A module offloaded in place to one device: what ``offload`` returns.

    While offloaded, the module is called as before (``model(x)``, ``model.generate(...)``,
    from a pipeline that holds it) and runs on ``device``: each module with weights of its
    own is a block, one allocation in one VBAR. Before a block's module runs, its
    allocation is faulted: a signature equal to the last means the weights are still
    there (no copy); a new one means they are copied in from the host; offloaded means
    they go through a staging buffer (or, for a block larger than one, a temporary buffer
    of its own). Outside its forward a module holds placeholders of its weights' shapes
    and dtypes on ``device`` (so ``model.device`` is the compute device); they read as NaN
    (0 for integer dtypes): undo to read the weights. Outputs are the module's own, bit
    for bit and of the same types; only a tensor that views the weights is copied.

    Host memory: the weights are moved into a few exactly sized chunks (pinned on CUDA,
    where weights already pinned are used in place), and the module's own tensors then
    view them: the host holds each weight once (``pinned_bytes``). ``undo()`` (or leaving
    a ``with`` block) puts the module back as it was: its own tensor objects, in
    pageable memory of their own again, its forward methods, and frees everything.

    Placement, prefetch and staging as in design.md §7: blocks are placed when offloaded,
    in ``order`` (registration order for modules not declared), spread unless ``spread``
    is False; from the second forward on (the first learns the order, unless declared)
    ``prefetch`` copies are kept in flight ahead of the compute; offloaded blocks go
    through ``prefetch + 1`` staging buffers of at most ``staging_bytes // (prefetch + 1)``
    each, smaller ones riding in the room a buffer has left (``staging_bytes``: held now).
    ``last_stats`` tells what the last forward did.

    Inference only (forwards run under torch.no_grad()). Thread-safety: one forward at a
    time; a call or an undo from a second thread during one raises aimdo.InvalidStateError
    (the Runner's lock is only tried, never waited for); offload a copy of the model to
    another device to run two at once. A submodule called outside a forward of
    the whole runs on its own, without prefetch. A module that reads a submodule's
    weights without calling it must be offloaded ``whole``. Change weights only after
    undo.
    """

    def __init__(
        self,
        module,
        device: int,
        manager: Manager,
        options: dict,
        leader: Offload | None = None,
        rotation: float = 0.0,
        grouped: bool = False,
    ):
        backend = manager.backend
        sim = backend if isinstance(backend, SimBackend) else None
        self.device = torch.device("cpu") if sim else torch.device("cuda", device)
        self._index = device  # the Manager's device number
        checkpoint = options.get("checkpoint")
        blocks, bindings = lay_out(module, options["whole"], self.device, checkpoint is not None)
        declared = declared_order(options["order"], bindings)
        forced = forced_tiers(options.get("host_tiers"), module, blocks, bindings)
        self._first = kept_first(options.get("keep_first"), blocks, bindings)
        # Read and checked before anything changes; a group's other members copy from the
        # leader's chunks, which its checkpoint filled.
        stamps = attach(blocks, checkpoint) if checkpoint is not None and leader is None else None
        self._blocks = blocks
        self._module = weakref.ref(module)
        listed = set(declared)
        placed = declared + [block for block in blocks if block not in listed]
        self._stream = None  # reads the blocks left in the checkpoint files
        # Blocks that stay in the files until a timed forward tells which of them to pin
        # (_pin_by_stall), or None; the chunks it pins them in.
        self._tier_plan = self._later = None
        self._stamps = stamps
        prefetch = options["prefetch"]
        if prefetch is None:  # the default (a group's members take an int)
            # A cap on staging given: a deeper depth would cut it into buffers smaller
            # than the blocks, which then go through temporary buffers outside the cap.
            prefetch = "auto" if options["staging_bytes"] is None else START
        if stamps is not None:
            budget = manager.budget_bytes(device)
            # Only an offload that times a forward (to choose its prefetch) and whose
            # blocks no other device copies from (a group's) chooses its tiers by where
            # that forward's compute waited.
            defer = prefetch == "auto" and not grouped
            self._leave_in_files(
                device,
                placed,
                options,
                rotation,
                stamps,
                sim is None,
                forced,
                budget,
                backend,
                defer,
            )
        elif leader is not None and leader._stream is not None:
            theirs = leader._stream
            self._stream = FileStream(
                theirs.reader.stamps,
                sim is None,
                theirs.buffer_bytes,
                theirs.direct,
                backend.driver,
                device,
                theirs.largest_block,
            )
        # A group's other members copy from the leader's host chunks (one host copy).
        if leader is None:
            pinned = [block for block in blocks if not block.file_runs]
            self._host = HostWeights(pinned, pin=sim is None, stamps=stamps)
        else:
            self._host = _SharedHost(blocks)
        self._installed = []  # (module reference, its forward before, binding)
        self._runner = self._executor = None
        self._apart = False  # taken apart for good (undo completed)
        self._in_group = False  # a member of an OffloadGroup: undone with the group only
        self.vbar = None
        try:
            self.vbar = place(manager, device, placed, options["spread"], rotation, self._first)
            if leader is None:
                self._host.move_in()
            else:
                for own, theirs in zip(blocks, leader._blocks, strict=True):
                    own.runs = theirs.runs
                    if theirs.file_runs:
                        own.file_runs, own.stream = theirs.file_runs, self._stream
                    for mine, leaders in zip(own.weights, theirs.weights, strict=True):
                        mine.stride = leaders.stride  # as the leader's chunks hold them
            tuner = None
            if prefetch == "auto":
                prefetch = START
                tuner = PrefetchTuner(manager, device, options["staging_bytes"])
                tuner.first = self._first
                tuner.grow = _regrower(weakref.ref(self))  # shallower: grow back
                tuner.steady = _steadier(weakref.ref(self))  # each depth tried: its residency
            stream = torch.cuda.Stream(device=self.device) if sim is None and prefetch else None
            staging = options["staging_bytes"]
            if staging is None:
                sizes = [block.nbytes for block in blocks]
                staging = auto_staging_bytes(sizes, prefetch, manager.budget_bytes(device))
            self._executor = _TorchExecutor(self.device, stream, device, backend)
            self._executor.file_stream = self._stream  # the Schedule tells it the window
            schedule = Schedule(
                self._executor,
                self.vbar,
                blocks,
                prefetch,
                declared,
                learning=options["order"] is None,
                staging_bytes=staging,
            )
            self._runner = Runner(schedule, self.device)
            self._runner.tuner = tuner
            if self._tier_plan is not None:  # with the tuner's first forward timed
                self._runner.pin_by_stall = weakref.WeakMethod(self._pin_by_stall)
            self._runner.timing = options.get("timings", False)
            self._runner.manager_ref = weakref.ref(manager)
            self._manager_ref = weakref.ref(manager)
            manager._grow_back(device, id(self), _grower(weakref.ref(self)))
            manager._on_pause(device, id(self), _pauser(weakref.ref(self)))
            self._install(module, bindings)
        except BaseException:
            self._take_apart()
            raise

    def _leave_in_files(
        self, device, placed, options, rotation, stamps, pin, forced, budget, backend, defer
    ) -> None:
        """Decide which blocks stay in the checkpoint files (host_limit, host_tiers) and
        log it. With `defer`, when the limit leaves some in the files, every block that
        may stream stays there until a timed forward tells which to pin
        (_pin_by_stall)."""
        order = placement_order(placed, options["spread"], rotation, self._first)
        plan = plan_tiers(order, options["host_limit"], forced, budget, defer)
        self._tier_plan, files, every = plan.deferred, plan.files, plan.every
        cost = ""
        if files:
            largest = max(w.source.nbytes for block in files for w in block.weights)
            path = files[0].weights[0].source.path
            largest_block = max(sum(w.source.nbytes for w in b.weights) for b in files)
            ring_bytes = ring_bytes_for(largest, largest_block)  # pinned too, at the first copy
            asked = options.get("file_reads", "auto")
            direct, how = reads_direct(every, plan.pinned + ring_bytes, path, asked)
            self._stream = FileStream(
                stamps, pin, largest, direct, backend.driver, device, largest_block
            )
            for block in files:
                block.file_runs = [(w.offset, w.source) for w in block.weights]
                block.stream = self._stream
            cost = f"; they are read {how}"
            if self._stream.read_ahead_bytes == "auto":
                ahead, ring = self._stream.auto_read_ahead_bytes(), self._stream.ring_bytes
                cost += (
                    f", and read ahead of their copies (up to {format_size(ahead)} of the "
                    f"{format_size(ring)} ring) while the prefetch window is at most "
                    f"{_torch_stream.READ_AHEAD_WINDOW} copies"
                )
            bandwidth = read_bandwidth(files, direct)
            if bandwidth:
                cost += (
                    f"; the files read at {bandwidth / 1e9:.1f} GB/s now, so the "
                    f"{format_size(every)} of them placed beyond the VRAM budget add up to "
                    f"{every / bandwidth * 1000:.0f} ms "
                    "of reading to a forward, overlapped with its compute"
                )
        _log.info("aimdo: offload on device %s %s%s", device, plan.said, cost)

    def _pin_by_stall(self, schedule, marks) -> bool:
        """After a forward timed block by block (`marks`, Schedule.marks), which read
        every block that can stream from the files: pin the blocks pinned_by_stall
        chooses of those (_tier_plan), the blocks that forward offloaded counting as
        copied at every forward, reading them into chunks of their own, and log what it
        chose. Returns whether the choice is made: not when that forward offloaded
        nothing (every block fits: no wait to learn from; the next forward timed so
        chooses). On a failure (host memory, a file) they stay in the files, and a
        warning says why; interrupted, nothing changes and the next timed forward tries
        again."""
        if not any(block.offloaded for block in self._blocks):
            return False
        candidates, left = self._tier_plan
        every = {block for block in candidates if block.offloaded}
        stalls = stall_seconds(marks, schedule.executor.elapsed)
        chosen = pinned_by_stall(candidates, every, stalls, left)
        if not chosen:
            self._tier_plan = None
            return True
        host = HostWeights(chosen, pin=self._host.pin, stamps=self._stamps)
        try:
            host.move_in()  # gives back what it pinned on any failure
        except Exception as error:  # noqa: BLE001 - the offload runs on, reading them
            self._tier_plan = None
            _log.warning(
                "aimdo: offload on device %s leaves %s of weights in the files it was to pin: %s",
                self._index,
                format_size(sum(block.nbytes for block in chosen)),
                error,
            )
            return True
        self._tier_plan = None
        self._later = host
        self._stream.leave(chosen)  # no longer read: out of the order read ahead
        for block in chosen:
            block.file_runs, block.stream = [], None
        copied = [block for block in chosen if block in every]
        stalled = [block for block in copied if stalls.get(block, 0.0) >= STALL_FLOOR]
        rest = [block for block in self._blocks if block.file_runs]
        _log.info(
            "aimdo: offload on device %s pins %d blocks (%s) it read from the files until "
            "its first forward timed block by block: %d (%s) copied at every forward, "
            "%d of them those the compute waited for most per byte in that forward "
            "(%.1f ms of its %.1f ms of waiting), and %d others; %d blocks (%s) stay in "
            "the files",
            self._index,
            len(chosen),
            format_size(sum(block.nbytes for block in chosen)),
            len(copied),
            format_size(sum(block.nbytes for block in copied)),
            len(stalled),
            sum(stalls[block] for block in stalled) * 1000,
            sum(stalls.values()) * 1000,
            len(chosen) - len(copied),
            len(rest),
            format_size(sum(block.nbytes for block in rest)),
        )
        return True

    @property
    def streamed_bytes(self) -> int:
        """Bytes of weights left in the checkpoint's files, read at each copy (see
        ``host_limit``); 0 without a checkpoint."""
        return sum(block.nbytes for block in self._blocks if block.file_runs)

    def _install(self, root, bindings) -> None:
        if not bindings or bindings[0][0] is not root:  # the root begins every forward
            bindings = [(root, Binding()), *bindings]
        for module, binding in bindings:
            forward, previous = make_forward(self._runner, module, binding, module is root)
            self._installed.append((weakref.ref(module), previous, binding))
            module.__dict__["forward"] = forward
            for entries, key, placeholder in binding.restore:
                entries[key] = placeholder

    def _take_apart(self) -> None:
        """Put the modules back, then free what the offload holds, each step done once
        (retried after a failure, it carries on)."""
        while self._installed:
            reference, previous, binding = self._installed.pop()
            module = reference()
            if module is None:
                continue
            if previous is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
            for entries, key, original in binding.originals:
                entries[key] = original
        if self._executor is not None:
            self._executor.synchronize()  # no copy reads the chunks or writes the buffers
        if self._stream is not None:
            self._stream.close()
        for block in self._blocks:
            block.file_runs, block.stream = [], None
        if self._runner is not None:
            self._runner.schedule.drop_staging()
        for block in self._blocks:
            block.page_storage = block.page_views = block.in_pages = None
            block.unbind()
        self._host.give_back()
        if self._later is not None:
            self._later.give_back()
        manager = getattr(self, "_manager_ref", lambda: None)()
        if manager is not None and self.vbar is not None:
            manager._stop_growing(self.vbar.device, id(self))
        if self.vbar is not None:
            self.vbar.close()

    def undo(self) -> None:
        """Put the module back as it was before ``offload`` and free the VBAR, the
        staging buffers and the host chunks. A second call does nothing. Errors:
        aimdo.InvalidStateError during a forward (nothing changed); a DriverError from
        closing the VBAR, after the module is back (call again to retry)."""
        if self._in_group:
            raise _core.InvalidStateError(
                "this offload is a member of an OffloadGroup, whose other devices may read "
                "its pages: undo the group"
            )
        runner = self._runner
        if runner is None or self._apart:
            return
        if not runner.lock.acquire(blocking=False):
            raise _core.InvalidStateError("cannot undo an offload while its module runs")
        try:
            self._undo_locked()
        finally:
            runner.lock.release()

    def _undo_locked(self) -> None:
        """Undo, the runner's lock held; done for good once it returns."""
        self._runner.undone = True
        self._take_apart()
        self._apart = True

    def __enter__(self) -> Offload:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    @property
    def undone(self) -> bool:
        return self._runner is None or self._runner.undone

    @property
    def module(self) -> torch.nn.Module | None:
        """The offloaded module (None once it is garbage)."""
        return self._module()

    @property
    def prefetch(self) -> int:
        """Copies kept in flight ahead of the running block (0: none, no staging)."""
        return self._runner.schedule.prefetch

    @property
    def prefetch_predictions(self) -> dict[int, float] | None:
        """With ``prefetch="auto"``, once predicted (after the first forward whose order
        is known): the predicted seconds of a forward at each depth of CANDIDATES (the
        trials then measure some of them: ``prefetch_measured``); else None."""
        tuner = self._runner.tuner
        return None if tuner is None else tuner.predicted

    @property
    def prefetch_choosing(self) -> bool:
        """With ``prefetch="auto"``, True until the depth is chosen for good: while the
        forwards are timed, predicted and tried (a forward on trial synchronizes the device
        before and after it); else False. False too while every block fits (the forward
        timed for the choice offloaded none): it is chosen once one is offloaded."""
        if self.undone:
            return False
        tuner = self._runner.tuner
        return tuner is not None and tuner.choosing(self._runner.schedule)

    @property
    def prefetch_measured(self) -> dict[int, float] | None:
        """With ``prefetch="auto"``: the measured seconds of a forward at each depth tried
        for real so far, the fastest of its measurements (after the prediction, from the
        predicted depth deeper, one forward each, until one is 10% slower than the
        fastest; then the two fastest once more); else None."""
        tuner = self._runner.tuner
        return None if tuner is None else dict(tuner.measured)

    @property
    def last_stats(self) -> ForwardStats:
        """What the last forward (or submodule called on its own) did."""
        return self._runner.last_stats

    @property
    def timings(self) -> bool:
        """Whether each forward of the whole module is timed (``last_timings``). Off by
        default: a timed forward records a CUDA event at each block's start, once its
        weights are in place and at its end, and two around each copy (its cost on the
        host is measured in benchmarks/RESULTS.md). May be switched between forwards."""
        return self._runner.timing

    @timings.setter
    def timings(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"timings must be a bool, got {on!r}")
        self._runner.timing = on

    @property
    def last_timings(self):
        """The last timed forward of the whole module (aimdo.torch.ForwardTimings: per
        block and in total, bytes copied by source, copy time, compute time and the
        compute's stall on copies), or None when none was timed (or the last timed one
        failed). On CUDA the first read waits for that forward's events."""
        recorded = self._runner.recorded
        return None if recorded is None else recorded.timings()

    @property
    def pinned_bytes(self) -> int:
        """Bytes of host memory this offload holds for the weights (pinned on CUDA; on a
        simulator plain memory, counted the same): the chunks, and the ring of buffers
        that blocks left in the checkpoint's files are read through. Weights already
        pinned, used in place, are not counted. 0 once undone. With the tiers chosen
        after the first forward timed block by block (``host_limit``), the chunks that
        choice pins are counted from then on."""
        ring = self._stream.nbytes if self._stream is not None else 0
        later = self._later.pinned_bytes if self._later is not None else 0
        return self._host.pinned_bytes + later + ring

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging buffers held on the device now (PyTorch memory: through
        ``use_allocator``, inside aimdo's budget). Temporary buffers are not held between
        forwards; ``last_stats.peak_temporary_bytes`` tells their most."""
        return 0 if self.undone else self._runner.schedule.staging_bytes

    def fill(self) -> int:
        """Copy the weights into as many of the VBAR's blocks as the budget holds, in
        placement order, without running anything: for a device that serves its peers'
        copies (a donor, see offload_group). Returns the bytes copied (0 when they were
        all in place). aimdo.InvalidStateError while the module runs or once undone."""
        runner = self._runner
        if runner is None or runner.undone:
            raise _core.InvalidStateError("this offload was undone")
        if not runner.lock.acquire(blocking=False):
            raise _core.InvalidStateError("cannot fill an offload while its module runs")
        try:
            placed = sorted(self._blocks, key=lambda block: block.allocation.offset)
            device = self.device
            try:
                with torch.cuda.device(device) if device.type == "cuda" else _NO_DEVICE:
                    return runner.schedule.fill(placed)
            finally:
                self._executor.release_peer_pins(wait=True)  # a donor runs no forward
        finally:
            runner.lock.release()

    def timed(self, call):
        """Run `call()`, a forward of the module, with each use of a block timed (CUDA
        events on the compute stream; the host's clock on a simulator): its result, and
        (block index, compute seconds) per use in run order, copies left out (see
        aimdo._schedule.use_seconds)."""
        runner = self._runner
        schedule, executor = runner.schedule, self._executor
        marks = schedule.marks = [("start", None, executor.mark())]
        if self.device.type != "cuda":
            executor.inline_marks = marks  # copies in line are the host's, not compute
        runner.outside_end = None
        try:
            result = call()
            # The last forward's end (before the prefetch tuner's work after it), or now.
            end = runner.outside_end
            marks.append(("end", None, executor.mark() if end is None else end))
        finally:
            schedule.marks = executor.inline_marks = None
        index = {block: i for i, block in enumerate(self._blocks)}
        return result, [(index[block], s) for block, s in use_seconds(marks, executor.elapsed)]

    def pause(self) -> int:
        """Give back the device memory this offload holds: every page of its VBAR that no
        peer is copying from, and its staging buffers (PyTorch memory: through
        ``use_allocator`` back to the driver). Its state is kept; the module refuses to
        run until ``resume()``, and then copies its weights in again as it runs. Returns
        the bytes of pages given back. aimdo.InvalidStateError during a forward or once
        undone; a second pause does nothing more."""
        runner = self._runner
        if runner is None or runner.undone:
            raise _core.InvalidStateError("this offload was undone")
        if not runner.lock.acquire(blocking=False):
            raise _core.InvalidStateError("cannot pause an offload while its module runs")
        try:
            runner.paused = True
            self._executor.synchronize()  # nothing queued still reads the buffers or pages
            runner.schedule.drop_staging()
            freed = self.vbar.free_memory(self.vbar.size)
            _log.info(
                "aimdo: offload on device %s paused: %s of pages given back",
                self.vbar.device,
                format_size(freed),
            )
            return freed
        finally:
            runner.lock.release()

    def resume(self) -> None:
        """Let the module run again after ``pause()`` (nothing if not paused): its VBAR
        may fill again as it runs."""
        if self._runner is not None and self._runner.paused:
            self._runner.paused = False
            self._grow()

    def _grow(self) -> None:
        """Raise the VBAR's watermark to the top (evictions lowered it), so that its
        faults map pages again where the budget has room. Prefetch trials in progress
        settle again (resumed, or a budget grown: the residency they measured changes)."""
        if self._runner is not None:
            self._runner.grow_back.forget()
            if self._runner.tuner is not None:
                self._runner.tuner.disturbed()
        vbar = self.vbar
        device_paused = self._runner is not None and self._runner.device_paused
        if vbar is not None and not vbar.closed and not self.paused and not device_paused:
            vbar.set_watermark(vbar.size)

    @property
    def paused(self) -> bool:
        return self._runner is not None and self._runner.paused

    def placement(self) -> list[tuple[str, int, int]]:
        """(module name, offset in the VBAR, bytes) of every block, by offset."""
        placed = [(b.name, b.allocation.offset, b.allocation.size) for b in self._blocks]
        return sorted(placed, key=lambda entry: entry[1])

    def __repr__(self) -> str:
        state = "undone" if self.undone else f"{len(self._blocks)} blocks"
        return f"<aimdo.torch.Offload of {type(self.module).__name__} on {self.device}: {state}>"


_NO_DEVICE = contextlib.nullcontext()


class _SharedHost:
    """The host weights of a group member other than its leader: the leader's, which it
    neither holds nor gives back (it only drops its blocks' references to them)."""

    pinned_bytes = 0

    def __init__(self, blocks):
        self.blocks = blocks

    def give_back(self) -> None:
        for block in self.blocks:
            block.runs = []


def _grower(reference):
    """What the Manager calls when a device's budget grows: the offload's _grow, holding
    the offload weakly (the Manager must not keep a dropped module alive)."""

    def grow() -> None:
        offload = reference()
        if offload is not None:
            offload._grow()

    return grow


def _regrower(reference):
    """What the prefetch trials call once they kept a depth shallower than one they tried,
    or go on to try one shallower than the one they run at (holding the offload weakly):
    the deeper depths' staging buffers, dropped already, go back to the driver (PyTorch's
    cache would keep them, counted as others' memory), and growing back
    (GrowBack.poll_after_next) polls the budget afresh as the next forward ends, then
    raises the watermark into the room they left. Not at once: right after the cache is
    emptied PyTorch's pool lacks the forward's own staging and activations, which the next
    forward takes again. On an H200 a fresh poll at once let a synthetic 35 GiB
    model fill 0.57 GiB above its 24 GiB limit until the next due poll
    (benchmarks/RESULTS.md, eighth session)."""

    def grow() -> None:
        offload = reference()
        if offload is None or offload.undone or offload._runner is None:
            return
        if offload.device.type == "cuda":
            with torch.cuda.device(offload.device):
                torch.cuda.empty_cache()
        offload._runner.grow_back.poll_after_next()

    return grow


def _steadier(reference):
    """What the prefetch trials call after the forward that settles a depth (holding the
    offload weakly): the budget polled afresh, so that it counts the staging buffers that
    depth made (PyTorch's memory, which the budget sees only at a poll), and the deficit
    evicted at once. Without it, the measured forward ran at a residency the depth could
    not keep (its eviction due at a poll up to 2 s later), or was disturbed by it and
    settled again."""

    def steady() -> None:
        offload = reference()
        if offload is None or offload.undone or offload.vbar is None:
            return
        manager = offload._manager_ref()
        if manager is not None:
            device = offload.vbar.device
            try:
                manager.poll(device, fresh=True)
                manager.reclaim(device, 0)
            except Exception as error:  # noqa: BLE001 - only a better measurement lost
                _log.debug("aimdo: settling the residency of a prefetch trial failed: %s", error)

    return steady


def _pauser(reference):
    """What Manager.pause and resume call for an offload on their device (holding it
    weakly): it stops taking forwards, giving its staging buffers back at once, or when
    the forward running ends; or it takes them again, its watermark raised to the top
    (unless the offload is paused itself)."""

    def pause(paused: bool) -> None:
        offload = reference()
        if offload is None or offload.undone:
            return
        runner = offload._runner
        runner.device_paused = paused
        if paused:
            runner.give_back_staging()
        elif not runner.paused:
            offload._grow()  # as after a budget grown meanwhile: fill again where it fits

    return pause
