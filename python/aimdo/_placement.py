"""Where a model's blocks go in a VBAR: shared by aimdo.torch and aimdo.predict, so that
the prediction follows the module's placement."""

from __future__ import annotations

from ._core import ALLOCATION_ALIGNMENT_BYTES

_GOLDEN = 0.6180339887498949


def spread_order(items: list) -> list:
    """`items` reordered so that every prefix of the result is spread evenly over the
    original order: item i sorts by the fractional part of i times the golden ratio. The
    first item stays first. Blocks placed in this order leave, whatever prefix of the
    VBAR stays resident, the offloaded blocks between resident ones, so that their copies
    overlap the compute of the blocks before them."""
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (i * _GOLDEN) % 1.0)]


def place(manager, device: int, blocks: list, spread: bool):
    """A new VBAR on ``device`` holding one allocation per block (a block has ``nbytes``
    and gets ``allocation``), placed in ``blocks``' order, spread (see spread_order) when
    ``spread``. The VBAR is sized for every block with the VBAR's allocation alignment;
    it is closed again if an allocation fails."""
    placed = spread_order(blocks) if spread else list(blocks)
    align = ALLOCATION_ALIGNMENT_BYTES
    total = sum((block.nbytes + align - 1) // align * align for block in placed)
    vbar = manager.create_vbar(max(total, 1), device)
    try:
        for block in placed:
            block.allocation = vbar.alloc(block.nbytes)
    except BaseException:
        vbar.close()
        raise
    return vbar
