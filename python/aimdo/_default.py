"""The process-wide default Manager: aimdo.init, aimdo.get_manager, aimdo.shutdown, and
what aimdo does at interpreter exit."""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable
from typing import Any

from . import _core
from ._manager import BackendArg, CudaBackend, Manager, _device_list
from .recording import Recording
from .sim import SimBackend

__all__ = ["init", "get_manager", "shutdown"]

_default_lock = threading.Lock()
_default: Manager | None = None


def init(
    backend: BackendArg = None,
    devices: int | Iterable[int] | None = None,
    **options: Any,
) -> Manager:
    """Create the process-wide default Manager (arguments as for ``Manager``) and return it.

    Calling it again is harmless: devices not yet initialized are added, and the options
    given are applied to the devices named. Asking for another backend than the default
    Manager's is a ValueError (call ``aimdo.shutdown()`` first)."""
    global _default
    with _default_lock:
        if _default is not None and not _default.closed:
            wanted = None
            if isinstance(backend, (SimBackend, CudaBackend, Recording)):
                if backend is not _default.backend:
                    raise ValueError(
                        "aimdo is already initialized with another backend; "
                        "call aimdo.shutdown() first"
                    )
            elif backend is not None:
                wanted = str(backend).strip().lower()
            if wanted is not None and wanted != _default.backend_name:
                raise ValueError(
                    f"aimdo is already initialized with backend "
                    f"{_default.backend_name!r}, not {wanted!r}; call aimdo.shutdown() first"
                )
            _default.add_devices(_device_list(devices, _default.backend), **options)
            return _default
        _default = Manager(backend, devices, **options)
        return _default


def get_manager() -> Manager:
    """The default Manager made by ``aimdo.init``. AimdoError if there is none."""
    manager = _default
    if manager is None or manager.closed:
        raise _core.AimdoError("aimdo is not initialized: call aimdo.init(devices=[...]) first")
    return manager


def shutdown() -> None:
    """Close the default Manager, if any. ``aimdo.init`` may be called again afterwards.
    InvalidStateError (and nothing changes) while it serves PyTorch's allocator."""
    global _default
    with _default_lock:
        manager = _default
        if manager is not None:
            manager.close()
        _default = None


def _at_exit() -> None:
    try:
        _core.set_allocator_manager(None)  # PyTorch's allocator: nothing to reach any more
        manager = _default
        if manager is not None and manager._pid != os.getpid():
            # A child made by fork() inherited the parent's default Manager: its VBARs and
            # allocations are the parent's, and the child's driver is not initialized.
            # Closing them here would only fail (and print a traceback at every exit of,
            # say, a DataLoader worker); the parent closes them.
            return
        shutdown()
    finally:
        # Whatever is destroyed after this point must not call a driver that may be gone.
        _core.set_process_exiting()


atexit.register(_at_exit)
