"""One model offloaded to several devices (aimdo.torch.offload_group; design.md §4.4):
the members, their shared host copy, their peers, and undoing them together. Needs
PyTorch; imported by aimdo.torch only."""

from __future__ import annotations

import copy

import torch

from . import _core
from ._default import get_manager
from ._manager import Manager
from ._placement import link_peers
from ._schedule import ForwardStats
from ._sizes import parse_size
from ._torch_handle import Offload, check_options


class OffloadGroup:
    """One model offloaded to several devices: what ``offload_group`` returns.

    ``modules[i]`` runs on ``devices[i]``: the first is the model itself, the others are
    copies of its module structure that share its weight tensors (one host copy for all).
    Call each from its own thread (a thread per device, as a guidance split does); each is
    an Offload of its own (``offloads[i]``). Each device's VBAR places the blocks in the
    same spread order, rotated by i/N, so that what one keeps resident complements what
    the others keep; a block missing on one device is copied from another device's pages
    when they hold it and the driver gives peer access (NVLink), else from the host
    (``last_stats[i].bytes_from_peers``). ``undo()`` puts the model back and frees it all."""

    def __init__(self, devices: list[int], offloads: list[Offload], modules: list):
        self.devices = devices
        self.offloads = offloads
        self.modules = modules

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, index: int):
        return self.modules[index]

    @property
    def last_stats(self) -> list[ForwardStats]:
        return [offload.last_stats for offload in self.offloads]

    @property
    def pinned_bytes(self) -> int:
        return sum(offload.pinned_bytes for offload in self.offloads)

    def fill(self, index: int) -> int:
        """Fill member ``index``'s pages without computing (see Offload.fill): a donor
        filled again after pressure took its pages. Returns the bytes copied."""
        return self.offloads[index].fill()

    def undo(self) -> None:
        """Undo every member, the copies first and the model last (its host chunks go
        with it), once no member runs: each member's lock is taken first, so no device
        copies from pages being freed. aimdo.InvalidStateError while a member runs
        (nothing changed); a DriverError from closing a VBAR after the modules are back
        (call again to retry what is left). A second call does nothing."""
        live = [offload for offload in self.offloads if not offload._apart]
        taken = []
        try:
            for offload in live:
                if not offload._runner.lock.acquire(blocking=False):
                    raise _core.InvalidStateError(
                        "cannot undo an offload group while one of its modules runs"
                    )
                taken.append(offload)
            failure = None
            for offload in reversed(live):
                try:
                    offload._undo_locked()
                except BaseException as error:  # noqa: BLE001 - raised below, after the rest
                    failure = failure or error
            if failure is not None:
                raise failure
        finally:
            for offload in taken:
                offload._runner.lock.release()

    def __enter__(self) -> OffloadGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<aimdo.torch.OffloadGroup on devices {self.devices}>"


def offload_group(
    module: torch.nn.Module,
    devices,
    *,
    manager: Manager | None = None,
    prefetch: int = 2,
    spread: bool = True,
    staging_bytes: int | str | None = None,
    whole=(torch.nn.MultiheadAttention,),
    peers: bool = True,
    donors=(),
) -> OffloadGroup:
    """Offload ``module`` to each of ``devices`` (see OffloadGroup), sharing one host copy
    of its weights. ``peers`` (default True) lets a device copy a block from another
    device's resident pages where the driver allows peer access (``Manager.peer_link``);
    False copies from the host only. ``donors`` lists devices of the group that hold
    weights for the others without computing: each is filled at once (``Offload.fill``)
    with the blocks its rotated placement keeps first, which are those the first device
    keeps last (donor mode: one GPU computes, another's memory holds what does not fit).
    Other options as ``offload``, for every member.
    Errors as ``offload``, before anything changes, plus ValueError for fewer than one or
    repeated devices, or donors that are not the group's or leave none to compute; a
    failure part way undoes the members made."""
    manager = manager if manager is not None else get_manager()
    devices = list(devices)
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"offload_group needs distinct devices, got {devices!r}")
    donors = list(donors)
    if any(donor not in devices for donor in donors) or len(set(donors)) >= len(devices):
        raise ValueError(
            f"donors must be some of the group's devices {devices!r}, leaving one to "
            f"compute; got {donors!r}"
        )
    options = {
        "prefetch": prefetch,
        "order": None,
        "spread": spread,
        "staging_bytes": None if staging_bytes is None else parse_size(staging_bytes),
        "whole": tuple(whole),
    }
    for device in devices:
        check_options(module, manager, device, options)
    for donor in donors:
        readers = [d for d in devices if d not in donors]
        if not peers or not any(manager.peer_link(d, donor).access for d in readers):
            raise ValueError(
                f"donor {donor} would serve no one: it serves only over peer access "
                f"(peers={peers}; see Manager.peer_link)"
            )
    shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    modules = [module] + [copy.deepcopy(module, dict(shared)) for _ in devices[1:]]
    offloads: list[Offload] = []
    try:
        for index, (member, device) in enumerate(zip(modules, devices, strict=True)):
            leader = offloads[0] if offloads else None
            offloads.append(Offload(member, device, manager, options, leader, index / len(devices)))
        if peers:
            members = zip(devices, offloads, strict=True)
            link_peers(manager, [(device, made._blocks, made.vbar) for device, made in members])
        for donor in donors:
            offloads[devices.index(donor)].fill()
    except BaseException:
        for made in reversed(offloads):
            try:
                made.undo()
            except BaseException:  # noqa: BLE001, S110 - the first failure is the one raised
                pass
        raise
    for offload in offloads:
        offload._in_group = True
    return OffloadGroup(devices, offloads, modules)
