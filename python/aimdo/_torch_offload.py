"""A module offloaded in place (aimdo.torch.offload; design.md §7): the schedule's executor
on PyTorch tensors, the Runner the modules share, and the forward put in each module that
runs its blocks. aimdo.torch's Offload puts them in place and takes them out. Needs
PyTorch; imported by aimdo.torch only."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import weakref

import torch

from . import _core
from ._executor import IN_LINE, PAGES, TEMPORARY, Executor
from ._schedule import ForwardStats, Schedule, pin_peer_copy, unpin_peer
from ._sizes import format_size
from ._timings import Recorded
from ._torch_grow import GrowBack
from ._torch_layout import Binding, TorchBlock
from ._torch_outputs import owned
from ._torch_stream import Pending, drain_after_failure
from ._torch_tune import signature
from ._torch_views import as_tensor

_log = logging.getLogger("aimdo")

_ABSENT = object()


class _Staging:
    """A staging buffer: the uint8 tensor, and per block where it was staged in it last and
    the views made there (kept while the buffer lives, so a block staged there again makes
    none)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.views: dict[TorchBlock, tuple[int, tuple]] = {}


class _TorchExecutor(Executor):
    """The schedule on PyTorch tensors. On CUDA the compute engine is the current stream,
    the copy engine a stream of this offload's own (made when prefetch > 0), and tokens
    are CUDA events. On a simulator with real bytes everything is CPU work, done in line
    when queued: there is no copy stream and no token.

    A destination is a uint8 tensor holding each weight at its offset: the block's pages
    (viewed once, since a VBAR's addresses never move, and reused while the allocation
    lives), a stretch of a staging buffer (from block.staged_at), or a temporary tensor.
    It also sets the block's views and address range. IN_LINE: the copy runs on the
    compute stream, so the compute needs no event."""

    def __init__(self, device: torch.device, copy_stream, ordinal: int = 0, backend=None):
        self._device = device
        self._copy_stream = copy_stream
        self._ordinal = ordinal  # the device's number in the Manager
        self._backend = backend  # for peer copies (the driver; on a simulator, adoption)
        self._sim = backend if device.type != "cuda" else None
        self._peer_pins = []  # (copy done token, peer block): unpinned once the copy is done
        self.file_stream = None  # the offload's FileStream, if blocks stay in files
        self.peer_bytes = 0  # bytes read from peers' pages since the last take_peer_bytes
        # While a list (a timed forward): (block, source, bytes, start mark, end mark) for
        # each copy queued (aimdo._timings.Recorded).
        self.copy_marks = None
        # On a simulator, while the forward is timed: its Schedule.marks, which each copy
        # (in line on the host) marks with "copy" and "copied" (see use_seconds).
        self.inline_marks = None

    def _device_tensor(self, nbytes: int) -> torch.Tensor:
        """A tensor of device memory; on a simulator, CPU memory it adopts as the device's,
        so that a peer copy may write it (given back when the tensor is freed)."""
        tensor = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        if self._sim is not None and nbytes:
            self._sim.adopt(self._ordinal, tensor)  # given back when the tensor is freed
        return tensor

    def new_buffer(self, nbytes: int) -> _Staging:
        return _Staging(self._device_tensor(nbytes))

    def compute_point(self):
        # After a new buffer, this event also covers the allocator's reuse of memory that
        # compute work queued before it may still read.
        if self._device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        return event

    def destination(self, block: TorchBlock, into) -> torch.Tensor:
        if into is PAGES:
            if block.page_storage is None:
                storage = as_tensor(block.allocation, torch.uint8, (block.nbytes,))
                block.page_views = (storage, block.make_views(storage), storage.data_ptr())
                block.page_storage = storage
            kept = block.page_views
        elif into is TEMPORARY:
            # Allocated on the compute stream, where it is used and freed: a copy on the copy
            # stream waits for that stream before writing into it.
            storage = self._device_tensor(block.nbytes)
            kept = (storage, block.make_views(storage), storage.data_ptr())
        else:
            at = block.staged_at
            found = into.buffer.views.get(block)
            if found is not None and found[0] == at:
                kept = found[1]
            else:
                storage = into.buffer.tensor[at : at + block.nbytes]
                kept = (storage, block.make_views(storage), storage.data_ptr())
                into.buffer.views[block] = (at, kept)
        storage, block.views, block.start = kept
        block.end = block.start + block.nbytes
        return storage

    def copy(self, block: TorchBlock, storage: torch.Tensor, after):
        timed = self.copy_marks
        if block.file_runs and not block.peers and after is not IN_LINE:
            # Read from the files by the stream's own thread: the forward's thread goes on
            # queueing compute meanwhile (design.md §7, host tiers).
            pending = block.stream.copy_ahead(
                block, storage, self._copy_stream, after, timed is not None
            )
            if timed is not None:
                timed.append((block, "file", block.nbytes, pending, pending))
            return pending
        source = self._peer_source(block) if block.peers else None
        if self._device.type != "cuda":  # a simulator: the copy is done when it returns
            inline = self.inline_marks
            start = self.mark() if timed is not None or inline is not None else None
            if source is None:
                self.copy_weights(block, storage)
            else:
                try:
                    self._copy_from_peer(block, storage, source, 0)
                finally:
                    unpin_peer(source)
            if start is not None:
                end = self.mark()
                if timed is not None:
                    timed.append((block, _source(block, source), block.nbytes, start, end))
                if inline is not None:  # the host did it: no block's compute
                    inline += (("copy", block, start), ("copied", block, end))
            return None
        # In line (the order not known yet, or no copy stream): on the compute stream.
        in_line = after is IN_LINE or self._copy_stream is None
        stream = torch.cuda.current_stream(self._device) if in_line else self._copy_stream
        try:
            with torch.cuda.stream(stream):
                if after is not None and not in_line:
                    stream.wait_event(after)
                if timed is not None:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                if source is None:
                    self.copy_weights(block, storage)
                else:
                    if source.filled is not None:
                        stream.wait_event(source.filled)  # the peer's own copy into its pages
                    self._copy_from_peer(block, storage, source, stream.cuda_stream)
                done = torch.cuda.Event(enable_timing=timed is not None)
                done.record(stream)
        except BaseException:
            if source is not None:
                stream.synchronize()  # a copy queued before the failure may still read it
                unpin_peer(source)
            raise
        if timed is not None:
            timed.append((block, _source(block, source), block.nbytes, start, done))
        if source is not None:
            self._peer_pins.append((done, source))  # unpinned once the copy is done
        if storage is block.page_storage:
            block.filled = done  # a peer reading these pages waits for this copy
        return None if in_line else done

    def _peer_source(self, block: TorchBlock):
        """A peer's copy of the block to copy from, pinned (see pin_peer_copy), or None:
        then the copy comes from the host. Unpins first what finished copying."""
        self.release_peer_pins(wait=False)
        return pin_peer_copy(block.peers)

    def _copy_from_peer(self, block: TorchBlock, storage, peer: TorchBlock, stream: int):
        """One copy of the whole block from the peer's pages into `storage`, queued on
        `stream` of this device (the driver's device-to-device copy: it waits for nothing
        the peer's compute queued). The caller gives the peer's pin back."""
        self._backend.driver.copy(
            self._ordinal, storage.data_ptr(), peer.allocation.address, block.nbytes, stream
        )
        self.peer_bytes += block.nbytes

    def release_peer_pins(self, wait: bool) -> None:
        """Unpin the peers' pages whose copies are done (all of them, waiting, if `wait`).
        Each pin leaves the list before it is dropped, so none is dropped twice; the first
        failure is raised after the others are dropped."""
        pending, self._peer_pins = self._peer_pins, []
        failure = None
        for done, peer in pending:
            if not wait and not done.query():
                self._peer_pins.append((done, peer))
                continue
            try:
                if wait:
                    done.synchronize()
                unpin_peer(peer)
            except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                failure = failure or error
        if failure is not None:
            raise failure

    def take_peer_bytes(self) -> int:
        taken, self.peer_bytes = self.peer_bytes, 0
        return taken

    def wait_for(self, token) -> None:
        if isinstance(token, Pending):
            token = self._settled(token)  # its reads done and its copy queued, or raises
            if token is None:  # a simulator: the copy is done
                return
        torch.cuda.current_stream(self._device).wait_event(token)

    def host_wait(self, token) -> None:
        if isinstance(token, Pending):
            token = self._settled(token)
            if token is None:
                return
        token.synchronize()

    def _settled(self, pending: Pending):
        """The event of a copy made in the background, once queued. If it failed (a read)
        or the wait was interrupted, the job may still run or have queued part of its
        copies: they finish before the error goes on, so that nothing they write into is
        given back under them."""
        try:
            return pending.result()[0]
        except BaseException:
            drain_after_failure(self.drain_copies)
            raise

    def mark(self):
        if self._device.type != "cuda":
            return super().mark()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def elapsed(self, first, second) -> float:
        if self._device.type != "cuda":
            return super().elapsed(first, second)
        second.synchronize()
        return first.elapsed_time(second) / 1000.0

    def drain_copies(self) -> None:
        if self.file_stream is not None:
            self.file_stream.drain()
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def synchronize(self) -> None:
        """Return once everything queued on the device is done (before host memory that
        copies read, or buffers they write, are given back)."""
        if self.file_stream is not None:
            self.file_stream.drain()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self.release_peer_pins(wait=True)

    @staticmethod
    def copy_weights(block: TorchBlock, storage: torch.Tensor) -> None:
        """Queue the block's copy runs from the host into `storage`, on the current stream
        (non-blocking from pinned memory on CUDA; at once on the CPU)."""
        for offset, source in block.runs:
            storage[offset : offset + source.numel()].copy_(source, non_blocking=True)
        if block.file_runs:
            block.stream.copy_in(block, storage)  # after the copies queued ahead of it


