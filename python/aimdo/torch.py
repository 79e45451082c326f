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

import threading

import torch

from . import _core, _torch_stream
from ._default import get_manager
from ._manager import Manager
from ._placement import spread_order
from ._schedule import DEFAULT_STAGING_BYTES, ForwardStats
from ._timings import BlockTiming, ForwardTimings
from ._torch_group import OffloadGroup, offload_group
from ._torch_handle import Offload
from ._torch_offload import _TorchExecutor  # noqa: F401 - tests patch its copies through here
from ._torch_options import check_options, offload_options
from ._torch_regime import RUNNABLE as REGIMES
from ._torch_views import as_tensor

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "BlockTiming",
    "ForwardTimings",
    "ForwardStats",
    "Offload",
    "OffloadGroup",
    "REGIMES",
    "as_tensor",
    "offload",
    "offload_group",
    "set_reading_switch_interval",
    "spread_order",
    "use_allocator",
]


def set_reading_switch_interval(seconds: float | None) -> None:
    """Deprecated; does nothing but warn (DeprecationWarning). It lowered the interpreter's
    switch interval while an offload read weights from its checkpoint's files, because a
    Python thread queued the copies of what was read and took the GIL for each piece.
    Those copies are queued by aimdo's native pump now, whose threads never take the GIL
    (design.md §7, host tiers). TypeError or ValueError, as before, for anything but
    positive seconds or None."""
    _torch_stream.set_reading_switch_interval(seconds)


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


