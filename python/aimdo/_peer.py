"""How one device reaches another's memory, as the backend's driver reports it."""

from __future__ import annotations

from typing import NamedTuple


class PeerLink(NamedTuple):
    """``access``: the device can read the peer's memory directly (peer-to-peer on: NVLink,
    or PCIe where the driver allows it). ``performance_rank``: the driver's relative rank
    of the link (lower is better; 0 where there is no access). ``native_atomics``: atomic
    operations work over it. Bandwidth is not reported by the driver: it is measured."""

    access: bool
    performance_rank: int
    native_atomics: bool
