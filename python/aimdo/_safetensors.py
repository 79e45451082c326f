"""Where a checkpoint's tensors lie in its safetensors files (design.md §7): each file's
header read and checked, a sharded checkpoint's index followed, and every tensor named with
its file, byte offset, dtype and shape. Imports neither torch nor the native core.

The format (github.com/huggingface/safetensors, "Format"): 8 bytes, a little-endian
unsigned header size N; N bytes of UTF-8 JSON mapping each tensor name to its ``dtype``,
``shape`` and ``data_offsets`` [begin, end) (relative to the byte after the header), and
optionally ``__metadata__``; then the data, each tensor's bytes row-major and
little-endian. A sharded checkpoint has an index, ``*.safetensors.index.json``, whose
``weight_map`` names each tensor's file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from ._core import AimdoError

#: A header larger than this is refused as corrupt (the format's own readers cap it too).
MAX_HEADER_BYTES = 100 << 20

#: Bytes per element of each dtype the format names.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class CheckpointError(AimdoError, ValueError):
    """A checkpoint aimdo cannot use: a file unreadable, truncated or corrupt, a tensor
    missing, extra, or of another dtype or shape than the module's, or a file changed
    since it was read. The message names the file and the tensor."""


@dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint: its file, the offset of its first byte in the file,
    its byte count, the format's dtype name and its shape."""

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FileStamp:
    """What a file was when its header was read: a later read checks it is unchanged."""

    size: int
    mtime_ns: int
    inode: int


def stamp(file: str | int) -> FileStamp:
    """The stamp of a file, by path or by open file descriptor."""
    status = os.stat(file)
    return FileStamp(status.st_size, status.st_mtime_ns, status.st_ino)


def read_header(path: str) -> dict[str, Tensor]:
    """The tensors of one safetensors file, checked against the file's size.
    CheckpointError for a file that cannot be read or is not a whole safetensors file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
                raise CheckpointError(
                    f"{path}: its header claims {header_bytes} bytes, but the file has "
                    f"{size}: truncated or not a safetensors file"
                )
            raw = f.read(header_bytes)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error})") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its header is not a JSON object")
    data_start = 8 + header_bytes
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensor = _entry(path, name, entry, data_start)
        if tensor.offset + tensor.nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {tensor.offset + tensor.nbytes}, past "
                f"the file's end ({size} bytes): the file is truncated"
            )
        tensors[name] = tensor
        spans.append((tensor.offset, tensor.offset + tensor.nbytes, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap")
    return tensors


def _entry(path: str, name: str, entry, data_start: int) -> Tensor:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name}: {why}")

    if not isinstance(entry, dict):
        raise bad("its header entry is not an object")
    dtype = entry.get("dtype")
    if dtype not in DTYPE_BYTES:
        raise bad(f"dtype {dtype!r} is not one aimdo reads ({sorted(DTYPE_BYTES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape
    ):
        raise bad(f"shape {shape!r} is not a list of non-negative ints")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(f"data_offsets {offsets!r} are not [begin, end]")
    count = 1
    for n in shape:
        count *= n
    nbytes = offsets[1] - offsets[0]
    if nbytes != count * DTYPE_BYTES[dtype]:
        raise bad(f"{nbytes} bytes for {count} elements of {dtype}")
    return Tensor(name, path, data_start + offsets[0], nbytes, dtype, tuple(shape))


def read_checkpoint(location: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a checkpoint: `location` is a safetensors file, a sharded
    checkpoint's index (``*.safetensors.index.json``), or a folder holding one index or
    one safetensors file. CheckpointError for what is not one, or any file's error; a
    tensor in two files, or one the index maps to a file that lacks it, is an error."""
    location = os.fspath(location)
    if os.path.isdir(location):
        location = _in_folder(location)
    if location.endswith(".json"):
        return _sharded(location)
    return read_header(location)


def _in_folder(folder: str) -> str:
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        raise CheckpointError(f"{folder}: cannot be listed ({error})") from error
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    if not indexes and len(files) == 1:
        return os.path.join(folder, files[0])
    raise CheckpointError(
        f"{folder}: holds {len(indexes)} safetensors indexes and {len(files)} safetensors "
        "files; name the index or the file"
    )


def _sharded(index_path: str) -> dict[str, Tensor]:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path}: not a readable JSON index ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: has no weight_map of tensor names to files")
    folder = os.path.dirname(index_path)
    tensors = {}
    for file in sorted(set(weight_map.values())):
        path = os.path.join(folder, file)
        for name, tensor in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} is in {tensors[name].path} too")
            tensors[name] = tensor
    for name, file in weight_map.items():
        found = tensors.get(name)
        if found is None or os.path.basename(found.path) != os.path.basename(file):
            raise CheckpointError(f"{index_path}: maps tensor {name} to {file}, which lacks it")
    return tensors
