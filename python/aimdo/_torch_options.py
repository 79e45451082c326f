"""offload's and offload_group's options: built from their arguments, checked before
anything changes, and resolved against the model's blocks (a declared order, forced host
tiers). Needs PyTorch; imported by aimdo.torch only."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from . import _core
from ._manager import Manager
from ._sizes import parse_size
from ._torch_offload import offloaded_by
from .sim import SimBackend

#: The host tiers a block can be forced into (offload's host_tiers).
HOST_TIERS = ("pinned", "file")
#: How the checkpoint's files are read (offload's file_reads): chosen, through the page
#: cache, or past it with O_DIRECT.
FILE_READS = ("auto", "cached", "direct")


def forced_tiers(host_tiers, module, blocks, bindings) -> dict:
    """offload's `host_tiers` as {block: tier}: its keys are modules, or their names in
    `module` (each a module with weights of its own: its block). ValueError for a name
    or module that has none."""
    if not host_tiers:
        return {}
    by_name = {block.name: block for block in blocks}
    own = {id(m): binding.own for m, binding in bindings if binding.own is not None}
    forced = {}
    for key, tier in host_tiers.items():
        block = own.get(id(key)) if isinstance(key, torch.nn.Module) else by_name.get(key)
        if block is None:
            shown = key if isinstance(key, str) else type(key).__name__
            raise ValueError(
                f"host_tiers: {shown!r} is no module of this model with weights of its own"
            )
        forced[block] = tier
    return forced


def kept_first(keep_first, blocks, bindings) -> list:
    """offload's `keep_first` as blocks, in its order: modules of the model with weights
    of their own, or their names in it. ValueError for one that has none, or a block
    listed twice; TypeError for something that is neither a module nor a name."""
    if not keep_first:
        return []
    by_name = {block.name: block for block in blocks}
    own = {id(m): binding.own for m, binding in bindings if binding.own is not None}
    kept, seen = [], set()
    for key in keep_first:
        if isinstance(key, torch.nn.Module):
            block = own.get(id(key))
        elif isinstance(key, str):
            block = by_name.get(key)
        else:
            raise TypeError(f"keep_first lists modules or their names, not {type(key).__name__}")
        shown = key if isinstance(key, str) else type(key).__name__
        if block is None:
            raise ValueError(
                f"keep_first: {shown!r} is no module of this model with weights of its own"
            )
        if id(block) in seen:
            raise ValueError(f"keep_first lists {block.name or shown!r} twice")
        seen.add(id(block))
        kept.append(block)
    return kept


def declared_order(order, bindings) -> list:
    """The blocks of the modules `order` lists, in that order."""
    if order is None:
        return []
    own = {id(module): binding.own for module, binding in bindings if binding.own is not None}
    declared, seen = [], set()
    for module in order:
        block = own.get(id(module))
        if block is None:
            raise ValueError(
                "order lists a module that is not part of the offloaded "
                "module, or that has no weights of its own"
            )
        if block in seen:
            raise ValueError(f"order lists {block.name or 'a module'} twice")
        declared.append(block)
        seen.add(block)
    return declared


def offload_options(
    *,
    prefetch,
    order,
    spread,
    staging_bytes,
    whole,
    checkpoint,
    host_limit,
    host_tiers,
    timings,
    file_reads="auto",
    keep_first=None,
) -> dict:
    """offload's and offload_group's arguments as an Offload takes them (sizes parsed;
    check_options then checks them)."""
    return {
        "prefetch": prefetch,
        "order": None if order is None else list(order),
        "spread": spread,
        "staging_bytes": None if staging_bytes is None else parse_size(staging_bytes),
        "whole": tuple(whole),
        "checkpoint": checkpoint,
        "host_limit": host_limit_option(host_limit),
        "host_tiers": host_tiers,
        "timings": timings,
        "file_reads": file_reads,
        "keep_first": None if keep_first is None else sequence_of(keep_first, "keep_first"),
    }


def sequence_of(value, name: str) -> list:
    """`value`, a sequence of modules or names, as a list; TypeError for one module or
    name given alone (iterating a name would list its characters) or no sequence at all."""
    if isinstance(value, (str, torch.nn.Module)):
        raise TypeError(f"{name} takes a sequence of modules or their names: put one in a list")
    try:
        return list(value)
    except TypeError:
        raise TypeError(
            f"{name} takes a sequence of modules or their names, not {type(value).__name__}"
        ) from None


def host_limit_option(host_limit):
    """``host_limit`` as offload's options hold it: a size string parsed to bytes, the
    rest as given (check_options checks it)."""
    if isinstance(host_limit, str) and host_limit != "auto":
        return parse_size(host_limit)
    return host_limit


def check_options(module, manager: Manager, device, options: dict) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"offload takes a torch.nn.Module, not {type(module).__name__}")
    prefetch = options["prefetch"]
    if (
        prefetch is not None
        and prefetch != "auto"
        and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0)
    ):
        raise ValueError(
            f"prefetch must be a non-negative int, 'auto' or None (the default), got {prefetch!r}"
        )
    checkpoint = options.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, got {type(checkpoint).__name__}")
    host_limit = options.get("host_limit", "auto")
    if host_limit not in (None, "auto"):
        if isinstance(host_limit, bool) or not isinstance(host_limit, int) or host_limit < 0:
            raise ValueError(
                f"host_limit must be None, 'auto' or a number of bytes, got {host_limit!r}"
            )
        if checkpoint is None:
            raise ValueError(
                "host_limit leaves weights in a checkpoint's files: it needs checkpoint="
            )
    host_tiers = options.get("host_tiers")
    if host_tiers is not None:
        if not isinstance(host_tiers, Mapping):
            raise TypeError(
                f"host_tiers must map modules or their names to a tier, got "
                f"{type(host_tiers).__name__}"
            )
        for key, tier in host_tiers.items():
            if not isinstance(key, (str, torch.nn.Module)):
                raise TypeError(f"host_tiers: keys are modules or names, got {key!r}")
            if tier not in HOST_TIERS:
                raise ValueError(f"host_tiers: a tier is one of {HOST_TIERS}, got {tier!r}")
        if host_tiers and checkpoint is None:
            raise ValueError(
                "host_tiers chooses between pinned memory and a checkpoint's files: "
                "it needs checkpoint="
            )
    file_reads = options.get("file_reads", "auto")
    if not isinstance(file_reads, str) or file_reads not in FILE_READS:
        raise ValueError(f"file_reads must be one of {FILE_READS}, got {file_reads!r}")
    if file_reads != "auto" and checkpoint is None:
        raise ValueError("file_reads says how a checkpoint's files are read: it needs checkpoint=")
    if not isinstance(options.get("timings", False), bool):
        raise TypeError(f"timings must be a bool, got {options['timings']!r}")
    if not isinstance(options["spread"], bool):
        raise TypeError(f"spread must be a bool, got {options['spread']!r}")
    if not all(isinstance(w, (type, torch.nn.Module)) for w in options["whole"]):
        raise TypeError("whole must list module classes or modules")
    sim = manager.backend if isinstance(manager.backend, SimBackend) else None
    if sim is not None and not sim.real_bytes:
        raise _core.InvalidStateError("offload on a simulator needs SimBackend(real_bytes=True)")
    if device not in manager.devices:
        raise _core.DeviceNotInitializedError(
            f"device {device} is not initialized in this Manager (devices {manager.devices})"
        )
    for name, member in module.named_modules():
        if offloaded_by(member) is not None:
            raise _core.InvalidStateError(
                f"{name or 'the module'} is offloaded already: undo that offload first, "
                "or offload a copy of the model"
            )
