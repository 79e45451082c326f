"""Where a model's blocks go in a VBAR: shared by aimdo.torch and aimdo.predict, so that
the prediction follows the module's placement."""

from __future__ import annotations

from ._core import ALLOCATION_ALIGNMENT_BYTES

_GOLDEN = 0.6180339887498949

#: Blocks smaller than this are placed first, ahead of the (spread) rest, so they stay
#: resident whenever the budget holds anything. Keeping one costs its bytes rounded to the
#: 512-byte allocation alignment; offloading one costs a whole copy in flight and a staging
#: buffer for a copy that ends in microseconds, after which the copy engine idles until
#: the compute reaches it. Measured on an H200 (benchmarks/RESULTS.md): 100 of Qwen-Image's
#: 448 offloaded blocks were 256-byte norms, each followed by 1-2 ms of an idle copy engine.
SMALL_BLOCK_BYTES = 1 << 20


def spread_order(items: list) -> list:
    """`items` reordered so that every prefix of the result is spread evenly over the
    original order: item i sorts by the fractional part of i times the golden ratio. The
    first item stays first. Blocks placed in this order leave, whatever prefix of the
    VBAR stays resident, the offloaded blocks between resident ones, so that their copies
    overlap the compute of the blocks before them."""
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (i * _GOLDEN) % 1.0)]


def placement_order(blocks: list, spread: bool, rotation: float = 0.0, first=()) -> list:
    """The order ``blocks`` (each with ``nbytes``) take in the VBAR: those smaller than
    SMALL_BLOCK_BYTES first, in their order; then those of ``first`` (blocks of
    ``blocks``: offload's ``keep_first``), in their order, spread when ``spread``; then the
    rest in theirs, spread (see spread_order) when ``spread``, and rotated left by
    ``rotation`` (a fraction) of their count: the devices of a group rotate by 0, 1/N,
    2/N..., so that the blocks each keeps resident complement the others' (design.md
    §4.4)."""
    small = [block for block in blocks if block.nbytes < SMALL_BLOCK_BYTES]
    ahead = {id(block) for block in first}
    kept = [block for block in first if block.nbytes >= SMALL_BLOCK_BYTES]
    large = [b for b in blocks if b.nbytes >= SMALL_BLOCK_BYTES and id(b) not in ahead]
    if spread:
        kept, large = spread_order(kept), spread_order(large)
    turn = round(len(large) * rotation) % len(large) if large else 0
    return small + kept + large[turn:] + large[:turn]


def link_peers(manager, members) -> None:
    """For the members of a group (each ``(device, blocks, vbar)``, the blocks in the same
    order on every device): give each block the same block on the devices its own device
    can read, nearest first (the driver's performance rank, lower is better, then the
    members' order), and open each VBAR's pages to the devices that read them (design.md
    §4.4). aimdo.torch and aimdo.predict both link a group so."""
    devices = [device for device, _, _ in members]
    links = {(a, b): manager.peer_link(a, b) for a in devices for b in devices if a != b}
    for device, blocks, _ in members:
        ranked = sorted(
            (
                (links[(device, other)].performance_rank, index, theirs, vbar)
                for index, (other, theirs, vbar) in enumerate(members)
                if other != device and links[(device, other)].access
            ),
            key=lambda entry: entry[:2],
        )
        for _, _, _, vbar in ranked:
            vbar.share_with(device)
        for position, block in enumerate(blocks):
            block.peers = tuple(theirs[position] for _, _, theirs, _ in ranked)


def place(manager, device: int, blocks: list, spread: bool, rotation: float = 0.0, first=()):
    """A new VBAR on ``device`` holding one allocation per block (a block has ``nbytes``
    and gets ``allocation``), placed in placement_order. The VBAR is sized for every block
    with the VBAR's allocation alignment; it is closed again if an allocation fails."""
    placed = placement_order(blocks, spread, rotation, first)
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
