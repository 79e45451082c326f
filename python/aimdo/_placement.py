"""Placement of a model's blocks in a VBAR (shared by aimdo.torch and aimdo.predict)."""

from __future__ import annotations

_GOLDEN = 0.6180339887498949


def spread_order(items: list) -> list:
    """`items` reordered so that every prefix of the result is spread evenly over the
    original order: item i sorts by the fractional part of i times the golden ratio. The
    first item stays first. Blocks placed in this order leave, whatever prefix of the
    VBAR stays resident, the offloaded blocks between resident ones, so that their copies
    overlap the compute of the blocks before them."""
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (i * _GOLDEN) % 1.0)]
