"""An offloaded module's weights taken from a safetensors checkpoint (``offload(...,
checkpoint=...)``; design.md §7): each weight matched by name to the checkpoint's tensor,
its dtype and shape checked, and its bytes read from the file straight into the host
chunks, so a module built on the meta device never holds a second copy. Needs PyTorch;
imported by aimdo.torch only."""

from __future__ import annotations

import os
import threading

import torch

from ._safetensors import CheckpointError, FileStamp, Tensor, read_checkpoint, stamp
from ._torch_layout import TorchBlock, contiguous_stride

#: The torch dtype of each dtype name of the format (those this PyTorch has).
TORCH_DTYPES = {
    name: getattr(torch, attribute)
    for name, attribute in (
        ("BOOL", "bool"),
        ("U8", "uint8"),
        ("I8", "int8"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("I16", "int16"),
        ("U16", "uint16"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I32", "int32"),
        ("U32", "uint32"),
        ("F32", "float32"),
        ("I64", "int64"),
        ("U64", "uint64"),
        ("F64", "float64"),
    )
    if hasattr(torch, attribute)
}

#: A weight's bytes are read in pieces of at most this many bytes.
READ_BYTES = 64 << 20


def attach(blocks: list[TorchBlock], location) -> dict[str, FileStamp]:
    """Give each weight of `blocks` its tensor of the checkpoint at `location` (see
    aimdo._safetensors.read_checkpoint) as its source, stored row-major; returns the
    stamp of every file used, taken now. A weight the checkpoint lacks keeps its own
    values, unless it is on the meta device. Changes nothing before every check passes.
    CheckpointError (naming file and tensor) for a meta weight the checkpoint lacks, a
    tensor of the checkpoint no weight has, or a dtype or shape that differs."""
    where = os.fspath(location)
    tensors = read_checkpoint(location)
    stamps = {path: stamp(path) for path in sorted({t.path for t in tensors.values()})}
    sources, used = [], set()
    for block in blocks:
        for weight in block.weights:
            found = next((tensors[name] for name in weight.names if name in tensors), None)
            if found is None:
                if weight.tensor.device.type == "meta":
                    raise CheckpointError(
                        f"{where}: has no tensor {weight.name}, which the module holds on "
                        "the meta device (without values of its own)"
                    )
                continue  # a weight of the module's own (a buffer no checkpoint saves)
            dtype = TORCH_DTYPES.get(found.dtype)
            if dtype != weight.dtype:
                raise CheckpointError(
                    f"{found.path}: tensor {found.name} is {found.dtype}, the module's "
                    f"{weight.name} is {weight.dtype}"
                )
            if found.shape != weight.shape:
                raise CheckpointError(
                    f"{found.path}: tensor {found.name} has shape {list(found.shape)}, the "
                    f"module's {weight.name} {list(weight.shape)}"
                )
            sources.append((weight, found))
            used.update(name for name in weight.names if name in tensors)
    extra = sorted(set(tensors) - used)
    if extra:
        first = tensors[extra[0]]
        raise CheckpointError(
            f"{first.path}: tensor {first.name} is not a weight of the module"
            + (f" (nor are {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for weight, found in sources:
        weight.source = found
        weight.stride = contiguous_stride(weight.shape)
    return stamps


#: O_DIRECT reads start, end and land on multiples of this many bytes (the largest
#: logical block size of common disks).
DIRECT_ALIGN = 4096


def open_direct(path: str) -> int | None:
    """`path` opened read-only with O_DIRECT, or None where that is refused (no O_DIRECT
    on this platform, or a file system without it, such as tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


def _read_failed(tensor: Tensor, error: OSError) -> CheckpointError:
    return CheckpointError(f"{tensor.path}: reading tensor {tensor.name} failed ({error})")


def _changed(tensor: Tensor) -> CheckpointError:
    return CheckpointError(
        f"{tensor.path}: changed since its header was read (reading tensor "
        f"{tensor.name}); offload the module again to read the new file"
    )


def _truncated(tensor: Tensor) -> CheckpointError:
    return CheckpointError(
        f"{tensor.path}: ends inside tensor {tensor.name}: the file is truncated"
    )


def raise_for_read(status: str, error: int, tensor: Tensor) -> None:
    """A native read's outcome (aimdo._core.FileReads, FilePump): nothing for "done", else
    the CheckpointError naming the file and the tensor (ValueError for "invalid", a
    request the ring should never make)."""
    if status == "done":
        return
    if status == "changed":
        raise _changed(tensor)
    if status == "truncated":
        raise _truncated(tensor)
    if status == "failed":
        raise _read_failed(tensor, OSError(error, os.strerror(error)))
    raise ValueError("an O_DIRECT read needs an aligned buffer of count + 2 x 4096 bytes")


class Reader:
    """Reads tensors' bytes from their files, each file opened once, checking before and
    after every read that the file is what its stamp says (its size, modification time
    and inode, from the open file). Thread-safe (reads are positional). Close it when done.

    With `direct`, the native reads (FilePump) read its files past the page cache
    (O_DIRECT, where the platform and the file system have it; else through the page
    cache, as read does)."""

    def __init__(self, stamps: dict[str, FileStamp], direct: bool = False):
        self.stamps = stamps
        self.direct = direct
        self.files: dict[str, int] = {}
        self.direct_files: dict[str, int | None] = {}  # None: the file system refused
        self.retired: list[int] = []  # O_DIRECT descriptors a read refused, closed at close
        self._opening = threading.Lock()

    def _open(self, tensor: Tensor) -> int:
        with self._opening:
            fd = self.files.get(tensor.path)
            if fd is None:
                try:
                    fd = os.open(tensor.path, os.O_RDONLY)
                except OSError as error:
                    raise CheckpointError(f"{tensor.path}: cannot be read ({error})") from error
                self.files[tensor.path] = fd
        return fd

    def _open_direct(self, tensor: Tensor) -> int | None:
        """The file opened with O_DIRECT (once), or None where that is refused: it is then
        read through the page cache."""
        with self._opening:
            if tensor.path not in self.direct_files:
                self.direct_files[tensor.path] = open_direct(tensor.path)
            return self.direct_files[tensor.path]

    def _check(self, tensor: Tensor) -> int:
        """The file's descriptor (read through the page cache), once its stamp is checked
        on it."""
        fd = self._open(tensor)
        if stamp(fd) != self.stamps.get(tensor.path):
            raise _changed(tensor)
        return fd

    def _retire_direct(self, direct: int) -> None:
        """The file system took the O_DIRECT open of a file but refused a read through the
        descriptor `direct`: the file's next reads go through the page cache (the
        descriptor is closed at close, other readers may be in it)."""
        with self._opening:
            for path, fd in self.direct_files.items():
                if fd == direct:
                    self.direct_files[path] = None
                    self.retired.append(direct)

    def read(self, tensor: Tensor, into: torch.Tensor, start: int = 0) -> None:
        """Fill the uint8 tensor `into` (contiguous) with the tensor's bytes from byte
        `start` of it on, through the page cache. CheckpointError if the file changed
        since it was stamped or ends early."""
        fd = self._check(tensor)
        view = memoryview(into.numpy()).cast("B")
        nbytes, done = view.nbytes, 0
        if start + nbytes > tensor.nbytes:
            raise ValueError(f"{nbytes} bytes from {start} are past tensor {tensor.name}")
        while done < nbytes:
            piece = view[done : min(nbytes, done + READ_BYTES)]
            try:
                count = os.preadv(fd, [piece], tensor.offset + start + done)
            except OSError as error:
                raise _read_failed(tensor, error) from error
            if count == 0:
                raise _truncated(tensor)
            done += count
        self._check(tensor)  # again: a file written while it was read

    def close(self) -> None:
        with self._opening:
            files, self.files = self.files, {}
            direct, self.direct_files = self.direct_files, {}
            retired, self.retired = self.retired, []
        for fd in [*files.values(), *direct.values(), *retired]:
            if fd is not None:
                os.close(fd)
