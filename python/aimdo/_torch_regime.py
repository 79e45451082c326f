"""How an offload group runs a batch (aimdo.torch.OffloadGroup's call; design.md §4.4): the
regimes it can run, the prediction that ranks them for this machine (its links measured, or
the simulator's own), and the batch split over the computing devices and gathered back.
Needs PyTorch; imported by aimdo.torch only."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping

import torch

from ._manager import Manager
from .predict import Regime, rank_regimes
from .sim import SimBackend

#: The regimes an OffloadGroup runs (the names aimdo.predict.rank_regimes gives them):
#: - "split with peers": the batch split over the devices, each copying what it lacks
#:   from the others' pages where the driver gives peer access, else from the host;
#: - "split from the host": the same, every copy from the host;
#: - "donor": the whole batch on the first device, the others holding its weights;
#: - "one device": the whole batch on the first device, every copy from the host.
RUNNABLE = ("split with peers", "split from the host", "donor", "one device")
#: Ranked for comparison, not run by aimdo.torch: accelerate's placement of the layers.
LAYER_SPLIT = "layer split"
#: The regimes that read other devices' pages.
WITH_PEERS = ("split with peers", "donor")
#: The regimes that split the batch.
SPLITTING = ("split with peers", "split from the host")

#: Bytes of each copy that measures a link (CUDA), and how many are timed.
PROBE_BYTES = 128 << 20
PROBE_COPIES = 3
#: Host links whose bandwidth with every device copying at once falls below this fraction
#: of one device's alone are taken to be one link, shared (two cards behind one x16).
SHARED_LINK_FRACTION = 0.7


def check_regime(regime) -> None:
    if regime == "auto" or regime in RUNNABLE:
        return
    if regime == LAYER_SPLIT:
        raise ValueError(
            "aimdo.torch does not run a layer split (aimdo.predict.rank_regimes predicts it, "
            f"for comparison); choose one of {RUNNABLE!r} or 'auto'"
        )
    raise ValueError(f"regime must be 'auto' or one of {RUNNABLE!r}, got {regime!r}")


# --- the prediction -------------------------------------------------------------------------


def _timed_copies(copy, device) -> float:
    """Seconds per copy over PROBE_COPIES runs of `copy()`, after one untimed."""
    copy()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(PROBE_COPIES):
        copy()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / PROBE_COPIES


def _host_bandwidth(device: int, ready=None) -> float:
    host = torch.empty(PROBE_BYTES, dtype=torch.uint8).pin_memory()
    target = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
    if ready is not None:
        ready.wait()
    return PROBE_BYTES / _timed_copies(lambda: target.copy_(host, non_blocking=True), device)


def _all_at_once(devices) -> float:
    """The lowest host bandwidth of `devices` while they all copy at once."""
    ready = threading.Barrier(len(devices))

    def probe(device):
        try:
            return _host_bandwidth(device, ready)
        except BaseException:
            ready.abort()  # the others must not wait for this one at the barrier
            raise

    return min(run_parts([lambda d=d: probe(d) for d in devices]))


def measure_links(manager: Manager, devices: list[int]) -> tuple[list, dict]:
    """SimBackend's devices and topology for `devices` with their links as measured now
    (CUDA): each device's pinned host-to-device bandwidth, whether the host links are
    shared, and each peer link the driver gives access over."""
    alone = {device: _host_bandwidth(device) for device in devices}
    shared = len(devices) > 1 and _all_at_once(devices) < SHARED_LINK_FRACTION * min(alone.values())
    peers = []
    for device in devices:
        row = []
        for other in devices:
            link = manager.peer_link(device, other) if other != device else None
            if link is None or not link.access:
                row.append(None)
                continue
            source = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=other)
            target = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
            seconds = _timed_copies(lambda t=target, s=source: t.copy_(s), device)
            torch.cuda.synchronize(other)
            row.append({"bandwidth": PROBE_BYTES / seconds, "rank": link.performance_rank})
        peers.append(row)
    specs = []
    for device in devices:
        info = manager.device_info(device)
        specs.append(
            {
                "capacity": info["total_bytes"],
                "granularity": info["granularity_bytes"],
                "bandwidth": alone[device],
            }
        )
    topology = {"peers": peers, "host_links": [0] * len(devices) if shared else []}
    return specs, topology


@contextlib.contextmanager
def predictor(manager: Manager, devices: list[int], others_change=None, links=None):
    """A Manager on a simulator of `devices` of `manager` as they are now, and the numbers
    it gives them: on a simulator its twin (the same numbers); on CUDA a simulator of the
    links measured now (numbered from 0), or of `links` (what measure_links gave, for a
    caller predicting several times). Each device keeps its limit, headrooms and page
    size, and the memory others use on it now, plus `others_change[device]` bytes where
    given (what a different staging would hold). Closed on leaving."""
    backend = manager.backend
    if isinstance(backend, SimBackend):
        twin, numbers = backend.twin(), list(devices)  # the same devices, numbered the same
    else:
        specs, topology = links if links is not None else measure_links(manager, devices)
        twin, numbers = SimBackend(specs, topology=topology), list(range(len(devices)))
    infos = [manager.device_info(device) for device in devices]
    options = {
        key: {number: info[key] for number, info in zip(numbers, infos, strict=True)}
        for key in ("vram_limit", "headroom", "extra_headroom", "page_size")
    }
    change = others_change or {}
    with Manager(twin, numbers, **options) as made:
        for number, device in zip(numbers, devices, strict=True):
            free, total = manager.memory_info(device)
            others = total - free - manager.usage_bytes(device) + change.get(device, 0)
            if others > 0:
                twin.add_external_usage(number, others)
        yield made, numbers


def rank(manager: Manager, devices: list[int], block_bytes, seconds_full, seconds_split, prefetch):
    """aimdo.predict.rank_regimes for `devices` of `manager` as they are now (see
    predictor)."""
    with predictor(manager, devices) as (made, numbers):
        return rank_regimes(
            made, numbers, block_bytes, seconds_full, seconds_split, prefetch=prefetch
        )


def bound_by_host(ranking: list[Regime], split_host: float) -> list[Regime]:
    """`ranking` with each split's seconds raised to `split_host` where that is more,
    and sorted again: the seconds a split's calls took to return at once. The members of
    a group are threads of one process, taking turns on the GIL, so a split step takes
    at least that long whatever the GPUs do; the prediction leaves the host out."""
    bounded = []
    for regime in ranking:
        if regime.name in SPLITTING and split_host > regime.seconds:
            regime = Regime(
                regime.name,
                split_host,
                f"{regime.detail}; bound by the host: the parts' calls took "
                f"{split_host * 1000:.1f} ms to return at once (predicted "
                f"{regime.seconds * 1000:.1f} ms)",
            )
        bounded.append(regime)
    return sorted(bounded, key=lambda regime: regime.seconds)


def choose(ranking: list[Regime], peers: bool, can_split: bool) -> Regime:
    """The fastest regime of `ranking` the group can run."""
    for regime in ranking:
        if regime.name not in RUNNABLE:
            continue
        if regime.name in WITH_PEERS and not peers:
            continue
        if regime.name in SPLITTING and not can_split:
            continue
        return regime
    return next(regime for regime in ranking if regime.name == "one device")


# --- the batch ------------------------------------------------------------------------------


def batch_size(args, kwargs) -> int | None:
    """The first dimension of the first tensor among the arguments (depth first), or None."""
    for value in (*args, *kwargs.values()):
        found = _first_tensor(value)
        if found is not None:
            return found.shape[0] if found.dim() else None
    return None


def _first_tensor(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        return value
    if depth < 8 and isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item, depth + 1)
            if found is not None:
                return found
    if depth < 8 and isinstance(value, Mapping):
        for item in value.values():
            found = _first_tensor(item, depth + 1)
            if found is not None:
                return found
    return None


def split_batch(args, kwargs, size: int, devices: list[torch.device]) -> list[tuple]:
    """(args, kwargs) for each device: every tensor whose first dimension is `size` cut
    along it into len(devices) parts (the first parts one larger when it does not divide),
    every other tensor whole; each tensor moved to its part's device."""
    count = len(devices)

    def part(value, index, depth=0):
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] == size:
                value = torch.tensor_split(value, count)[index]
            return value.to(devices[index], non_blocking=True)
        if depth < 8 and isinstance(value, (list, tuple)):
            items = [part(item, index, depth + 1) for item in value]
            if isinstance(value, list):
                return items
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if depth < 8 and isinstance(value, dict):
            return {key: part(item, index, depth + 1) for key, item in value.items()}
        return value

    return [
        (tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()})
        for i in range(count)
    ]


