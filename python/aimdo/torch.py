"""PyTorch integration: tensor views of allocations, a budget-aware CUDA allocator, and
``offload(module)``, which runs a model larger than a device's budget layer by layer.

Needs PyTorch (``pip install 'aimdo[torch]'``); ``import aimdo`` alone does not.

- ``as_tensor(allocation, dtype, shape)`` views an allocation's memory in place: a CUDA
  tensor on the cuda backend, a CPU tensor over host memory on a simulator with
  ``real_bytes=True``. A view is valid only between a successful fault of the allocation
  and the matching unpin: after the unpin its pages may be unmapped at any moment.
- ``use_allocator(manager)`` routes PyTorch's CUDA allocations through the Manager:
  each one first makes room on its device by evicting VBAR pages. Call it before PyTorch
  allocates any CUDA memory.
- ``offload(module, device)`` keeps the module's weights on the host and streams them
  through one VBAR on ``device``; see OffloadedModule.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass

import torch

from . import _core
from ._manager import Manager, get_manager
from ._placement import fill_window, spread_order
from .sim import SimBackend, host_view

__all__ = ["as_tensor", "use_allocator", "offload", "OffloadedModule", "ForwardStats", "spread_order"]

_ALIGNMENT = 512  # every tensor of a block starts 512-byte aligned, as PyTorch's do


class _CudaBytes:
    """A CUDA array interface over raw device memory, so torch.as_tensor views it."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


