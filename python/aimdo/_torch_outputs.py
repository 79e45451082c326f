"""What an offloaded module returns (design.md §7): the output as the module made it,
except a tensor that views the module's weights (a module returning a slice of its own
buffer, as rotary caches do), which is copied, since the weights' pages or buffer may be
reused once the module's blocks are released.

Only tensors reached through tuples, lists and dicts (their subclasses included:
transformers' ModelOutput, diffusers' BaseOutput, named tuples) are looked at, down to
MAX_DEPTH containers; other objects are returned as they are. A list or dict holding such a
tensor gets the copy in place (it stays the same object); a tuple is made again, of its
own type, only then. Needs PyTorch; imported by aimdo.torch only.
"""

from __future__ import annotations

import torch

MAX_DEPTH = 16


def owned(value, blocks, depth: int = 0):
    """`value`, with every tensor in it that views one of `blocks`' current storage
    replaced by a copy (same strides where the tensor is dense)."""
    if isinstance(value, torch.Tensor):
        # A tensor viewing a block starts inside the block's range: views never reach
        # below their first element (strides are non-negative), and nothing else lives
        # there while the block is held (VBAR pages are aimdo's; a staging buffer is held
        # by the block).
        pointer = value.data_ptr()
        for block in blocks:
            if block.start <= pointer < block.end:
                return value.clone(memory_format=torch.preserve_format)
        return value
    if depth >= MAX_DEPTH:
        return value
    if isinstance(value, dict):
        changed = [
            (key, new)
            for key, item in value.items()
            if (new := owned(item, blocks, depth + 1)) is not item
        ]
        for key, new in changed:
            value[key] = new
    elif isinstance(value, list):
        for index, item in enumerate(value):
            new = owned(item, blocks, depth + 1)
            if new is not item:
                value[index] = new
    elif isinstance(value, tuple):
        items = [owned(item, blocks, depth + 1) for item in value]
        if any(new is not item for new, item in zip(items, value, strict=True)):
            if hasattr(value, "_fields"):  # a named tuple
                return type(value)(*items)
            return type(value)(items)
    return value