def offload(
    module: torch.nn.Module,
    device: int,
    *,
    manager: Manager | None = None,
    prefetch: int | str | None = None,
    order=None,
    spread: bool = True,
    staging_bytes: int | str | None = None,
    whole=(torch.nn.MultiheadAttention,),
    checkpoint=None,
    host_limit="auto",
    host_tiers=None,
    timings: bool = False,
    file_reads: str = "auto",
    keep_first=None,
) -> Offload:
    """Make ``module`` run on ``device`` with its weights streamed through aimdo, in place
    (see Offload); returns the Offload, whose ``undo()`` puts it back.

    ``manager`` defaults to aimdo's default Manager. ``order``, a sequence of ``module``'s
    submodules, declares the order their weights are used (by default it is learned on the
    first forward, and blocks are placed in registration order). ``spread`` (default True)
    interleaves the placement so the blocks that stay resident are spread over the
    forward; False places them in order, the first ones resident longest. Either way
    blocks under 1 MiB (norms, biases) are placed first, so they stay resident.
    ``keep_first``, a sequence of ``module``'s submodules with weights of their own (or
    their names in it), places their weights next, ahead of the rest (spread among
    themselves when ``spread``), so they stay resident longest: weights whose compute is
    short for their bytes (Qwen-Image's modulation layers, applied to one vector; a text
    stream's few tokens), whose copies the compute cannot hide. On Qwen-Image at batch 2
    on an H200 it measured as fast as the default placement, not faster.
    ``prefetch`` is how many copies are kept in flight ahead of the compute (besides those
    of smaller blocks riding in the room a staging buffer has left): more hides
    the copies of weights whose compute is short (Qwen-Image's modulation layers) at the
    cost of staging memory; measured on an H200 (benchmarks/RESULTS.md). The default is
    ``"auto"`` (2 when ``staging_bytes`` is given, which a deeper depth would cut into
    buffers smaller than the blocks; a depth given, from 0, is kept). In one run on an
    H200, Qwen-Image at a 24 GiB budget, batch 2, measured 417.1 ms a step at 2 and
    402.4 ms at the 6 its trials kept; blocks read from a checkpoint's files
    (``host_limit``) need a deeper window still (816 ms at 2, 554 ms at the depth its
    trials found), as such a block is read only once its copy is queued.
    ``prefetch="auto"`` starts at 2, times the compute of each block in the first forward
    whose order is known, predicts a forward at each depth from 1 to 8 on a simulator of
    this machine (its host link measured on CUDA), then tries the predicted depth and deeper
    ones for real, one measured forward each (the device synchronized around it), until one
    is 10% slower than the fastest so far, measures the two fastest once more (a forward
    slowed once by something else must not decide), and keeps the fastest of all the
    measurements (a deeper one only if 1% faster), logging the choice (logger ``aimdo``,
    INFO; ``Offload.prefetch``, ``prefetch_predictions``, ``prefetch_measured`` and
    ``prefetch_choosing`` tell). When it keeps a shallower depth than one it tried, it
    empties PyTorch's CUDA cache (``torch.cuda.empty_cache``, the whole device's) so that
    the residency the deeper staging took grows back. While every block fits (the forward
    timed takes none through staging), no depth is tried, until a forward offloads one. Two
    forwards of the trials failing one after another (a depth whose staging cannot be had)
    end them at the depth measured fastest, or 2.
    ``staging_bytes`` (bytes or a size string) caps the staging buffers together; by
    default, enough for ``prefetch + 1`` buffers of the largest block, within 256 MiB or
    1/24 of the device's budget, whichever is more (``auto_staging_bytes``).
    ``whole`` lists module classes or modules offloaded as one block with their
    submodules, for modules that read a submodule's weights without calling it (as
    torch.nn.MultiheadAttention reads out_proj's).

    ``checkpoint`` (a path: a safetensors file, a sharded checkpoint's
    ``*.safetensors.index.json``, or a folder holding one of them) gives the weights'
    values: each weight is read by name from the files straight into the host chunks, so
    a module built on the meta device (``with torch.device("meta"): ...``) is offloaded
    with one host copy of its weights and none of its own; a weight on the host that the
    checkpoint lacks (a buffer no checkpoint saves) keeps its own values. Undo then puts
    the module back as it was (meta weights stay meta; host weights hold the
    checkpoint's values).
    ``host_limit`` (bytes or a size string) caps the host memory the weights of such a
    module are pinned in; the blocks that do not fit stay in the files and are read again
    at each copy, through a ring of 24 pinned buffers of up to 16 MiB (more for blocks of
    more than 6 buffers' bytes: four such blocks' bytes, up to 64 buffers), by up to 12
    native threads (fewer on a host of few cores: aimdo._torch_stream.reader_threads).
    The blocks pinned first are those the VBAR places last (offloaded, so copied at every
    forward); those placed first (resident in VRAM, read again only after an eviction)
    stream.
    With ``prefetch="auto"`` (the default) the choice among the blocks copied at every
    forward waits for the forward timed to choose the depth: until then they are read
    from the files, then those the compute waited for most per byte are pinned first
    (a depth given keeps the choice by placement, made here; blocks ``host_tiers``
    forces stay in their tier either way).
    ``"auto"`` (default) pins every weight when they fit in half of the host memory
    available (MemAvailable), else half of it; ``None`` pins every weight; ``0`` streams
    every block that can (a block with a weight of the module's own is pinned). The
    choice is logged (logger ``aimdo``, INFO); ``Offload.streamed_bytes`` tells it.
    ``host_tiers`` forces blocks into a tier whatever ``host_limit`` says: it maps modules
    with weights of their own (or their names, as ``Offload.placement`` gives them) to
    ``"pinned"`` (a pinned copy in host memory, counted in ``host_limit``) or ``"file"``
    (read from the checkpoint at each copy).
    ``file_reads`` says how the blocks in the files are read: ``"cached"`` through the
    page cache, ``"direct"`` past it (O_DIRECT, where the file system takes it), or
    ``"auto"`` (default): O_DIRECT only when what a forward reads from the files exceeds
    the host memory available beside the pinned weights and the ring (the cache could not
    keep it). The choice is logged with the others.
    ``timings`` (default False) times every forward of the whole module, block by block
    (``Offload.last_timings``, a ForwardTimings; ``Offload.timings`` switches it).

    Errors, before anything changes: TypeError and ValueError for bad arguments or weights
    offload cannot move (on the host or, with a checkpoint, the meta device; dense, plain
    tensors); aimdo.CheckpointError for a checkpoint that cannot be read, is truncated or
    corrupt, lacks a meta weight, has a tensor the module does not, or differs in a dtype
    or shape (naming file and tensor); aimdo.InvalidStateError for a module offloaded
    already, or a simulator without real bytes; aimdo.DeviceNotInitializedError. Later
    failures (out of memory for the VBAR or the host chunks; a checkpoint file changed
    or cut short since its header was read) undo what was done before they are raised."""
    manager = manager if manager is not None else get_manager()
    options = offload_options(
        prefetch=prefetch,
        order=order,
        spread=spread,
        staging_bytes=staging_bytes,
        whole=whole,
        checkpoint=checkpoint,
        host_limit=host_limit,
        host_tiers=host_tiers,
        timings=timings,
        file_reads=file_reads,
        keep_first=keep_first,
    )
    check_options(module, manager, device, options)
    return Offload(module, device, manager, options)
