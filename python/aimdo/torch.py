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

import torch

from . import _core
from ._default import get_manager
from ._manager import Manager
from ._placement import place, spread_order
from ._schedule import IN_LINE, PAGES, TEMPORARY, Block, Executor, ForwardStats, Schedule
from .sim import SimBackend, host_view

__all__ = [
    "ForwardStats",
    "OffloadedModule",
    "as_tensor",
    "offload",
    "spread_order",
    "use_allocator",
]


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
        raise ValueError(
            f"{shape} of {dtype} is {nbytes} bytes; the allocation has {allocation.size}"
        )
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
                f"allocation at {allocation.address:#x} did not resolve to cuda:{allocation.device}"
            )
    return raw.view(dtype).view(shape)


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


# Every tensor of a block starts at a multiple of this offset inside the block's allocation,
# as PyTorch's caching allocator aligns the tensors it hands out, so that kernels see the
# alignment they would see on the plain module. It is PyTorch's alignment, not the VBAR's
# (which places whole allocations): the offsets give aligned addresses only because every
# allocation starts at least as aligned, which the assertion checks.
_TENSOR_ALIGNMENT_BYTES = 512
assert _core.ALLOCATION_ALIGNMENT_BYTES % _TENSOR_ALIGNMENT_BYTES == 0