def _source(block: TorchBlock, peer) -> str:
    """Where a copy of `block` reads (aimdo._timings.SOURCES)."""
    if peer is not None:
        return "peer"
    return "file" if block.file_runs else "host"


class Runner:
    """What the modules' forwards share: the schedule, and who is running a forward.

    One forward at a time: a thread that calls a module while another thread runs a
    forward gets InvalidStateError (the lock is only tried, never waited for). The thread
    running one (`owner`) calls its modules straight through."""

    def __init__(self, schedule: Schedule, device: torch.device):
        self.schedule = schedule
        self.device = device
        self.owner = None  # thread ident of the forward in progress
        self.lock = threading.Lock()
        self.last_stats = ForwardStats()
        self.undone = False
        self.tuner = None  # chooses the prefetch depth (offload(prefetch="auto"))
        # The Offload's _pin_by_stall, weakly (a weakref.WeakMethod), called with
        # (schedule, marks) after each of the tuner's forwards timed block by block until
        # it returns True: pins the blocks the Offload left in the files until then; or
        # None.
        self.pin_by_stall = None
        self.paused = False  # Offload.pause(): its memory given back until resume()
        self.device_paused = False  # Manager.pause(device), until Manager.resume(device)
        self.watermark = None  # the VBAR's watermark after the last forward of the whole
        self.manager_ref = lambda: None  # the Manager, weakly (set by the Offload)
        self.timing = False  # Offload.timings: time every forward of the whole module
        self.recorded = None  # the last timed forward's marks (aimdo._timings.Recorded)
        # Under Offload.timed: the mark at the end of the last forward of the whole module,
        # taken before the prefetch tuner's own work (Offload.timed ends its marks there).
        self.outside_end = None
        self.grow_back = GrowBack()  # raises the watermark into room others gave back

    def call(self, forward, is_root: bool, args, kwargs):
        """Run `forward` (an offloaded module's) as a forward of its own: the whole
        module's (learning the order, prefetching) when `is_root`, else one module's."""
        if not self.lock.acquire(blocking=False):
            raise _core.InvalidStateError(
                "an offloaded module runs one forward at a time: another thread is in one "
                "(or is undoing the offload)"
            )
        if self.undone:  # undone since the caller looked: `forward` now finds the original
            self.lock.release()
            return forward(*args, **kwargs)
        if self.paused or self.device_paused:
            self.lock.release()
            raise _core.InvalidStateError(
                "this offloaded module is paused (Offload.pause): call resume() first"
                if self.paused
                else "this offloaded module's device is paused (Manager.pause): resume it first"
            )
        try:
            self.owner = threading.get_ident()
            schedule = self.schedule
            executor = schedule.executor
            tuner = self.tuner if is_root else None
            wants = None
            if tuner is not None:
                try:
                    wants = tuner.wants(schedule)
                except Exception as error:  # noqa: BLE001 - the forward runs on, untimed
                    tuner.stop(schedule, error)
            if is_root:  # after wants(): the trials it ends ask growing back to poll after this
                self.grow_back.begun += 1
            # The forward's marks are this call's to take unless someone outside set them
            # (Offload.timed, around this call); the tuner and the timings share them.
            timed = is_root and self.timing
            marking = (timed or wants == "blocks") and schedule.marks is None
            # Marks set outside (Offload.timed around this call, which may hold several
            # forwards): the tuner reads this forward's, from a start mark of its own.
            outside = schedule.marks if is_root and not marking else None
            own = None
            if outside is not None and wants == "blocks":
                own = (len(outside), executor.mark())
            began = None
            if wants == "measure":  # a trial: the forward alone on the device, whole
                try:
                    executor.synchronize()
                    began = tuner.clock()
                except Exception as error:  # noqa: BLE001 - the forward runs on, untimed
                    tuner.stop(schedule, error)
            if marking:
                schedule.marks = [("start", None, executor.mark())]
                if self.device.type != "cuda":
                    executor.inline_marks = schedule.marks
                if timed:
                    executor.copy_marks = []
                    self.recorded = None
            schedule.begin_forward(standalone=not is_root)
            failed = True
            try:
                device = self.device
                on_device = torch.cuda.device(device) if device.type == "cuda" else _NO_CONTEXT
                with torch.no_grad(), on_device:
                    output = forward(*args, **kwargs)
                failed = False
                return output
            finally:
                try:
                    schedule.end_forward()
                except BaseException:
                    failed = True  # not timed, nor measured by the trials
                    raise
                finally:
                    executor.release_peer_pins(wait=True)
                    schedule.stats.bytes_from_peers = executor.take_peer_bytes()
                    if executor.file_stream is not None:
                        schedule.stats.bytes_from_files = executor.file_stream.take_bytes_read()
                    self.last_stats = schedule.stats
                    if is_root:
                        self._watch_watermark(schedule)
                    marks = None
                    if marking:
                        marks, schedule.marks = schedule.marks, None
                        marks.append(("end", None, executor.mark()))
                        copies, executor.copy_marks = executor.copy_marks, None
                        executor.inline_marks = None
                        if timed and not failed:
                            clock = "cuda events" if self.device.type == "cuda" else "host clock"
                            self.recorded = Recorded(marks, copies, executor.elapsed, clock)
                    elif outside is not None:
                        end = self.outside_end = executor.mark()
                        if own is not None and not failed:
                            first, start = own
                            marks = [("start", None, start), *outside[first:], ("end", None, end)]
                    if wants is not None:
                        on_device = (
                            torch.cuda.device(self.device)
                            if self.device.type == "cuda"
                            else _NO_CONTEXT
                        )
                        with on_device:
                            try:
                                if wants == "blocks":
                                    self._choose_tiers(schedule, failed, marks)
                                    tuner.after(schedule, failed, marks)
                                else:
                                    seconds = like = None
                                    if wants == "measure" and began is not None and not failed:
                                        executor.synchronize()
                                        seconds = tuner.clock() - began
                                        like = signature(args, kwargs)
                                    tuner.after_trial(schedule, wants, failed, seconds, like)
                            except Exception as error:  # noqa: BLE001 - the forward's result stands
                                tuner.stop(schedule, error)
                    if is_root and not failed:
                        self.grow_back.after_forward(self, schedule)
        finally:
            self.owner = None
            self.lock.release()
            if self.device_paused:  # paused during this call: give the staging back now
                self.give_back_staging()

    def _choose_tiers(self, schedule, failed: bool, marks) -> None:
        """Call pin_by_stall after a forward timed block by block that did not fail,
        until it says the choice is made; a failure of its own is logged (the forward's
        result and the tuner's choice stand; the blocks stay in the files). Interrupted,
        it is called again after the next such forward."""
        if self.pin_by_stall is None or failed or marks is None:
            return
        choose = self.pin_by_stall()
        try:
            if choose is None or choose(schedule, marks):  # None: the Offload is gone
                self.pin_by_stall = None
        except Exception as error:  # noqa: BLE001 - the offload runs on, reading them
            self.pin_by_stall = None
            _log.warning(
                "aimdo: choosing which blocks to pin failed (%s): they stay in the files", error
            )

    def give_back_staging(self) -> None:
        """Drop the staging buffers (synchronizing first) unless a forward runs; one that
        runs drops them as it ends (device paused)."""
        if self.lock.acquire(blocking=False):
            try:
                self.schedule.executor.synchronize()
                self.schedule.drop_staging()
            finally:
                self.lock.release()

    def _watch_watermark(self, schedule: Schedule) -> None:
        """After a forward of the whole: say (INFO) when evictions for memory others took
        lowered the share of the model that may stay resident since the last forward, and
        (DEBUG) what the forward did."""
        vbar = schedule.vbar
        if vbar.closed or self.paused or self.device_paused:
            self.watermark = None  # a pause lowered it, not others' memory
            return
        now, before = vbar.watermark_bytes, self.watermark
        self.watermark = now
        manager = self.manager_ref()
        if before is not None and now < before and manager is not None:
            device = vbar.device
            _log.info(
                "aimdo: device %d: evictions for other memory lowered this model's resident "
                "share from %s to %s of %s (aimdo uses %s of a %s budget on the device)",
                device,
                format_size(before),
                format_size(now),
                format_size(vbar.size_bytes),
                format_size(manager.usage_bytes(device)),
                format_size(manager.budget_bytes(device)),
            )
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("aimdo: device %d forward: %s", vbar.device, self.last_stats)


