"""An offloaded module's weights on the host (design.md §7): in a few large chunks of
exactly the bytes they hold, pinned on CUDA, once each.

On CUDA a chunk is ordinary host memory registered with ``cudaHostRegister`` rather than
PyTorch's pinned allocator, which rounds every allocation up to a power of two (a 38 GiB
model took about 60 GiB pinned, tensor by tensor). Weights already pinned are used where
they are. The others are moved: copied into a chunk, then the module's own tensor object
is pointed at its place there (``tensor.data``), so the pageable original is freed (when
nothing else holds it) and the host holds each weight once. ``give_back`` moves them out
again into pageable memory of their own, chunk by chunk, and frees the chunks. On a
simulator a chunk is plain CPU memory: nothing is pinned, but the bytes are the same and
counted the same.

Needs PyTorch; imported by aimdo.torch only. Not thread-safe: the owning Offload calls it
between forwards only.
"""

from __future__ import annotations

import weakref

import torch

from . import _core
from ._progress import Progress
from ._torch_checkpoint import Reader
from ._torch_layout import TorchBlock, Weight

#: A chunk holds up to this many bytes of weights; a run of one block larger than that is a
#: chunk of its own. Undo needs one chunk of extra host memory at a time.
HOST_CHUNK_BYTES = 1 << 30
#: Runs start at multiples of this in a chunk (any dtype's alignment, a cache line).
HOST_ALIGNMENT_BYTES = 64
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, so any device copies fast


class _Run:
    """Consecutive weights of one block that are copied with one copy: either moved into a
    chunk at `chunk_offset`, laid out as in the block, or one weight used in place."""

    def __init__(self, block: TorchBlock, weight: Weight, in_place: bool):
        self.block = block
        self.offset = weight.offset  # in the block
        self.end = weight.offset + weight.nbytes
        self.weights = [weight]
        self.in_place = in_place
        self.chunk_offset = 0


class _Chunk:
    def __init__(self):
        self.runs: list[_Run] = []
        self.nbytes = 0
        self.tensor = None  # uint8, once allocated
        # Unregisters the chunk's memory once: called by give_back, or by Python when the
        # chunk's tensor dies without it (a module dropped without undo), always before
        # the memory is freed. Memory freed while still registered would make a later
        # cudaHostRegister at the same address fail (cudaErrorHostMemoryAlreadyRegistered).
        self.unregister = None

    @property
    def registered(self) -> bool:
        return self.unregister is not None and self.unregister.alive


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes a dense tensor's elements fill, as a uint8 tensor sharing its memory."""
    flat = tensor.detach().as_strided((tensor.numel(),), (1,))
    return flat.view(torch.uint8)


def _is_pinned(weight: Weight) -> bool:
    return weight.tensor.is_pinned() and weight.stride == tuple(weight.tensor.stride())


