"""Host views of real-bytes simulator memory (``SimBackend.view``, ``aimdo.torch.as_tensor``
on the simulator): ctypes arrays over the simulated device's pages, which the simulator
backs with host memory mapped at the VBAR's own addresses."""

from __future__ import annotations

import ctypes
from typing import ClassVar

from . import _core


class _HostView:
    """ctypes arrays over simulator memory, of a subclass that can carry its owner."""

    _types: ClassVar[dict[int, type]] = {}

    @classmethod
    def of_size(cls, nbytes: int) -> type:
        found = cls._types.get(nbytes)
        if found is None:
            found = type("SimMemory", (ctypes.c_ubyte * nbytes,), {})
            if len(cls._types) < 1024:
                cls._types[nbytes] = found
        return found


def host_view(driver, address: int, nbytes: int, operation: str = "SimBackend.view") -> memoryview:
    """What SimBackend.view does, for a simulator's native driver object. ``operation``
    names the caller in the DriverError a forked child gets."""
    driver.require_creating_process(operation)
    if not driver.real_bytes:
        raise _core.InvalidStateError("view needs SimBackend(real_bytes=True)")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    if not driver.is_accessible(address, nbytes):
        raise _core.InvalidStateError(
            f"[{address:#x}, +{nbytes}) is not mapped with access set: fault the allocation first"
        )
    array = _HostView.of_size(nbytes).from_address(address)
    array.owner = driver  # the memory lives as long as the simulator
    return memoryview(array).cast("B")