_NO_CONTEXT = contextlib.nullcontext()


def make_forward(runner: Runner, module: torch.nn.Module, binding: Binding, is_root: bool):
    """The function offload puts in `module.forward`: fault the module's blocks, put views
    of them in its _parameters/_buffers, run its own forward, put the placeholders back,
    copy any output that views the blocks, release them. It holds the module weakly (the
    module holds it), and carries the original forward's signature (transformers reads
    it to pick the arguments of generate)."""
    reference = weakref.ref(module)
    previous = module.__dict__.get("forward", _ABSENT)
    if previous is _ABSENT:
        target = type(module).forward
    else:  # a forward set on the instance before (another library's wrapper): kept as it is

        def target(_module, *args, **kwargs):
            return previous(*args, **kwargs)

    blocks, count = tuple(binding.blocks), len(binding.blocks)
    assign, restore = tuple(binding.assign), tuple(binding.restore)
    before, release, get_ident = (
        runner.schedule.before,
        runner.schedule.release,
        threading.get_ident,
    )

    def forward(*args, **kwargs):
        if runner.owner != get_ident():
            # This function, found through the module: a closure naming itself would be a
            # cycle only the garbage collector frees (and with it the VBAR).
            module = reference()
            if runner.undone:  # called through a reference kept from before undo
                return module.forward(*args, **kwargs)
            return runner.call(module.forward, is_root, args, kwargs)
        entered = 0
        try:
            for block in blocks:
                before(block)
                entered += 1
            for entries, key, block, index in assign:
                entries[key] = block.views[index]
            try:
                output = target(reference(), *args, **kwargs)
            finally:
                for entries, key, placeholder in restore:
                    entries[key] = placeholder
            return owned(output, blocks)
        finally:
            for block in blocks if entered == count else blocks[:entered]:
                release(block)

    try:
        forward.__signature__ = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to give (a builtin's)
        pass
    forward.__name__ = "forward"
    forward.__qualname__ = f"{type(module).__qualname__}.forward"
    forward.__doc__ = getattr(module.forward, "__doc__", None)
    forward.__aimdo_runner__ = runner
    return forward, previous


def offloaded_by(module: torch.nn.Module):
    """The Runner of the offload `module` is part of, or None."""
    return getattr(module.__dict__.get("forward"), "__aimdo_runner__", None)
