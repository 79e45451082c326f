"""Which blocks of an offload stay in their checkpoint files, and how those are read
(``offload(..., host_limit=..., host_tiers=..., file_reads=...)``; design.md §7, host
tiers): the pinned budget, the blocks left in the files, whether they are read with
O_DIRECT, and how fast the files read now. The reading itself is _torch_stream's.
Imported by aimdo.torch only."""

from __future__ import annotations

import dataclasses
import mmap
import os
import time

from ._sizes import format_size
from ._torch_checkpoint import DIRECT_ALIGN, open_direct

#: host_limit="auto" pins at most this fraction of the host memory available when the
#: module is offloaded (MemAvailable), leaving the rest to the process and the page cache.
AUTO_HOST_FRACTION = 0.5


def available_host_bytes() -> int:
    """The host memory available now (Linux: MemAvailable), or the free pages' bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_limit_bytes(host_limit, weights: int) -> tuple[int, str]:
    """The bytes of weights to pin for `host_limit` (None: all; "auto"; bytes), and why."""
    if host_limit is None:
        return weights, "host_limit=None pins every weight"
    if host_limit == "auto":
        available = available_host_bytes()
        limit = int(available * AUTO_HOST_FRACTION)
        if weights <= limit:
            return weights, (
                f"host_limit='auto': the weights fit in {AUTO_HOST_FRACTION:.0%} of the "
                f"{format_size(available)} of host memory available"
            )
        return limit, (
            f"host_limit='auto': {AUTO_HOST_FRACTION:.0%} of the {format_size(available)} of "
            "host memory available"
        )
    return host_limit, f"host_limit={format_size(host_limit)}"


#: Bytes read to measure how fast the checkpoint's files read (in reads of PROBE_READ).
PROBE_BYTES = 64 << 20
PROBE_READ = 8 << 20


def read_bandwidth(blocks, direct: bool = False) -> float | None:
    """Bytes a second that reading `blocks`' sources from their files gives now (from the
    page cache where the files are there, else the disk; with `direct`, O_DIRECT where the
    file system has it): PROBE_BYTES of the largest tensor's file, read in order from that
    tensor's first byte (its aligned block, with `direct`). None when nothing reads."""
    sources = [w.source for block in blocks for w in block.weights if w.source is not None]
    if not sources:
        return None
    largest = max(sources, key=lambda t: t.nbytes)
    want = min(PROBE_BYTES, largest.nbytes)
    first = largest.offset - largest.offset % DIRECT_ALIGN if direct else largest.offset
    fd = open_direct(largest.path) if direct else None  # None: as the stream will, cached
    try:
        if fd is None:
            fd = os.open(largest.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        buffer = mmap.mmap(-1, PROBE_READ)  # page-aligned, as O_DIRECT needs
    except OSError:
        os.close(fd)
        return None
    try:
        began, done = time.perf_counter(), 0
        while done < want:
            got = os.preadv(fd, [buffer], first + done)
            if got == 0:
                break
            done += got
        seconds = time.perf_counter() - began
    except OSError:
        return None
    finally:
        os.close(fd)
        buffer.close()
    return done / seconds if done and seconds > 0 else None


def reads_direct(
    every: int, pinned: int, path: str | None = None, forced: str = "auto"
) -> tuple[bool, str]:
    """Whether the files are read with O_DIRECT (past the page cache), and why. `every`:
    the bytes read from the files at every forward (the streamed blocks placed beyond the
    VRAM budget; the others are read again only after an eviction); `pinned`: the bytes
    pinned (the weights and the ring); `path`: a file of the checkpoint, to ask its file
    system. Through the page cache, what is read at every forward comes from memory once
    cached (35 GB/s on an H200's host against 1.5 GB/s from its disk:
    benchmarks/RESULTS.md); that pays when the cache can keep it. When it exceeds the host
    memory available beside the pinned bytes, the cache cannot: every read goes to the
    disk anyway, and through the cache it would also copy each byte once more and push out
    the pages of everything else. Then O_DIRECT, where the platform and the file system
    have it. `forced`: offload's file_reads ("cached" or "direct" decide; "auto" chooses
    as above)."""
    if forced == "cached":
        return False, "through the page cache (file_reads='cached')"
    if forced == "direct":
        return True, "with O_DIRECT where the file system takes it (file_reads='direct')"
    if not hasattr(os, "O_DIRECT"):
        return False, "through the page cache (no O_DIRECT here)"
    room = available_host_bytes() - pinned
    if every <= room:
        return False, (
            f"through the page cache, which can keep the {format_size(every)} read at every "
            f"forward ({format_size(room)} of host memory available beside the pinned bytes)"
        )
    if path is not None:
        fd = open_direct(path)
        if fd is None:
            return False, "through the page cache (its file system refuses O_DIRECT)"
        os.close(fd)
    return True, (
        f"with O_DIRECT: the page cache could not keep the {format_size(every)} read at "
        f"every forward (the host has {format_size(max(room, 0))} available beside the "
        "pinned bytes)"
    )


def streamable(block) -> bool:
    """Whether every weight of `block` is a meta weight with a checkpoint source."""
    return bool(block.weights) and all(
        w.source is not None and w.tensor.device.type == "meta" for w in block.weights
    )


def always_pinned(block, forced: dict) -> bool:
    """Whether `block` is pinned whatever the limit: it cannot stream, or host_tiers
    (`forced`: {block: "pinned" or "file"}) forces it pinned."""
    return not streamable(block) or forced.get(block) == "pinned"


def left_in_files(placed: list, limit: int, forced=None) -> list:
    """The blocks (of `placed`, in placement order) that stay in their files for a pinned
    budget of `limit` bytes: the blocks that cannot stream, or are forced pinned
    (`forced`: {block: "pinned" or "file"}), are pinned first, and those forced into the
    files stay there; then those placed last, which the VBAR offloads first and so are
    copied at every forward, are pinned while they fit; the rest (placed first: resident
    in VRAM, read again only after an eviction) stream. ValueError for a block forced
    into the files that cannot stream."""
    forced = forced or {}
    for block, tier in forced.items():
        if tier == "file" and not streamable(block):
            raise ValueError(
                f"host_tiers: {block.name or 'the root module'!r} cannot stay in the files: "
                "a weight of it is the module's own, not read from the checkpoint"
            )
    pinned = [b for b in placed if always_pinned(b, forced)]
    left = limit - sum(block.nbytes for block in pinned)
    files = []
    for block in reversed(placed):
        if always_pinned(block, forced):
            continue
        if forced.get(block) == "file":
            files.append(block)
        elif block.nbytes <= left:
            left -= block.nbytes
        else:
            files.append(block)
    return files[::-1]


#: A block the compute waited for less than this (seconds) in the timed forward did not
#: stall it, to pinned_by_stall: timing noise, not a read left unhidden.
STALL_FLOOR = 20e-6


def pinned_by_stall(candidates: list, every, stalls: dict, left: int) -> list:
    """The blocks of `candidates` to pin in `left` bytes, once a forward that read them all
    from the files was timed (`stalls`: {block: seconds the compute waited for it}).
    `candidates` are the blocks that may stream, in the order left_in_files pins them
    (placed last first); `every`: those of them copied at every forward. Those of `every`
    are pinned first, the most stall per byte first (a read the compute around the
    block could not hide: pinning it takes that read away), then those that did not
    stall (under STALL_FLOOR), then the others, both in the candidates' order; each
    while it fits. Returns them in the candidates' order."""
    rank = {id(block): index for index, block in enumerate(candidates)}

    def key(block) -> tuple:
        stall = stalls.get(block, 0.0)
        if stall < STALL_FLOOR:
            return (1, 0.0, rank[id(block)])
        return (0, -stall / max(block.nbytes, 1), rank[id(block)])

    copied = sorted((block for block in candidates if block in every), key=key)
    chosen = set()
    for block in copied + [block for block in candidates if block not in every]:
        if block.nbytes <= left:
            left -= block.nbytes
            chosen.add(id(block))
    return [block for block in candidates if id(block) in chosen]


@dataclasses.dataclass
class TierPlan:
    """What plan_tiers decided for an offload's blocks: `files`, the blocks read from the
    files from the first copy (placement order); `every`, the bytes of the blocks the
    placement rule (left_in_files) streams that are placed beyond the VRAM budget, so read
    at every forward; `pinned`, the bytes of weights that rule pins (the deferred choice
    pins about as much); `deferred`, (candidates, bytes left to pin) for pinned_by_stall,
    or None; `said`, the choice and why, for the log."""

    files: list
    every: int
    pinned: int
    deferred: tuple | None
    said: str


def plan_tiers(order: list, host_limit, forced: dict, budget: int, defer: bool) -> TierPlan:
    """Which of the blocks (`order`: placement order) stay in the checkpoint files for
    `host_limit` and host_tiers (`forced`: {block: "pinned" or "file"}), the VRAM budget
    being `budget` bytes. With `defer`, when the limit leaves some in the files, every
    block that may stream stays there until a timed forward tells which to pin
    (pinned_by_stall, over TierPlan.deferred). ValueError as left_in_files."""
    weights = sum(block.nbytes for block in order)
    limit, why = host_limit_bytes(host_limit, weights)
    if forced:
        tiers = list(forced.values())
        why += (
            f"; host_tiers forces {tiers.count('pinned')} blocks pinned and "
            f"{tiers.count('file')} in the files"
        )
    files = left_in_files(order, limit, forced)
    streamed, count = sum(block.nbytes for block in files), len(files)
    # What a forward reads from the files: the streamed blocks placed beyond the budget
    # are offloaded, so read at every forward.
    at, beyond = 0, set()
    for block in order:
        if at + block.nbytes > budget:
            beyond.add(block)
        at += block.nbytes
    every = sum(block.nbytes for block in files if block in beyond)
    pinned = weights - streamed
    said = (
        f"pins {format_size(pinned)} of its {format_size(weights)} of weights in host "
        f"memory ({why}); {count} blocks ({format_size(streamed)}) stay in the "
        "checkpoint's files, read again at each copy: those placed first, kept resident "
        "in VRAM and read again only after an eviction"
    )
    deferred = None
    candidates = [b for b in reversed(order) if streamable(b) and b not in forced]
    if defer and not set(candidates).isdisjoint(files):
        held = sum(b.nbytes for b in order if always_pinned(b, forced))
        if limit > held:
            deferred = (candidates, limit - held)
            # In the files until then. The reads' figures are the placement rule's
            # (`streamed`, `every`): the choice then pins about as much.
            files = [b for b in order if not always_pinned(b, forced)]
            said = (
                f"pins {format_size(held)} of its {format_size(weights)} of weights in "
                f"host memory now ({why}): until its first forward timed block by block "
                f"that offloads a block, its {len(files)} blocks that can stream "
                f"({format_size(sum(b.nbytes for b in files))}) are read from the "
                f"checkpoint's files at each copy; then up to {format_size(limit - held)} "
                "of them are pinned, the blocks copied at every forward that the compute "
                "waited for most per byte first (about "
                f"{format_size(streamed)} stay in the files)"
            )
    return TierPlan(files, every, pinned, deferred, said)
