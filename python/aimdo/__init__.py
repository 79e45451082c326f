"""aimdo: AI model dynamic offloader.

Run PyTorch models whose weights do not fit in GPU memory, on one GPU or several. A
model's weights live in a reserved GPU virtual address range (a VBAR); pages of VRAM
are mapped in when a layer needs them and evicted, lowest priority first, when memory
runs short, per device.

    import aimdo
    with aimdo.Manager(backend="sim", devices=[0, 1], vram_limit=8 << 30) as manager:
        vbar = manager.create_vbar(12 << 30, device=0)
        weight = vbar.alloc(256 << 20)
        signature = vbar.fault(weight)      # None: offloaded, use a temporary buffer
        ...                                 # copy in unless signature == last one
        vbar.unpin(weight)

Importing aimdo never touches the GPU driver; the CUDA backend loads libcuda.so.1
the first time it is used.
"""

from ._core import (
    ALLOCATION_ALIGNMENT_BYTES,
    AimdoError,
    Allocation,
    DeviceNotInitializedError,
    DriverError,
    InvalidStateError,
    OutOfMemoryError,
    Signature,
    Vbar,
)
from ._default import get_manager, init, shutdown
from ._manager import CudaBackend, Manager
from ._peer import PeerLink
from ._safetensors import CheckpointError
from ._sizes import format_size, parse_size
from .sim import SimBackend

__version__ = "0.1.0"

__all__ = [
    "ALLOCATION_ALIGNMENT_BYTES",
    "AimdoError",
    "CheckpointError",
    "Allocation",
    "CudaBackend",
    "DeviceNotInitializedError",
    "DriverError",
    "InvalidStateError",
    "Manager",
    "OutOfMemoryError",
    "PeerLink",
    "Signature",
    "SimBackend",
    "Vbar",
    "format_size",
    "get_manager",
    "init",
    "parse_size",
    "shutdown",
]
