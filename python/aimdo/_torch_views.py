"""Tensor views of VBAR allocations (aimdo.torch.as_tensor). Needs PyTorch."""

from __future__ import annotations

import torch

from . import _core
from .sim import host_view


class _CudaBytes:
    """A CUDA array interface over raw device memory, so torch.as_tensor views it."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


def as_tensor(allocation, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` viewing ``allocation``'s memory in place.

    Valid only between a successful ``Vbar.fault`` of the allocation and the matching
    ``unpin``. On the cuda backend it is a CUDA tensor on the allocation's device; on a
    simulator with ``real_bytes=True`` a CPU tensor. ValueError when the shape does not
    fit the allocation; aimdo.InvalidStateError when its pages are not mapped;
    aimdo.DriverError on a simulator in a child made by fork(), whose driver is not
    initialized (a CUDA tensor cannot be used there either)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {type(dtype).__name__}")
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes > allocation.size:
        raise ValueError(
            f"{shape} of {dtype} is {nbytes} bytes; the allocation has {allocation.size}"
        )
    driver = allocation.vbar.driver
    if driver.backend_name == "sim":  # the simulator, or an adaptor over it
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        view = host_view(driver, allocation.address, nbytes, "aimdo.torch.as_tensor")
        raw = torch.frombuffer(view, dtype=torch.uint8)
    else:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=f"cuda:{allocation.device}")
        try:
            raw = torch.as_tensor(_CudaBytes(allocation.address, nbytes))
        except RuntimeError as error:  # PyTorch checks the pointer: not mapped yet
            raise _core.InvalidStateError(
                f"allocation at {allocation.address:#x} is not mapped: fault it first ({error})"
            ) from error
        if raw.device.type != "cuda" or raw.device.index != allocation.device:
            raise _core.InvalidStateError(
                f"allocation at {allocation.address:#x} did not resolve to cuda:{allocation.device}"
            )
    return raw.view(dtype).view(shape)