class HostWeights:
    """The weights of `blocks` on the host. `pin`: register the chunks with CUDA (the
    cuda backend) and use weights already pinned in place. Construction only plans;
    move_in() allocates and moves, give_back() undoes it."""

    def __init__(self, blocks: list[TorchBlock], pin: bool, stamps=None):
        self.pin = pin
        self.blocks = blocks
        # The checkpoint files the weights with a source are read from, with their stamps
        # (aimdo._torch_checkpoint.attach), or None.
        self.stamps = stamps
        self.chunks: list[_Chunk] = []
        self.in_place: list[_Run] = []
        for block in blocks:
            for run in self._runs(block):
                if run.in_place:
                    self.in_place.append(run)
                else:
                    self._pack(run)

    def _runs(self, block: TorchBlock) -> list[_Run]:
        runs = []
        for weight in block.weights:
            if weight.nbytes == 0:
                continue
            in_place = self.pin and weight.source is None and _is_pinned(weight)
            if runs and not in_place and not runs[-1].in_place:
                runs[-1].weights.append(weight)
                runs[-1].end = weight.offset + weight.nbytes
            else:
                runs.append(_Run(block, weight, in_place))
        return runs

    def _pack(self, run: _Run) -> None:
        chunk = self.chunks[-1] if self.chunks else None
        align = HOST_ALIGNMENT_BYTES
        start = (chunk.nbytes + align - 1) // align * align if chunk else 0
        if chunk is None or (chunk.runs and start + run.end - run.offset > HOST_CHUNK_BYTES):
            chunk, start = _Chunk(), 0
            self.chunks.append(chunk)
        run.chunk_offset = start
        chunk.runs.append(run)
        chunk.nbytes = start + run.end - run.offset

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the chunks held now (pinned on CUDA), padding included."""
        return sum(chunk.nbytes for chunk in self.chunks if chunk.tensor is not None)

    @property
    def planned_bytes(self) -> int:
        return sum(chunk.nbytes for chunk in self.chunks)

    def move_in(self) -> None:
        """Allocate the chunks and move the weights into them, one chunk at a time (the
        host needs one chunk more than the weights while it runs), then give every block
        its copy runs. On failure, what was moved is given back and the error raised."""
        reader = Reader(self.stamps or {})
        what = "aimdo: reading weights" if self.stamps else "aimdo: moving weights to host chunks"
        progress = Progress(self.planned_bytes, what)
        try:
            for chunk in self.chunks:
                self._fill(chunk, reader)
                progress.add(chunk.nbytes)
        except BaseException:
            self.give_back()
            raise
        finally:
            progress.close()
            reader.close()
        for run in self.in_place:
            run.block.runs.append((run.offset, _bytes_of(run.weights[0].tensor)))
        for chunk in self.chunks:
            for run in chunk.runs:
                source = chunk.tensor[run.chunk_offset : run.chunk_offset + run.end - run.offset]
                run.block.runs.append((run.offset, source))

    def _fill(self, chunk: _Chunk, reader: Reader) -> None:
        chunk.tensor = torch.empty(chunk.nbytes, dtype=torch.uint8)
        if self.pin:
            _register(chunk)
        for run in chunk.runs:
            for weight in run.weights:
                view = weight.raw_view(chunk.tensor, run.chunk_offset - run.offset)
                if weight.source is not None:  # row-major in the chunk, as in the file
                    begin = run.chunk_offset - run.offset + weight.offset
                    reader.read(weight.source, chunk.tensor[begin : begin + weight.nbytes])
                else:
                    view.copy_(weight.tensor.detach())
                if weight.tensor.device.type != "meta":  # a meta weight keeps no bytes
                    weight.tensor.data = view

    def give_back(self) -> None:
        """Move every weight held in a chunk back into pageable memory of its own (same
        values, shape, strides and dtype; the same tensor objects) and free the chunks.
        The caller makes sure no copy still reads them. Retried after a failure (out of
        host memory), it carries on where it stopped."""
        for block in self.blocks:
            block.runs = []
        while self.chunks:
            chunk = self.chunks[-1]
            if chunk.tensor is not None:
                pointer = chunk.tensor.data_ptr()
                for run in chunk.runs:
                    for weight in run.weights:
                        data = weight.tensor.data
                        if data.untyped_storage().data_ptr() == pointer:
                            weight.tensor.data = data.clone(memory_format=torch.preserve_format)
                if chunk.registered:
                    chunk.unregister()
                chunk.tensor = None
            self.chunks.pop()
        self.in_place = []


def _register(chunk: _Chunk) -> None:
    try:
        chunk.unregister = pin_tensor(chunk.tensor)
    except BaseException:
        chunk.tensor = None
        raise


def pin_tensor(tensor: torch.Tensor) -> weakref.finalize:
    """Register the memory of a host tensor with CUDA (pinned, portable to every context);
    returns the finalizer that unregisters it, called at the latest when the tensor dies.
    aimdo.OutOfMemoryError or aimdo.AimdoError if the driver refuses."""
    cudart = torch.cuda.cudart()
    pointer = tensor.data_ptr()
    nbytes = tensor.numel() * tensor.element_size()
    code = int(cudart.cudaHostRegister(pointer, nbytes, _CUDA_HOST_REGISTER_PORTABLE))
    if code != 0:
        cudart.cudaGetLastError()  # the runtime keeps the error: PyTorch's next call would raise it
        kind = _core.OutOfMemoryError if code == 2 else _core.AimdoError
        raise kind(
            f"pinning {nbytes} bytes of host memory for offloaded weights failed "
            f"(cudaHostRegister: cudaError {code}); the locked-memory limit (ulimit -l) "
            "or the host's memory may be too small"
        )
    return weakref.finalize(tensor, _unregister, pointer)


def _unregister(pointer: int) -> None:
    # Also runs from a finalizer, where an exception could only be printed: a failure is
    # cleared and left (the memory stays pinned until the process ends, which is harmless).
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostUnregister(pointer)) != 0:
        cudart.cudaGetLastError()