class _Block(Block):
    """The weights of one module (its own parameters and buffers, not its children's),
    laid out in one allocation. Its parameters are views of `storage` between bind() and
    unbind(), placeholders otherwise."""

    def __init__(self, module: torch.nn.Module, name: str, entries, host):
        self.module = module
        self.name = name
        self.entries = []  # (kind, name, host tensor, offset)
        offset = 0
        for kind, entry_name, key in entries:
            tensor = host[key]
            align = _TENSOR_ALIGNMENT_BYTES
            offset = (offset + align - 1) // align * align
            self.entries.append((kind, entry_name, tensor, offset))
            offset += tensor.numel() * tensor.element_size()
        super().__init__(max(offset, 1))

    def bind(self) -> None:
        for kind, name, tensor, offset in self.entries:
            nbytes = tensor.numel() * tensor.element_size()
            view = self.storage[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            if kind == "p":
                self.module._parameters[name] = view
            else:
                self.module._buffers[name] = view

    def unbind(self) -> None:
        for kind, name, tensor, _ in self.entries:
            empty = torch.empty(0, dtype=tensor.dtype)
            if kind == "p":
                self.module._parameters[name] = torch.nn.Parameter(empty, requires_grad=False)
            else:
                self.module._buffers[name] = empty


class _TorchExecutor(Executor):
    """The schedule on PyTorch tensors. On CUDA the compute engine is the current stream,
    the copy engine a stream of this module's own (made when prefetch > 0), and tokens are
    CUDA events. On a simulator with real bytes everything is CPU work, done in line when
    queued: there is no copy stream and no token.

    - a staging buffer is a uint8 tensor; a block's weights are a uint8 tensor (a view of
      its pages, of a staging buffer, or a temporary one), holding each of its tensors at
      its offset;
    - IN_LINE: the copy runs on the compute stream, so the compute needs no event.
    """

    def __init__(self, device: torch.device, copy_stream):
        self._device = device
        self._copy_stream = copy_stream

    def new_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self._device)

    def compute_point(self):
        # After a new buffer, this event also covers the allocator's reuse of memory that
        # compute work queued before it may still read.
        if self._device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        return event

    def destination(self, block: _Block, into) -> torch.Tensor:
        if into is PAGES:
            return as_tensor(block.allocation, torch.uint8, (block.nbytes,))
        if into is TEMPORARY:
            # Allocated on the compute stream, where it is used and freed: a copy on the copy
            # stream waits for that stream before writing into it.
            return torch.empty(block.nbytes, dtype=torch.uint8, device=self._device)
        return into.buffer[: block.nbytes]

    def copy(self, block: _Block, storage: torch.Tensor, after):
        stream = self._copy_stream
        if after is IN_LINE or stream is None:
            self.copy_weights(block, storage)
            return None
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            self.copy_weights(block, storage)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def wait_for(self, token) -> None:
        torch.cuda.current_stream(self._device).wait_event(token)

    def host_wait(self, token) -> None:
        token.synchronize()

    def drain_copies(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    @staticmethod
    def copy_weights(block: _Block, storage: torch.Tensor) -> None:
        """Queue the copies of the block's host tensors into `storage`, on the current
        stream (non-blocking from pinned memory on CUDA; at once on the CPU)."""
        for _, _, tensor, offset in block.entries:
            nbytes = tensor.numel() * tensor.element_size()
            destination = storage[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            destination.copy_(tensor, non_blocking=True)


_host_stores: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()
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


def _declared_order(order, by_original: dict) -> list:
    """The blocks of the modules `order` lists, in that order."""
    declared, seen = [], set()
    for module in order:
        block = by_original.get(id(module))
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
    after the compute that read it. ``aimdo.predict`` runs the same schedule
    (``aimdo._schedule``) on the simulator's engines.

    The wrapped module is not changed: this runs a replica of it whose weights are bound
    to those views only while each module runs. Outputs equal the module's own, bit for
    bit. Inference only. Weights already in (pinned, on CUDA) host memory are used in
    place, others are copied when ``offload`` is called; after changing weights, offload
    the module again (layers found resident would otherwise keep the old values).
    ``last_stats`` tells what the last forward did. One forward at a time per
    OffloadedModule; offload the same module to two devices to run two at once.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: int,
        manager: Manager,
        prefetch: int,
        order=None,
        spread: bool = True,
    ):
        super().__init__()
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
        if not isinstance(spread, bool):
            raise TypeError(f"spread must be a bool, got {spread!r}")
        backend = manager.backend
        sim = backend if isinstance(backend, SimBackend) else None
        if sim is not None and not sim.real_bytes:
            raise _core.InvalidStateError(
                "offload on a simulator needs SimBackend(real_bytes=True)"
            )
        self._manager = manager
        self._device_index = device
        self._torch_device = torch.device("cpu") if sim else torch.device("cuda", device)
        host = _host_store(module, pin=sim is None)
        by_original = self._replicate(module, host)
        # Declared: prefetch follows it from the first forward on. Modules left out are
        # appended where they are first used.
        declared = _declared_order(order, by_original) if order is not None else []
        listed = set(declared)
        placed = declared + [block for block in self._blocks if block not in listed]
        self.vbar = place(manager, device, placed, spread)
        copy_stream = None
        if sim is None and prefetch:
            copy_stream = torch.cuda.Stream(device=self._torch_device)
        executor = _TorchExecutor(self._torch_device, copy_stream)
        self._schedule = Schedule(
            executor, self.vbar, self._blocks, prefetch, declared, learning=order is None
        )
        self.last_stats = ForwardStats()

    def _replicate(self, module: torch.nn.Module, host: dict) -> dict:
        """Make self._replica, a copy of `module` whose weights are placeholders, and
        self._blocks, one per module with weights of its own, hooked to this object.
        Returns the blocks by id of the original module."""
        placeholders = {}
        for tensor in list(module.parameters()) + list(module.buffers()):
            empty = torch.empty(0, dtype=tensor.dtype)
            placeholders[id(tensor)] = (
                torch.nn.Parameter(empty, requires_grad=False)
                if isinstance(tensor, torch.nn.Parameter)
                else empty
            )
        # deepcopy maps each weight to its placeholder.
        self._replica = copy.deepcopy(module, dict(placeholders))
        self._blocks = []
        by_original = {}
        names = {id(m): name for name, m in module.named_modules()}
        # The hooks live in the replica, which this object owns: a weak reference back keeps
        # that from being a cycle only the garbage collector could free.
        owner = weakref.ref(self)
        for original, replica in zip(module.modules(), self._replica.modules(), strict=True):
            entries = [("p", n, id(t)) for n, t in original._parameters.items() if t is not None]
            entries += [("b", n, id(t)) for n, t in original._buffers.items() if t is not None]
            if not entries:
                continue
            block = _Block(replica, names.get(id(original), ""), entries, host)
            self._blocks.append(block)
            by_original[id(original)] = block
            replica.register_forward_pre_hook(lambda m, args, b=block: owner()._before(b))
            replica.register_forward_hook(lambda m, args, out, b=block: owner()._after(b, out))
        return by_original

    @property
    def prefetch(self) -> int:
        """Copies kept in flight ahead of the running block (0: none, no staging)."""
        return self._schedule.prefetch

    def placement(self) -> list[tuple[str, int, int]]:
        """(module name, offset in the VBAR, bytes) of every block, by offset."""
        placed = [(b.name, b.allocation.offset, b.allocation.size) for b in self._blocks]
        return sorted(placed, key=lambda entry: entry[1])

    # -- one forward ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        schedule = self._schedule
        schedule.begin_forward()
        try:
            with torch.no_grad():
                if self._torch_device.type == "cuda":
                    with torch.cuda.device(self._torch_device):
                        return self._replica(*args, **kwargs)
                return self._replica(*args, **kwargs)
        finally:
            try:
                schedule.end_forward()
            finally:
                self.last_stats = schedule.stats

    def _before(self, block: _Block) -> None:
        self._schedule.before(block)
        block.bind()

    def _after(self, block: _Block, output):
        """Release the block; an output that is a view of its weights (a module returning a
        slice of its own buffer) is copied first, since the pages may go at the unpin."""
        start = block.storage.data_ptr()
        end = start + block.storage.numel()

        def own(value):
            if isinstance(value, torch.Tensor):
                pointer = value.untyped_storage().data_ptr()
                return value.clone() if start <= pointer < end else value
            if isinstance(value, tuple):
                if hasattr(value, "_fields"):
                    return type(value)(*(own(v) for v in value))
                return type(value)(own(v) for v in value)
            if isinstance(value, list):
                return [own(v) for v in value]
            if isinstance(value, dict):
                return {k: own(v) for k, v in value.items()}
            return value

        output = own(output)
        self._schedule.release(block)
        return output


def offload(
    module: torch.nn.Module,
    device: int,
    *,
    manager: Manager | None = None,
    prefetch: int = 1,
    order=None,
    spread: bool = True,
) -> OffloadedModule:
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
