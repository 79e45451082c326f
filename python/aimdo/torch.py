"""PyTorch integration: tensor views of allocations, a budget-aware CUDA allocator, and
``offload(module, device)``, which runs a model larger than a device's budget layer by
layer, in place.

Needs PyTorch (``pip install 'aimdo[torch]'``); ``import aimdo`` alone does not.

- ``as_tensor(allocation, dtype, shape)`` views an allocation's memory in place: a CUDA
  tensor on the cuda backend, a CPU tensor over host memory on a simulator with
  ``real_bytes=True``. A view is valid only between a successful fault of the allocation
  and the matching unpin: after the unpin its pages may be unmapped at any moment.
- ``use_allocator(manager)`` routes PyTorch's CUDA allocations through the Manager:
  each one first makes room on its device by evicting VBAR pages. Call it before PyTorch
  allocates any CUDA memory.
- ``offload(module, device)`` makes ``module`` itself run on ``device`` with its weights
  on the host, streamed through one VBAR; it returns an ``Offload``, whose ``undo()``
  puts the module back as it was. See Offload.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref

import torch

from . import _core
from ._default import get_manager
from ._manager import Manager
from ._placement import place, spread_order
from ._schedule import DEFAULT_STAGING_BYTES, ForwardStats, Schedule, auto_staging_bytes
from ._sizes import parse_size
from ._torch_host import HostWeights
from ._torch_layout import Binding, lay_out
from ._torch_offload import _ABSENT, Runner, _TorchExecutor, make_forward, offloaded_by
from ._torch_views import as_tensor
from .sim import SimBackend

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "ForwardStats",
    "Offload",
    "OffloadGroup",
    "as_tensor",
    "offload",
    "offload_group",
    "spread_order",
    "use_allocator",
]


_allocator_lock = threading.Lock()
_allocator_installed = False  # aimdo's allocator is PyTorch's current one


def use_allocator(manager: Manager | None = None) -> None:
    """Route PyTorch's CUDA allocations through ``manager`` (default: aimdo's default
    Manager): before each allocation, VBAR pages on that device are evicted as the
    budget needs (design.md §3.7); frees are found by pointer from any thread.

    PyTorch can only swap its allocator before it has allocated CUDA memory: call this
    first thing. Calling it again switches the Manager behind the allocator (allocations
    made so far are freed through the Manager that made them only if it is the same one).
    While a Manager serves the allocator it cannot be closed; aimdo closes it at exit.
    Errors: aimdo.AimdoError when called too late or without CUDA."""
    global _allocator_installed
    manager = manager if manager is not None else get_manager()
    if manager.backend_name != "cuda":
        raise _core.AimdoError(
            "use_allocator routes PyTorch's CUDA memory: it needs a Manager "
            "on the cuda backend (on the simulator use Manager.external_alloc)"
        )
    if not torch.cuda.is_available():
        raise _core.AimdoError("use_allocator: this PyTorch has no CUDA")
    with _allocator_lock:
        if _allocator_installed:
            _core.set_allocator_manager(manager._core)
            return
        allocator = torch.cuda.memory.CUDAPluggableAllocator(
            _core.__file__, "aimdo_torch_alloc", "aimdo_torch_free"
        )
        _core.set_allocator_manager(manager._core)
        try:
            torch.cuda.memory.change_current_allocator(allocator)
        except RuntimeError as error:
            _core.set_allocator_manager(None)
            raise _core.AimdoError(
                "PyTorch already allocated CUDA memory with its own allocator, which it cannot "
                "swap afterwards: call aimdo.torch.use_allocator() before creating any CUDA "
                f"tensor (PyTorch said: {error})"
            ) from error
        _allocator_installed = True


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
    each (``staging_bytes``: held now). ``last_stats`` tells what the last forward did.

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
    ):
        backend = manager.backend
        sim = backend if isinstance(backend, SimBackend) else None
        self.device = torch.device("cpu") if sim else torch.device("cuda", device)
        blocks, bindings = lay_out(module, options["whole"], self.device)
        declared = _declared_order(options["order"], bindings)
        self._blocks = blocks
        self._module = weakref.ref(module)
        # A group's other members copy from the leader's host chunks (one host copy).
        self._host = HostWeights(blocks, pin=sim is None) if leader is None else _SharedHost(blocks)
        self._installed = []  # (module reference, its forward before, binding)
        self._runner = self._executor = None
        self._apart = False  # taken apart for good (undo completed)
        self._in_group = False  # a member of an OffloadGroup: undone with the group only
        self.vbar = None
        try:
            listed = set(declared)
            placed = declared + [block for block in blocks if block not in listed]
            self.vbar = place(manager, device, placed, options["spread"], rotation)
            if leader is None:
                self._host.move_in()
            else:
                for own, theirs in zip(blocks, leader._blocks, strict=True):
                    own.runs = theirs.runs
            prefetch = options["prefetch"]
            stream = torch.cuda.Stream(device=self.device) if sim is None and prefetch else None
            staging = options["staging_bytes"]
            if staging is None:
                sizes = [block.nbytes for block in blocks]
                staging = auto_staging_bytes(sizes, prefetch, manager.budget_bytes(device))
            self._executor = _TorchExecutor(self.device, stream, device, backend)
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
            self._install(module, bindings)
        except BaseException:
            self._take_apart()
            raise

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
        if self._runner is not None:
            self._runner.schedule.drop_staging()
        for block in self._blocks:
            block.page_storage = block.page_views = block.in_pages = None
            block.unbind()
        self._host.give_back()
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
    def last_stats(self) -> ForwardStats:
        """What the last forward (or submodule called on its own) did."""
        return self._runner.last_stats

    @property
    def pinned_bytes(self) -> int:
        """Bytes of host memory this offload holds for the weights (pinned on CUDA; on a
        simulator plain memory, counted the same). Weights already pinned, used in place,
        are not counted. 0 once undone."""
        return self._host.pinned_bytes

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


def _declared_order(order, bindings) -> list:
    """The blocks of the modules `order` lists, in that order."""
    if order is None:
        return []
    own = {id(module): binding.own for module, binding in bindings if binding.own is not None}
    declared, seen = [], set()
    for module in order:
        block = own.get(id(module))
        if block is None:
            raise ValueError(
                "order lists a module that is not part of the offloaded "
                "module, or that has no weights of its own"
            )
        if block in seen:
            raise ValueError(f"order lists {block.name or 'a module'} twice")
        declared.append(block)
        seen.add(block)
    return declared


def _check_options(module, manager: Manager, device, options: dict) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"offload takes a torch.nn.Module, not {type(module).__name__}")
    prefetch = options["prefetch"]
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
    if not isinstance(options["spread"], bool):
        raise TypeError(f"spread must be a bool, got {options['spread']!r}")
    if not all(isinstance(w, (type, torch.nn.Module)) for w in options["whole"]):
        raise TypeError("whole must list module classes or modules")
    sim = manager.backend if isinstance(manager.backend, SimBackend) else None
    if sim is not None and not sim.real_bytes:
        raise _core.InvalidStateError("offload on a simulator needs SimBackend(real_bytes=True)")
    if device not in manager.devices:
        raise _core.DeviceNotInitializedError(
            f"device {device} is not initialized in this Manager (devices {manager.devices})"
        )
    for name, member in module.named_modules():
        if offloaded_by(member) is not None:
            raise _core.InvalidStateError(
                f"{name or 'the module'} is offloaded already: undo that offload first, "
                "or offload a copy of the model"
            )


def offload(
    module: torch.nn.Module,
    device: int,
    *,
    manager: Manager | None = None,
    prefetch: int = 2,
    order=None,
    spread: bool = True,
    staging_bytes: int | str | None = None,
    whole=(torch.nn.MultiheadAttention,),
) -> Offload:
    """Make ``module`` run on ``device`` with its weights streamed through aimdo, in place
    (see Offload); returns the Offload, whose ``undo()`` puts it back.

    ``manager`` defaults to aimdo's default Manager. ``order``, a sequence of ``module``'s
    submodules, declares the order their weights are used (by default it is learned on the
    first forward, and blocks are placed in registration order). ``spread`` (default True)
    interleaves the placement so the blocks that stay resident are spread over the
    forward; False places them in order, the first ones resident longest. Either way
    blocks under 1 MiB (norms, biases) are placed first, so they stay resident.
    ``prefetch`` (default 2) is how many copies are kept in flight ahead of the compute:
    more hides the copies of weights whose compute is short (Qwen-Image's modulation
    layers) at the cost of staging memory; measured on an H200 (benchmarks/RESULTS.md).
    ``staging_bytes`` (bytes or a size string) caps the staging buffers together; by
    default, enough for ``prefetch + 1`` buffers of the largest block, within 256 MiB or
    1/24 of the device's budget, whichever is more (``auto_staging_bytes``).
    ``whole`` lists module classes or modules offloaded as one block with their
    submodules, for modules that read a submodule's weights without calling it (as
    torch.nn.MultiheadAttention reads out_proj's).

    Errors, before anything changes: TypeError and ValueError for bad arguments or weights
    offload cannot move (on the host, dense, plain tensors); aimdo.InvalidStateError for a
    module offloaded already, or a simulator without real bytes;
    aimdo.DeviceNotInitializedError. Later failures (out of memory for the VBAR or the
    host chunks) undo what was done before they are raised."""
    manager = manager if manager is not None else get_manager()
    options = {
        "prefetch": prefetch,
        "order": None if order is None else list(order),
        "spread": spread,
        "staging_bytes": None if staging_bytes is None else parse_size(staging_bytes),
        "whole": tuple(whole),
    }
    _check_options(module, manager, device, options)
    return Offload(module, device, manager, options)


class OffloadGroup:
    """One model offloaded to several devices: what ``offload_group`` returns.

    ``modules[i]`` runs on ``devices[i]``: the first is the model itself, the others are
    copies of its module structure that share its weight tensors (one host copy for all).
    Call each from its own thread (a thread per device, as a guidance split does); each is
    an Offload of its own (``offloads[i]``). Each device's VBAR places the blocks in the
    same spread order, rotated by i/N, so that what one keeps resident complements what
    the others keep; a block missing on one device is copied from another device's pages
    when they hold it and the driver gives peer access (NVLink), else from the host
    (``last_stats[i].bytes_from_peers``). ``undo()`` puts the model back and frees it all."""

    def __init__(self, devices: list[int], offloads: list[Offload], modules: list):
        self.devices = devices
        self.offloads = offloads
        self.modules = modules

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, index: int):
        return self.modules[index]

    @property
    def last_stats(self) -> list[ForwardStats]:
        return [offload.last_stats for offload in self.offloads]

    @property
    def pinned_bytes(self) -> int:
        return sum(offload.pinned_bytes for offload in self.offloads)

    def fill(self, index: int) -> int:
        """Fill member ``index``'s pages without computing (see Offload.fill): a donor
        filled again after pressure took its pages. Returns the bytes copied."""
        return self.offloads[index].fill()

    def undo(self) -> None:
        """Undo every member, the copies first and the model last (its host chunks go
        with it), once no member runs: each member's lock is taken first, so no device
        copies from pages being freed. aimdo.InvalidStateError while a member runs
        (nothing changed); a DriverError from closing a VBAR after the modules are back
        (call again to retry what is left). A second call does nothing."""
        live = [offload for offload in self.offloads if not offload._apart]
        taken = []
        try:
            for offload in live:
                if not offload._runner.lock.acquire(blocking=False):
                    raise _core.InvalidStateError(
                        "cannot undo an offload group while one of its modules runs"
                    )
                taken.append(offload)
            failure = None
            for offload in reversed(live):
                try:
                    offload._undo_locked()
                except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                    failure = failure or error
            if failure is not None:
                raise failure
        finally:
            for offload in taken:
                offload._runner.lock.release()

    def __enter__(self) -> OffloadGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<aimdo.torch.OffloadGroup on devices {self.devices}>"


def offload_group(
    module: torch.nn.Module,
    devices,
    *,
    manager: Manager | None = None,
    prefetch: int = 2,
    spread: bool = True,
    staging_bytes: int | str | None = None,
    whole=(torch.nn.MultiheadAttention,),
    peers: bool = True,
    donors=(),
) -> OffloadGroup:
    """Offload ``module`` to each of ``devices`` (see OffloadGroup), sharing one host copy
    of its weights. ``peers`` (default True) lets a device copy a block from another
    device's resident pages where the driver allows peer access (``Manager.peer_link``);
    False copies from the host only. ``donors`` lists devices of the group that hold
    weights for the others without computing: each is filled at once (``Offload.fill``)
    with the blocks its rotated placement keeps first, which are those the first device
    keeps last (donor mode: one GPU computes, another's memory holds what does not fit).
    Other options as ``offload``, for every member.
    Errors as ``offload``, before anything changes, plus ValueError for fewer than one or
    repeated devices, or donors that are not the group's or leave none to compute; a
    failure part way undoes the members made."""
    manager = manager if manager is not None else get_manager()
    devices = list(devices)
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"offload_group needs distinct devices, got {devices!r}")
    donors = list(donors)
    if any(donor not in devices for donor in donors) or len(set(donors)) >= len(devices):
        raise ValueError(
            f"donors must be some of the group's devices {devices!r}, leaving one to "
            f"compute; got {donors!r}"
        )
    options = {
        "prefetch": prefetch,
        "order": None,
        "spread": spread,
        "staging_bytes": None if staging_bytes is None else parse_size(staging_bytes),
        "whole": tuple(whole),
    }
    for device in devices:
        _check_options(module, manager, device, options)
    for donor in donors:
        readers = [d for d in devices if d not in donors]
        if not peers or not any(manager.peer_link(d, donor).access for d in readers):
            raise ValueError(
                f"donor {donor} would serve no one: it serves only over peer access "
                f"(peers={peers}; see Manager.peer_link)"
            )
    shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    modules = [module] + [copy.deepcopy(module, dict(shared)) for _ in devices[1:]]
    offloads: list[Offload] = []
    try:
        for index, (member, device) in enumerate(zip(modules, devices, strict=True)):
            leader = offloads[0] if offloads else None
            offloads.append(Offload(member, device, manager, options, leader, index / len(devices)))
        if peers:
            _link_peers(manager, devices, offloads)
        for donor in donors:
            offloads[devices.index(donor)].fill()
    except BaseException:
        for made in reversed(offloads):
            try:
                made.undo()
            except BaseException:  # noqa: BLE001, S110 - the first failure is the one raised
                pass
        raise
    for offload in offloads:
        offload._in_group = True
    return OffloadGroup(devices, offloads, modules)


def _link_peers(manager: Manager, devices: list[int], offloads: list[Offload]) -> None:
    """Give each block the same block on the devices it can read, and open each VBAR's
    pages to the devices that read them."""
    links = {(a, b): manager.peer_link(a, b) for a in devices for b in devices if a != b}
    for offload, device in zip(offloads, devices, strict=True):
        # Nearest first: the driver's performance rank (lower is better), then list order.
        ranked = sorted(
            (
                (links[(device, peer_device)].performance_rank, index, other)
                for index, (other, peer_device) in enumerate(zip(offloads, devices, strict=True))
                if peer_device != device and links[(device, peer_device)].access
            ),
            key=lambda entry: entry[:2],
        )
        others = [other for _, _, other in ranked]
        for other in others:
            other.vbar.share_with(device)
        for index, block in enumerate(offload._blocks):
            block.peers = tuple(other._blocks[index] for other in others)
