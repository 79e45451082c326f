"""One model offloaded to several devices (aimdo.torch.offload_group; design.md §4.4):
the members, their shared host copy, their peers, and undoing them together. Needs
PyTorch; imported by aimdo.torch only."""

from __future__ import annotations

import copy
import logging
import threading
import time

import torch

from . import _core
from ._default import get_manager
from ._manager import Manager
from ._placement import link_peers
from ._schedule import ForwardStats, per_block
from ._torch_handle import Offload
from ._torch_options import check_options, offload_options
from ._torch_regime import (
    SPLITTING,
    WITH_PEERS,
    batch_size,
    bound_by_host,
    check_regime,
    choose,
    gather,
    rank,
    run_parts,
    split_batch,
)
from .predict import Regime

_log = logging.getLogger("aimdo")

#: Calls of a group in the "auto" regime until it has chosen: the first learns each
#: member's order (and copies in line), the second is timed block by block, the third
#: runs the split and times its host (a batch that does not split chooses after two).
CALLS_BEFORE_CHOICE = 3


class OffloadGroup:
    """One model offloaded to several devices: what ``offload_group`` returns.

    ``modules[i]`` runs on ``devices[i]``: the first is the model itself, the others are
    copies of its module structure that share its weight tensors (one host copy for all).
    Call each from its own thread (a thread per device, as a guidance split does); each is
    an Offload of its own (``offloads[i]``). Each device's VBAR places the blocks in the
    same spread order, rotated by i/N, so that what one keeps resident complements what
    the others keep; a block missing on one device is copied from another device's pages
    when they hold it and the driver gives peer access (NVLink), else from the host
    (``last_stats[i].bytes_from_peers``). ``undo()`` puts the model back and frees it all.

    Or call the group itself, ``group(batch...)``, and it runs the batch in its regime
    (``regime``; design.md §4.4): "split with peers" or "split from the host" cut every
    tensor argument whose first dimension is the batch's (that of the first tensor
    argument) into one part per computing device, run the parts at once and concatenate
    the outputs on the first device (tensors along their first dimension; tuples, lists,
    dicts and their subclasses item by item); "donor" and "one device" run the whole batch
    on the first device. In the "auto" regime the first two calls run the whole batch on
    the first device (the second one timed, block by block, while the second device times
    one part) and the third runs the split, timing how long the parts' calls take to
    return at once (the host's time: the members are threads sharing the GIL); then the
    regimes are ranked by ``aimdo.predict.rank_regimes`` on this machine's links
    (measured on CUDA; the simulator's own), a split counted no faster than its host, and
    the fastest the group can run is taken and logged (logger ``aimdo``, INFO):
    ``regime`` and ``ranking`` tell.
    ``choose(name)`` forces one. One call of the group at a time."""

    def __init__(
        self,
        devices: list[int],
        offloads: list[Offload],
        modules: list,
        manager: Manager,
        regime: str,
        donors: list[int],
    ):
        self.devices = devices
        self.offloads = offloads
        self.modules = modules
        self._manager = manager
        self._prefetch = offloads[0].prefetch
        # Each member's blocks' peers as linked (restored when a regime reads peers).
        self._linked = [[block.peers for block in offload._blocks] for offload in offloads]
        self._donors = [devices.index(donor) for donor in donors]
        self._calling = threading.Lock()
        self._calls = 0
        self._timings = None  # an "auto" group's timed uses: (whole batch, one part)
        #: The regime calls run in (an aimdo.predict.Regime; its seconds are predicted,
        #: or NaN when forced); None until an "auto" group has chosen.
        self.regime = None
        #: The ranking the choice was made from (fastest first), or None.
        self.ranking = None
        # The members that compute in some regime: all but the donors, the first first.
        self._members = [i for i in range(len(devices)) if i not in self._donors]
        self._computing = self._members
        if regime != "auto":
            self._apply(Regime(regime, float("nan"), "forced"))

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

    def choose(self, regime: str) -> None:
        """Run the group's calls in `regime` from now on (a name of
        aimdo.torch.REGIMES): its peers, donors and computing devices are set now (a donor
        is filled). ValueError for another name, a peer regime in a group made with
        peers=False, or a regime other than "donor" in a group made with donors;
        aimdo.InvalidStateError during a call of the group. Call it while no member runs
        (a member called directly may see the peers change under it)."""
        check_regime(regime)
        if regime == "auto":
            raise ValueError("choose takes a regime to force; 'auto' is chosen by a call")
        self._check_allowed(regime)
        if not self._calling.acquire(blocking=False):
            raise _core.InvalidStateError("cannot choose a regime during a call of the group")
        try:
            self._apply(Regime(regime, float("nan"), "forced"))
        finally:
            self._calling.release()

    def _check_allowed(self, regime: str) -> None:
        if regime in WITH_PEERS and not any(any(linked) for linked in self._linked):
            raise ValueError(f"regime {regime!r} reads peers' pages: this group has no peers")
        if self._donors and regime != "donor":
            raise ValueError(
                f"this group was made with donors: its regime is 'donor', not {regime!r}"
            )

    def _apply(self, regime: Regime) -> None:
        """Set peers, donors and the computing members for `regime`."""
        peers = regime.name in WITH_PEERS
        for offload, linked in zip(self.offloads, self._linked, strict=True):
            for block, theirs in zip(offload._blocks, linked, strict=True):
                block.peers = theirs if peers else ()
        self._computing = self._members if regime.name in SPLITTING else self._members[:1]
        if regime.name == "donor":
            for index in self._donors or self._members[1:]:
                self.offloads[index].fill()
        self.regime = regime

    def __call__(self, *args, **kwargs):
        """Run one batch through the model in the group's regime (see OffloadGroup);
        returns the model's output for the whole batch, on the first device.
        aimdo.InvalidStateError during another call or once undone; TypeError when a
        split's outputs cannot be put together (call the members yourself then)."""
        if not self._calling.acquire(blocking=False):
            raise _core.InvalidStateError("an offload group runs one call at a time")
        try:
            if all(offload.undone for offload in self.offloads):
                raise _core.InvalidStateError("this offload group was undone")
            if self.regime is None:
                return self._call_and_time(args, kwargs)
            return self._run(self._computing, args, kwargs)
        finally:
            self._calling.release()

    def _run(self, computing: list[int], args, kwargs):
        size = batch_size(args, kwargs)
        if len(computing) > 1 and (size is None or size < len(computing)):
            computing = computing[:1]  # too small a batch to split: the first alone
        if len(computing) == 1:
            return self.modules[computing[0]](*args, **kwargs)
        return self._split(computing, args, kwargs, size)[0]

    def _split(self, computing: list[int], args, kwargs, size: int):
        """Run the batch split over `computing` (a part each, at once): the gathered
        output, and the seconds the parts' calls took to return (the latest)."""
        devices = [self.offloads[i].device for i in computing]
        parts = split_batch(args, kwargs, size, devices)

        def returned(i, part):
            start = time.perf_counter()
            output = self.modules[i](*part[0], **part[1])
            return output, time.perf_counter() - start

        results = run_parts(
            [
                lambda i=i, part=part: returned(i, part)
                for i, part in zip(computing, parts, strict=True)
            ]
        )
        host = max(seconds for _, seconds in results)
        return gather([output for output, _ in results], devices[0]), host

    def _call_and_time(self, args, kwargs):
        """A call of an "auto" group before its choice: the whole batch on the first
        device and one part on the second, at once, the second such call timed block by
        block; then (a batch that splits) the split, its host timed; then the choice."""
        self._calls += 1
        size = batch_size(args, kwargs)
        count = len(self._computing)
        can_split = count > 1 and size is not None and size >= count
        if self._calls > 2 and can_split and self._timings is not None:
            output, host = self._split(self._computing, args, kwargs, size)
            self._choose_from(*self._timings, can_split=True, split_host=host)
            return output
        timing = self._calls >= 2
        calls = [lambda: self.modules[0](*args, **kwargs)]
        if can_split:
            devices = [self.offloads[i].device for i in self._computing]
            part = split_batch(args, kwargs, size, devices)[1]
            second = self._computing[1]
            calls.append(lambda: self.modules[second](*part[0], **part[1]))
        if timing:
            members = [0, self._computing[1]] if can_split else [0]
            calls = [
                lambda call=call, i=i: self.offloads[i].timed(call)
                for call, i in zip(calls, members, strict=True)
            ]
        results = run_parts(calls)
        if not timing:
            return results[0]
        output, full = results[0]
        if can_split:
            self._timings = (full, results[1][1])  # the choice waits for the split's host
        else:
            self._choose_from(full, full, can_split=False)
        return output

    def _choose_from(self, full, split, can_split: bool, split_host: float = 0.0) -> None:
        seconds_full, seconds_split = per_block(full), per_block(split)
        order = list(seconds_full)
        if not order:  # no weights used: nothing to place anywhere
            self._apply(Regime("one device", 0.0, "the forward used no weights"))
            return
        blocks = self.offloads[0]._blocks
        ranking = rank(
            self._manager,
            self.devices,
            [blocks[i].nbytes for i in order],
            [seconds_full[i] for i in order],
            [seconds_split.get(i, 0.0) for i in order],
            self._prefetch,
        )
        ranking = bound_by_host(ranking, split_host)
        peers = any(any(linked) for linked in self._linked)
        chosen = choose(ranking, peers, can_split)
        self.ranking = ranking
        self._apply(chosen)
        _log.info(
            "aimdo: offload group on devices %s runs %r, predicted %.1f ms per call (%s); "
            "measured compute %.1f ms for the whole batch on device %s%s",
            self.devices,
            chosen.name,
            chosen.seconds * 1000,
            chosen.detail,
            sum(seconds_full.values()) * 1000,
            self.devices[0],
            f", {sum(seconds_split.values()) * 1000:.1f} ms for one part" if can_split else "",
        )

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
    regime: str = "auto",
    checkpoint=None,
    host_limit="auto",
    host_tiers=None,
    timings: bool = False,
    file_reads: str = "auto",
) -> OffloadGroup:
    """Offload ``module`` to each of ``devices`` (see OffloadGroup), sharing one host copy
    of its weights. ``peers`` (default True) lets a device copy a block from another
    device's resident pages where the driver allows peer access (``Manager.peer_link``);
    False copies from the host only. ``donors`` lists devices of the group that hold
    weights for the others without computing: each is filled at once (``Offload.fill``)
    with the blocks its rotated placement keeps first, which are those the first device
    keeps last (donor mode: one GPU computes, another's memory holds what does not fit).
    ``regime`` is how a call of the group runs a batch (see OffloadGroup): "auto"
    (default) chooses by the third call; a name of ``aimdo.torch.REGIMES`` forces it
    (a group with donors runs "donor").
    Other options as ``offload``, for every member.
    Errors as ``offload``, before anything changes, plus ValueError for fewer than one or
    repeated devices, donors that are not the group's or leave none to compute, or a
    regime that is not one or does not fit the other options; a failure part way undoes
    the members made."""
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
    check_regime(regime)
    if prefetch is None or prefetch == "auto":
        raise ValueError(
            f"prefetch={prefetch!r} is offload()'s; a group's members take a depth (an int)"
        )
    if regime in WITH_PEERS and not peers:
        raise ValueError(f"regime {regime!r} reads peers' pages, which peers=False forbids")
    if donors and regime not in ("auto", "donor"):
        raise ValueError(f"a group with donors runs the 'donor' regime, not {regime!r}")
    if donors:
        regime = "donor"
    options = offload_options(
        prefetch=prefetch,
        order=None,
        spread=spread,
        staging_bytes=staging_bytes,
        whole=whole,
        checkpoint=checkpoint,
        host_limit=host_limit,
        host_tiers=host_tiers,
        timings=timings,
        file_reads=file_reads,
    )
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
            rotation = index / len(devices)
            offloads.append(Offload(member, device, manager, options, leader, rotation, True))
        if peers:
            members = zip(devices, offloads, strict=True)
            link_peers(manager, [(device, made._blocks, made.vbar) for device, made in members])
        made = OffloadGroup(devices, offloads, modules, manager, regime, donors)
    except BaseException:
        for made in reversed(offloads):
            try:
                made.undo()
            except BaseException:  # noqa: BLE001, S110 - the first failure is the one raised
                pass
        raise
    for offload in offloads:
        offload._in_group = True
    return made