def gather(outputs: list, device: torch.device, depth: int = 0):
    """The parts' outputs as one: tensors concatenated along the first dimension on
    `device`; tuples, lists and dicts (their subclasses too: ModelOutput) gathered item by
    item, of the first part's type; None and equal values kept. TypeError for anything
    else that differs between the parts."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if any(not isinstance(o, torch.Tensor) or not o.dim() for o in outputs):
            raise TypeError("cannot gather the parts' outputs: a tensor without a batch dimension")
        return torch.cat([output.to(device) for output in outputs])
    if depth >= 8:
        raise TypeError(f"cannot gather the parts' outputs: nested deeper than {depth}")
    if isinstance(first, (list, tuple)):
        if any(type(o) is not type(first) or len(o) != len(first) for o in outputs):
            raise TypeError("cannot gather the parts' outputs: their sequences differ")
        items = [gather(list(column), device, depth + 1) for column in zip(*outputs, strict=True)]
        if isinstance(first, list):
            return items
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    if isinstance(first, dict):
        if any(not isinstance(o, dict) or o.keys() != first.keys() for o in outputs):
            raise TypeError("cannot gather the parts' outputs: their keys differ")
        items = {key: gather([o[key] for o in outputs], device, depth + 1) for key in first}
        return items if type(first) is dict else type(first)(**items)
    if first is None or all(output == first for output in outputs[1:]):
        return first
    raise TypeError(f"cannot gather the parts' outputs of type {type(first).__name__}")


def run_parts(calls: list) -> list:
    """Run each of `calls` (one per computing device) at once: the first in this thread,
    the others in threads of their own; their results in order. The first failure is
    raised once every call has ended."""
    results, errors = [None] * len(calls), []

    def run(index):
        try:
            results[index] = calls[index]()
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(calls))]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