def as_tensor(allocation, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` viewing ``allocation``'s memory in place.

    Valid only between a successful ``Vbar.fault`` of the allocation and the matching
    ``unpin``. On the cuda backend it is a CUDA tensor on the allocation's device; on a
    simulator with ``real_bytes=True`` a CPU tensor. ValueError when the shape does not
    fit the allocation; aimdo.InvalidStateError when its pages are not mapped;
    aimdo.DriverError on a simulator in a child made by fork(), whose driver is not
    initialized (a CUDA tensor cannot be used there either)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {type(dtype).__name__}")
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes > allocation.size:
        raise ValueError(f"{shape} of {dtype} is {nbytes} bytes; the allocation has {allocation.size}")
    driver = allocation.vbar.driver
    if driver.backend_name == "sim":
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        view = host_view(driver, allocation.address, nbytes, "aimdo.torch.as_tensor")
        raw = torch.frombuffer(view, dtype=torch.uint8)
    else:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=f"cuda:{allocation.device}")
        try:
            raw = torch.as_tensor(_CudaBytes(allocation.address, nbytes))
        except RuntimeError as error:  # PyTorch checks the pointer: not mapped yet
            raise _core.InvalidStateError(
                f"allocation at {allocation.address:#x} is not mapped: fault it first ({error})"
            ) from error
        if raw.device.type != "cuda" or raw.device.index != allocation.device:
            raise _core.InvalidStateError(
                f"allocation at {allocation.address:#x} did not resolve to cuda:{allocation.device}")
    return raw.view(dtype).view(shape)


_allocator_lock = threading.Lock()
_allocator_installed = False  # aimdo's allocator is PyTorch's current one


def use_allocator(manager: Manager | None = None) -> None:
    """Route PyTorch's CUDA allocations through ``manager`` (default: aimdo's default
    Manager): before each allocation, VBAR pages on that device are evicted as the
    budget needs (DESIGN §3.6); frees are found by pointer from any thread.

    PyTorch can only swap its allocator before it has allocated CUDA memory: call this
    first thing. Calling it again switches the Manager behind the allocator (allocations
    made so far are freed through the Manager that made them only if it is the same one).
    While a Manager serves the allocator it cannot be closed; aimdo closes it at exit.
    Errors: aimdo.AimdoError when called too late or without CUDA."""
    global _allocator_installed
    manager = manager if manager is not None else get_manager()
    if manager.backend_name != "cuda":
        raise _core.AimdoError("use_allocator routes PyTorch's CUDA memory: it needs a Manager "
                               "on the cuda backend (on the simulator use Manager.external_alloc)")
    if not torch.cuda.is_available():
        raise _core.AimdoError("use_allocator: this PyTorch has no CUDA")
    with _allocator_lock:
        if _allocator_installed:
            _core.set_allocator_manager(manager._core)
            return
        allocator = torch.cuda.memory.CUDAPluggableAllocator(
            _core.__file__, "aimdo_torch_alloc", "aimdo_torch_free")
        _core.set_allocator_manager(manager._core)
        try:
            torch.cuda.memory.change_current_allocator(allocator)
        except RuntimeError as error:
            _core.set_allocator_manager(None)
            raise _core.AimdoError(
                "PyTorch already allocated CUDA memory with its own allocator, which it cannot "
                "swap afterwards: call aimdo.torch.use_allocator() before creating any CUDA "
                f"tensor (PyTorch said: {error})") from error
        _allocator_installed = True


@dataclass
class ForwardStats:
    """What one forward of an OffloadedModule did."""

    layers: int = 0          # blocks of weights faulted (modules with their own weights)
    hits: int = 0            # found resident and intact: no copy
    copied_layers: int = 0   # (re)mapped pages: weights copied in from the host
    offloaded_layers: int = 0  # above the watermark: streamed through a temporary buffer
    bytes_copied: int = 0


class _Block:
    """The weights of one module (its own parameters and buffers, not its children's),
    laid out 512-byte aligned in one allocation."""

    def __init__(self, module: torch.nn.Module, entries, host):
        self.module = module
        self.entries = []  # (kind, name, host tensor, offset)
        offset = 0
        for kind, name, key in entries:
            tensor = host[key]
            offset = (offset + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT
            self.entries.append((kind, name, tensor, offset))
            offset += tensor.numel() * tensor.element_size()
        self.nbytes = max(offset, 1)
        self.allocation = None
        self.signature = None
        self.storage = None   # uint8 tensor this forward's weights live in
        self.pinned = False
        self.event = None     # copy-stream event to wait for (CUDA prefetch)
        self.slot = None      # the staging buffer holding an offloaded block's weights
        self.queued = False   # loaded ahead with a copy queued, not used yet
        self.offloaded = False  # its last fault said offloaded
        self.resident = False   # its last fault found its weights in place

    @property
    def loaded(self) -> bool:
        return self.storage is not None


class _Slot:
    """A staging buffer for offloaded weights, reused within a forward. `free` is the
    compute-stream event after which its last user is done with it."""

    def __init__(self, tensor: torch.Tensor, free):
        self.tensor = tensor
        self.free = free


_host_stores: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_host_lock = threading.Lock()


def _host_store(module: torch.nn.Module, pin: bool) -> dict:
    """The module's weights on the host, by id of the original tensor; shared by every
    offload of the same module (pinned once when CUDA copies will read them), and made
    again when a weight has changed since (PyTorch's version counter moved)."""
    tensors = list(module.parameters()) + list(module.buffers())
    versions = tuple(t._version for t in tensors)
    with _host_lock:
        cached = _host_stores.get(module)
        if cached is not None and cached[0] == versions and (cached[2] or not pin):
            return cached[1]
        store = {}
        for tensor in tensors:
            # Weights already on the host (and pinned, where that is wanted) are used as
            # they are: a model larger than the GPU is often larger than half the RAM.
            host = tensor.detach()
            if host.device.type != "cpu":
                host = host.to("cpu")
            if pin and not host.is_pinned():
                host = host.pin_memory()
            store[id(tensor)] = host
        _host_stores[module] = (versions, store, pin)
        return store


class OffloadedModule(torch.nn.Module):
    """A module whose weights stay on the host and reach ``device`` through one VBAR.

    Each module with weights of its own is a block: one allocation in the VBAR. Before a
    block's module runs, its allocation is faulted: a signature equal to the last one
    means the weights are still there (no copy); a new one means they are copied in from
    the host; None means offloaded, and they go through a staging buffer. After the
    module runs, the allocation is unpinned.

    Placement: every block is placed when the module is offloaded, in ``order`` (the
    modules' registration order when not declared, with undeclared ones after the
    declared), spread (see ``spread_order``) unless ``spread=False``: the lowest offsets stay
    resident longest, and spreading them puts the offloaded blocks between resident
    ones, where their copies can overlap the compute of the blocks before them.

    Prefetch (``prefetch=k``, k > 0): from the second forward on (the first learns the
    order the blocks run in; a declared ``order`` is used from the first), while a block
    computes, the blocks after it are faulted and their copies queued until k copies are
    in flight ahead of it, looking at most 8k blocks ahead (blocks found resident at
    their last fault are left to their turn). On CUDA the copies run on a
    copy stream, ordered by events; offloaded weights are staged in k + 1 buffers reused
    within the forward (each as large as the largest block it has staged), each reused only
    after the compute that read it.

    The wrapped module is not changed: this runs a replica of it whose weights are bound
    to those views only while each module runs. Outputs equal the module's own, bit for
    bit. Inference only. Weights already in (pinned, on CUDA) host memory are used in
    place, others are copied when ``offload`` is called; after changing weights, offload
    the module again (layers found resident would otherwise keep the old values).
    ``last_stats`` tells what the last forward did. One forward at a time per
    OffloadedModule; offload the same module to two devices to run two at once.
    """

    def __init__(self, module: torch.nn.Module, device: int, manager: Manager, prefetch: int,
                 order=None, spread: bool = True):
        super().__init__()
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
        if not isinstance(spread, bool):
            raise TypeError(f"spread must be a bool, got {spread!r}")
        backend = manager.backend
        self._manager = manager
        self._device_index = device
        self._sim = backend if isinstance(backend, SimBackend) else None
        if self._sim is not None and not self._sim.real_bytes:
            raise _core.InvalidStateError("offload on a simulator needs SimBackend(real_bytes=True)")
        self._torch_device = torch.device("cpu") if self._sim else torch.device("cuda", device)
        host = _host_store(module, pin=self._sim is None)
        tensors = list(module.parameters()) + list(module.buffers())
        placeholders = {}
        for tensor in tensors:
            empty = torch.empty(0, dtype=tensor.dtype)
            placeholders[id(tensor)] = (torch.nn.Parameter(empty, requires_grad=False)
                                        if isinstance(tensor, torch.nn.Parameter) else empty)
        # A replica whose weights are placeholders: deepcopy maps each weight to its one.
        memo = {key: value for key, value in placeholders.items()}
        self._replica = copy.deepcopy(module, memo)
        self._blocks = []
        by_original = {}
        names = {id(m): name for name, m in module.named_modules()}
        for original, replica in zip(module.modules(), self._replica.modules()):
            entries = [("p", name, id(t)) for name, t in original._parameters.items() if t is not None]
            entries += [("b", name, id(t)) for name, t in original._buffers.items() if t is not None]
            if not entries:
                continue
            block = _Block(replica, entries, host)
            block.name = names.get(id(original), "")
            self._blocks.append(block)
            by_original[id(original)] = block
            # The hooks live in the replica, which this object owns: a weak reference back
            # keeps that from being a cycle only the garbage collector could free.
            owner = weakref.ref(self)
            replica.register_forward_pre_hook(lambda m, args, b=block: owner()._before(b))
            replica.register_forward_hook(lambda m, args, out, b=block: owner()._after(b, out))
        self.prefetch = prefetch
        self._order = []          # blocks in the order they run: declared, else learned
        self._position = {}
        self._learning = True
        if order is not None:
            # Declared: prefetch follows it from the first forward on. Modules left out are
            # appended where they are first used.
            for declared in order:
                block = by_original.get(id(declared))
                if block is None:
                    raise ValueError("order lists a module that is not part of the offloaded "
                                     "module, or that has no weights of its own")
                if block in self._position:
                    raise ValueError(f"order lists {block.name or 'a module'} twice")
                self._position[block] = len(self._order)
                self._order.append(block)
            self._learning = False
        placed = self._order + [b for b in self._blocks if b not in self._position]
        if spread:
            placed = spread_order(placed)
        total = sum((b.nbytes + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT for b in self._blocks)
        self.vbar = manager.create_vbar(max(total, 1), device)
        try:
            for block in placed:
                block.allocation = self.vbar.alloc(block.nbytes)
        except BaseException:
            self.vbar.close()
            raise
        self._copy_stream = None
        if self._sim is None and prefetch:
            self._copy_stream = torch.cuda.Stream(device=self._torch_device)
        self._slots = []          # staging buffers of this forward (prefetch)
        self._free_slots = []     # oldest released first
        self._horizon = 0         # position of the first block not loaded ahead yet
        self.last_stats = ForwardStats()
        self._stats = ForwardStats()

    # -- one forward ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._stats = ForwardStats()
        self._horizon = 0
        try:
            with torch.no_grad():
                if self._sim is None:
                    with torch.cuda.device(self._torch_device):
                        return self._replica(*args, **kwargs)
                return self._replica(*args, **kwargs)
        finally:
            # Blocks prefetched but never run, or left loaded by an exception: let each go,
            # whatever the others do, and report the first failure.
            failure = None
            for block in self._blocks:
                if block.storage is not None or block.pinned:
                    try:
                        self._release(block)
                    except BaseException as error:  # reported after the others are released
                        failure = failure or error
            # Every copy into a staging buffer was waited for by the compute stream or
            # synchronized by _release: freeing them on the compute stream is ordered.
            self._slots, self._free_slots = [], []
            if self._learning and self._order:
                self._learning = False
            self.last_stats = self._stats
            if failure is not None:
                raise failure

    def _before(self, block: _Block) -> None:
        if block not in self._position:
            self._position[block] = len(self._order)
            self._order.append(block)
        self._load(block, ahead=False)
        block.queued = False
        if block.event is not None:
            torch.cuda.current_stream(self._torch_device).wait_event(block.event)
            block.event = None
        if not self._learning and self.prefetch:
            self._prefetch_after(block)
        for kind, name, tensor, offset in block.entries:
            nbytes = tensor.numel() * tensor.element_size()
            view = block.storage[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            if kind == "p":
                block.module._parameters[name] = view
            else:
                block.module._buffers[name] = view

    def _prefetch_after(self, block: _Block) -> None:
        """Load the blocks after `block` until `prefetch` copies are queued ahead of it."""
        self._horizon = fill_window(self._order, self._position[block], self._horizon, self.prefetch,
                                    lambda ahead: self._load(ahead, ahead=True))

    def placement(self) -> list[tuple[str, int, int]]:
        """(module name, offset in the VBAR, bytes) of every block, by offset."""
        placed = [(b.name, b.allocation.offset, b.allocation.size) for b in self._blocks]
        return sorted(placed, key=lambda entry: entry[1])

    def _after(self, block: _Block, output):
        """Unpin the block; an output that is a view of its weights (a module returning a
        slice of its own buffer) is copied first, since the pages may go at the unpin."""
        start = block.storage.data_ptr()
        end = start + block.storage.numel()

        def own(value):
            if isinstance(value, torch.Tensor):
                pointer = value.untyped_storage().data_ptr()
                return value.clone() if start <= pointer < end else value
            if isinstance(value, tuple):
                return type(value)(own(v) for v in value) if not hasattr(value, "_fields") \
                    else type(value)(*(own(v) for v in value))
            if isinstance(value, list):
                return [own(v) for v in value]
            if isinstance(value, dict):
                return {k: own(v) for k, v in value.items()}
            return value

        output = own(output)
        self._release(block)
        return output

    def _slot_obtainable(self) -> bool:
        return bool(self._free_slots) or len(self._slots) <= self.prefetch

    def _take_slot(self, nbytes: int):
        """A staging buffer of at least `nbytes`: the one released first (its compute is
        the earliest done), grown if too small; a new one while fewer than prefetch + 1
        exist; None if all are in use."""
        if self._free_slots:
            slot = self._free_slots.pop(0)
            if slot.tensor.numel() >= nbytes:
                return slot
            self._slots.remove(slot)  # too small: replaced by a bigger one below
        elif len(self._slots) > self.prefetch:
            return None
        # Made on the compute stream: the event covers the allocator's reuse of memory
        # that compute work queued before this point may still use.
        tensor = torch.empty(nbytes, dtype=torch.uint8, device=self._torch_device)
        made = None
        if self._sim is None:
            made = torch.cuda.Event()
            made.record(torch.cuda.current_stream(self._torch_device))
        slot = _Slot(tensor, made)
        self._slots.append(slot)
        return slot

    def _load(self, block: _Block, ahead: bool) -> bool:
        """Fault the block and make its weights current in block.storage. Once the order
        is known (prefetch > 0), offloaded weights go to staging buffers and, on CUDA,
        copies run on the copy stream. Idempotent within a forward. Returns False, with
        nothing changed, when `ahead` and an offloaded block finds no free staging buffer
        (a block offloaded at its last fault is not even faulted then). If anything
        fails, the block is let go (unpinned) and its signature forgotten, so that the
        next forward copies again instead of trusting pages that were never written."""
        if block.storage is not None:
            return True
        staging = self.prefetch > 0 and not self._learning
        stream = self._copy_stream if staging else None
        if ahead and staging and block.offloaded and not self._slot_obtainable():
            return False
        signature = self.vbar.fault(block.allocation)
        block.pinned = signature is not None
        block.offloaded = signature is None
        block.resident = False  # until it is known to be
        stats = self._stats
        try:
            slot = None
            if signature is None:
                if staging:
                    slot = self._take_slot(block.nbytes)
                    if slot is None and ahead:
                        return False
                    block.slot = slot
                stats.offloaded_layers += 1
                if slot is not None:
                    storage = slot.tensor[:block.nbytes]
                else:
                    # Allocated on the compute stream, where it is used and freed: a copy
                    # on the copy stream waits for that stream before writing into it.
                    storage = torch.empty(block.nbytes, dtype=torch.uint8, device=self._torch_device)
                block.signature = None
                copy_in = True
            else:
                storage = as_tensor(block.allocation, torch.uint8, (block.nbytes,))
                copy_in = signature != block.signature
                block.signature = None  # until the copy is queued
                if copy_in:
                    stats.copied_layers += 1
                else:
                    stats.hits += 1
            stats.layers += 1
            block.resident = not copy_in
            block.storage = storage
            if copy_in:
                stats.bytes_copied += block.nbytes
                if stream is not None:
                    compute = torch.cuda.current_stream(self._torch_device)
                    with torch.cuda.stream(stream):
                        if slot is not None:
                            stream.wait_event(slot.free)
                        elif signature is None:
                            stream.wait_stream(compute)
                        # Pages just mapped need no wait: an eviction synchronizes the
                        # device before it unmaps, so nothing queued reads them.
                        self._copy(block, storage)
                        block.event = torch.cuda.Event()
                        block.event.record(stream)
                else:
                    self._copy(block, storage)
                block.queued = ahead
            block.signature = signature
            return True
        except BaseException:
            block.signature = None
            if stream is not None:
                # Part of the copy may be queued with no event yet: let it finish before
                # its buffer can be reused.
                stream.synchronize()
            self._release(block)
            raise

    @staticmethod
    def _copy(block: _Block, storage: torch.Tensor) -> None:
        for _, _, tensor, offset in block.entries:
            nbytes = tensor.numel() * tensor.element_size()
            destination = storage[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            destination.copy_(tensor, non_blocking=True)

    def _release(self, block: _Block) -> None:
        """Unbind the block's weights, give back its staging buffer and drop its pin (if
        it holds one)."""
        for kind, name, tensor, _ in block.entries:
            empty = torch.empty(0, dtype=tensor.dtype)
            if kind == "p":
                block.module._parameters[name] = torch.nn.Parameter(empty, requires_grad=False)
            else:
                block.module._buffers[name] = empty
        if block.event is not None:  # prefetched, never used: the copy must finish first
            block.event.synchronize()
            block.event = None
        block.queued = False
        slot, block.slot = block.slot, None
        if slot is not None:
            if self._sim is None:
                slot.free = torch.cuda.Event()
                slot.free.record(torch.cuda.current_stream(self._torch_device))
            self._free_slots.append(slot)
        pinned, block.pinned, block.storage = block.pinned, False, None
        if pinned:
            self.vbar.unpin(block.allocation)


def offload(module: torch.nn.Module, device: int, *, manager: Manager | None = None,
            prefetch: int = 1, order=None, spread: bool = True) -> OffloadedModule:
    """Run ``module`` on ``device`` with its weights streamed through aimdo (see
    OffloadedModule). ``manager`` defaults to aimdo's default Manager. ``order``, a
    sequence of ``module``'s submodules, declares the order their weights are used (by
    default it is learned on the first forward, and blocks are placed in registration
    order). ``spread`` (default True) interleaves the placement so the blocks that stay
    resident are spread over the forward; False places them in order, the first ones
    resident longest."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"offload takes a torch.nn.Module, not {type(module).__name__}")
    manager = manager if manager is not None else get_manager()
    return OffloadedModule(module, device, manager, prefetch, order, spread)
