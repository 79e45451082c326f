"""aimdo.Manager and the process-wide default (aimdo.init / aimdo.get_manager)."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from . import _core
from ._peer import PeerLink
from ._sizes import format_size, parse_size
from .recording import Recording
from .sim import SimBackend

_log = logging.getLogger("aimdo")

__all__ = ["CudaBackend", "Manager", "resolve_backend"]


def _defaults() -> dict[str, Any]:
    """The core's defaults (cpp/include/aimdo/options.hpp), under the Python names."""
    core = _core.DeviceOptions()
    return {
        "vram_limit": core.vram_limit_bytes,
        "headroom": core.headroom_bytes,
        "extra_headroom": core.extra_headroom_bytes,
        "page_size": core.page_size_bytes,
        "poll_interval": core.poll_interval_ns / 1e9,
        "allocator_headroom": core.allocator_headroom_bytes,
        "recycle_pages": core.recycle_pages,
    }


#: Defaults of the per-device options (sizes in bytes, poll_interval in seconds).
DEFAULTS: dict[str, Any] = _defaults()

BackendArg = str | SimBackend | Recording | None
PerDevice = Any | Mapping[int, Any]


class CudaBackend:
    """The real GPUs, through libcuda.so.1 loaded at run time (first use, not import)."""

    def __init__(self) -> None:
        self._driver = _core.load_cuda_driver()

    @property
    def name(self) -> str:
        return "cuda"

    @property
    def driver(self) -> _core.Driver:
        return self._driver

    @property
    def device_count(self) -> int:
        return self._driver.device_count()

    def __repr__(self) -> str:
        return "CudaBackend()"


def resolve_backend(backend: BackendArg) -> SimBackend | CudaBackend | Recording:
    """``backend`` as a backend object: a SimBackend, CudaBackend or Recording as it is,
    ``"sim"`` or ``"cuda"`` as a new one, None as what the environment variable
    AIMDO_BACKEND names (default sim)."""
    if isinstance(backend, (SimBackend, CudaBackend, Recording)):
        return backend
    if backend is None:
        backend = os.environ.get("AIMDO_BACKEND", "sim") or "sim"
        source = "AIMDO_BACKEND"
    else:
        source = "backend"
    if not isinstance(backend, str):
        raise TypeError(
            f"backend must be 'sim', 'cuda' or a SimBackend, not {type(backend).__name__}"
        )
    name = backend.strip().lower()
    if name == "sim":
        return SimBackend()
    if name == "cuda":
        return CudaBackend()
    raise ValueError(f"{source}={backend!r}: expected 'sim' or 'cuda'")


def _check_size(name: str, value: Any, device: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} for device {device} must be an int number of bytes, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} for device {device} must not be negative, got {value}")
    return value


def _check_bool(name: str, value: Any, device: int) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} for device {device} must be True or False, got {value!r}")
    return value


#: The longest poll_interval the core accepts: 2^62 ns, about 146 years.
MAX_POLL_INTERVAL_S = 2**62 / 1e9


def _check_seconds(name: str, value: Any, device: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} for device {device} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} for device {device} must be finite and not negative, got {value}")
    if value > MAX_POLL_INTERVAL_S:
        raise ValueError(
            f"{name} for device {device} must be at most {MAX_POLL_INTERVAL_S:.4g} s "
            f"(2^62 ns, about 146 years), got {value}"
        )
    return float(value)


def _per_device(
    name: str, value: PerDevice, devices: list[int], current: dict[int, dict]
) -> dict[int, Any]:
    """One value per device from a single value or a dict keyed by device. Where none is
    given, a device keeps its current value (``current``) or gets the default."""

    def fallback(device: int) -> Any:
        return current[device][name] if device in current else DEFAULTS[name]

    if isinstance(value, Mapping):
        unknown = [key for key in value if key not in devices]
        if unknown:
            raise ValueError(
                f"{name} names device(s) {unknown} that are not among devices={devices}"
            )
        return {
            device: value[device] if device in value else fallback(device) for device in devices
        }
    return {device: fallback(device) if value is None else value for device in devices}


def _device_list(devices: int | Iterable[int] | None, backend) -> list[int]:
    if devices is None:
        return list(range(backend.device_count))
    if isinstance(devices, bool):
        raise TypeError("devices must be an int or a list of ints")
    if isinstance(devices, int):
        devices = [devices]
    out = []
    for device in devices:
        if isinstance(device, bool) or not isinstance(device, int):
            raise TypeError(f"devices must be ints (CUDA ordinals), got {device!r}")
        if device not in out:
            out.append(device)
    if not out:
        raise ValueError("devices must name at least one device")
    return out


class Manager:
    """Owns a backend and aimdo's state for each initialized device.

    ``Manager(backend="sim" | "cuda" | SimBackend, devices=[0, 1], *, vram_limit=None,
    headroom=None, extra_headroom=None, page_size=None, poll_interval=None)``

    ``devices`` lists the CUDA ordinals to manage (default: every device the backend
    has); a device not listed cannot be used until ``add_devices`` adds it. Each option
    is a single value for every device or a dict keyed by device; None means the default:

    - ``vram_limit`` (bytes, default none): treat the device as having this much memory.
    - ``headroom`` (bytes, default 256 MiB): what the device must keep free.
    - ``extra_headroom`` (bytes, default 0): added on top of every deficit.
    - ``page_size`` (bytes, default 32 MiB): unit of residency of new VBARs; a multiple
      of the device's allocation granularity (2 MiB on NVIDIA GPUs).
    - ``poll_interval`` (seconds, default 2): the driver's free-memory figure is read at
      most this often per device (0: on every evaluation).
    - ``allocator_headroom`` (bytes, default 0): extra room made before each
      ``external_alloc`` (the PyTorch allocator's path).
    - ``recycle_pages`` (default True): when a fault evicts pages to make room for its
      own, map their physical memory again instead of releasing it and creating new
      memory (about half the driver cost of a churned page on an H100).

    Thread-safe. One lock per device; threads driving different devices never wait on
    each other. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        backend: BackendArg = None,
        devices: int | Iterable[int] | None = None,
        *,
        vram_limit: PerDevice = None,
        headroom: PerDevice = None,
        extra_headroom: PerDevice = None,
        page_size: PerDevice = None,
        poll_interval: PerDevice = None,
        allocator_headroom: PerDevice = None,
        recycle_pages: PerDevice = None,
    ):
        self._backend = resolve_backend(backend)
        self._core = _core.Manager(self._backend.driver)
        self._growers: dict[int, dict] = {}  # device -> {key: callable}, see _grow_back
        self._pausers: dict[int, dict] = {}  # device -> {key: callable}, see _on_pause
        # Paused device -> {(VBAR address, size): its watermark before the pause}.
        self._paused: dict[int, dict] = {}
        self._pause_lock = threading.Lock()
        # The process whose driver state this Manager holds: a child made by fork() shares
        # the object but not the driver (CUDA answers it CUDA_ERROR_NOT_INITIALIZED).
        self._pid = os.getpid()
        self.add_devices(
            _device_list(devices, self._backend),
            vram_limit=vram_limit,
            headroom=headroom,
            extra_headroom=extra_headroom,
            page_size=page_size,
            poll_interval=poll_interval,
            allocator_headroom=allocator_headroom,
            recycle_pages=recycle_pages,
        )

    # -- devices ----------------------------------------------------------------------
    def add_devices(
        self,
        devices: int | Iterable[int],
        *,
        vram_limit: PerDevice = None,
        headroom: PerDevice = None,
        extra_headroom: PerDevice = None,
        page_size: PerDevice = None,
        poll_interval: PerDevice = None,
        allocator_headroom: PerDevice = None,
        recycle_pages: PerDevice = None,
    ) -> None:
        """Initialize ``devices`` (options as in the constructor). For a device already
        initialized, the options given replace its current ones and the options left out
        (None, or absent from a dict) keep their current values; VBARs keep their page
        size. All or nothing: on an error no device changes."""
        devices = _device_list(devices, self._backend)
        given = {
            "vram_limit": vram_limit,
            "headroom": headroom,
            "extra_headroom": extra_headroom,
            "page_size": page_size,
            "poll_interval": poll_interval,
            "allocator_headroom": allocator_headroom,
            "recycle_pages": recycle_pages,
        }
        current = {d: self._core.device_info(d) for d in self._core.devices if d in devices}
        per_device = {
            name: _per_device(name, value, devices, current) for name, value in given.items()
        }
        entries = []
        for device in devices:
            value = {name: per_device[name][device] for name in given}
            options = _core.DeviceOptions()
            options.vram_limit_bytes = _check_size(
                "vram_limit", value["vram_limit"], device, allow_none=True
            )
            options.headroom_bytes = _check_size("headroom", value["headroom"], device)
            options.extra_headroom_bytes = _check_size(
                "extra_headroom", value["extra_headroom"], device
            )
            options.page_size_bytes = _check_size("page_size", value["page_size"], device)
            seconds = _check_seconds("poll_interval", value["poll_interval"], device)
            options.poll_interval_ns = min(round(seconds * 1e9), 2**62)
            options.allocator_headroom_bytes = _check_size(
                "allocator_headroom", value["allocator_headroom"], device
            )
            options.recycle_pages = _check_bool("recycle_pages", value["recycle_pages"], device)
            entries.append((device, options))
        self._core.add_devices(entries)

    @property
    def devices(self) -> list[int]:
        """Initialized devices, in ordinal order."""
        return list(self._core.devices)

    @property
    def backend(self) -> SimBackend | CudaBackend:
        return self._backend

    @property
    def backend_name(self) -> str:
        """``"sim"`` or ``"cuda"``: the backend that actually runs."""
        return self._core.driver.backend_name

    def device_info(self, device: int) -> dict:
        """Name, total_bytes, granularity_bytes, integrated and the device's options."""
        return dict(self._core.device_info(device))

    # -- VBARs ------------------------------------------------------------------------
    def create_vbar(self, size: int, device: int) -> _core.Vbar:
        """A new VBAR of ``size`` bytes on ``device``, at the top of its priority list.
        Costs no memory; pages are mapped as allocations under them are faulted."""
        return self._core.create_vbar(device, size)

    # -- per-device figures -----------------------------------------------------------
    def resident_bytes(self, device: int) -> int:
        """Bytes of VBAR pages resident on ``device`` (never summed across devices)."""
        return self._core.resident_bytes(device)

    def usage_bytes(self, device: int) -> int:
        """Bytes aimdo has in use on ``device``."""
        return self._core.usage_bytes(device)

    def budget_bytes(self, device: int) -> int:
        """What aimdo may have in use on ``device``: limit minus headrooms."""
        return self._core.budget_bytes(device)

    def limit_bytes(self, device: int) -> int:
        """min(total memory, vram_limit) of ``device``."""
        return self._core.limit_bytes(device)

    def deficit_bytes(self, device: int, nbytes: int = 0) -> int:
        """Bytes to free on ``device`` before ``nbytes`` more fit (<= 0: they fit)."""
        return self._core.deficit_bytes(device, nbytes)

    def set_budget(self, device: int, *, vram_limit=None, headroom=None) -> int:
        """Change ``device``'s ``vram_limit`` and/or ``headroom`` (bytes or size strings;
        None keeps the current one) while it runs, from any thread, a forward running or
        not: pages over the new budget are evicted at once, lowest priority first (pages
        pinned by a running forward go at a later fault, once unpinned), and a larger
        budget fills as faults map pages. Returns the bytes evicted now. Errors as
        ``add_devices``, with nothing changed; DeviceNotInitializedError for a device not
        initialized here."""
        self._check_device(device)
        sizes = {}
        for name, value in (("vram_limit", vram_limit), ("headroom", headroom)):
            sizes[name] = parse_size(value) if isinstance(value, str) else value
        before = self.budget_bytes(device)
        self.add_devices([device], **sizes)
        after = self.budget_bytes(device)
        if after > before and device not in self._paused:
            # Evictions lowered watermarks; let the VBARs that asked grow back.
            for grow in list(self._growers.get(device, {}).values()):
                grow()
        evicted = self.reclaim(device, 0)
        _log.info(
            "aimdo: device %d budget %s -> %s (set_budget); %s evicted at once",
            device,
            format_size(before),
            format_size(after),
            format_size(evicted),
        )
        return evicted

    def pause(self, device: int) -> int:
        """Give back every VBAR page of ``device`` and keep every state, from any thread,
        a forward running or not: each VBAR's watermark drops to 0, so its unpinned pages
        are released now, pages a running forward pins when it unpins them, and faults
        answer offloaded; aimdo.torch offloads on the device finish a forward in progress,
        give back their staging buffers and refuse to run until ``resume``. Returns the
        bytes given back now. A second pause gives back what is left; VBARs made while
        paused are not paused. DeviceNotInitializedError for a device not here."""
        self._check_device(device)
        with self._pause_lock:
            # Paused before the first VBAR is touched: a failure part way leaves the device
            # paused (the offloads told, in any case), and resume() undoes what was done.
            saved = self._paused.setdefault(device, {})
            before = self.resident_bytes(device)
            try:
                for vbar in self.vbars(device):
                    # Keyed by place, not held: a VBAR dropped while paused is freed.
                    key = (vbar.address, vbar.size_bytes)
                    watermark = vbar.watermark_bytes
                    try:
                        vbar.set_watermark(0)
                    except _core.InvalidStateError:  # closed meanwhile
                        continue
                    saved.setdefault(key, watermark)
            finally:
                for hook in list(self._pausers.get(device, {}).values()):
                    hook(True)
            freed = max(0, before - self.resident_bytes(device))
        _log.info(
            "aimdo: device %d paused: %s of pages given back (%d VBARs)",
            device,
            format_size(freed),
            len(saved),
        )
        return freed

    def resume(self, device: int) -> None:
        """Undo ``pause(device)`` (nothing if not paused): each VBAR's watermark goes back
        to what it was, so its faults map pages again where the budget has room, and
        aimdo.torch offloads run again."""
        self._check_device(device)
        with self._pause_lock:
            saved = self._paused.pop(device, None)
            if saved is None:
                return
            failure = None
            try:
                for vbar in self.vbars(device):
                    watermark = saved.get((vbar.address, vbar.size_bytes))
                    if watermark is None:  # made while paused: never lowered
                        continue
                    try:
                        vbar.set_watermark(watermark)
                    except _core.InvalidStateError:  # closed meanwhile
                        continue
                    except Exception as error:  # noqa: BLE001 - the others first
                        failure = failure or error
            finally:
                for hook in list(self._pausers.get(device, {}).values()):
                    hook(False)
            if failure is not None:
                raise failure
        _log.info("aimdo: device %d resumed", device)

    def paused(self, device: int) -> bool:
        """Whether ``device`` is paused (``pause``)."""
        return device in self._paused

    def _check_device(self, device: int) -> None:
        if device not in self.devices:
            raise _core.DeviceNotInitializedError(
                f"device {device} is not initialized in this Manager (devices {self.devices})"
            )

    def _on_pause(self, device: int, key, hook) -> None:
        """Call `hook(True)` when ``pause(device)`` pauses the device and `hook(False)` when
        ``resume`` resumes it, until ``_stop_growing(device, key)``; a hook registered while
        the device is paused is called at once."""
        self._pausers.setdefault(device, {})[key] = hook
        if device in self._paused:
            hook(True)

    def _grow_back(self, device: int, key, grow) -> None:
        """Call `grow()` whenever ``set_budget`` enlarges ``device``'s budget, until
        ``_stop_growing(device, key)``: aimdo.torch raises its VBAR's watermark so."""
        self._growers.setdefault(device, {})[key] = grow

    def _stop_growing(self, device: int, key) -> None:
        self._growers.get(device, {}).pop(key, None)
        self._pausers.get(device, {}).pop(key, None)

    def reclaim(self, device: int, nbytes: int) -> int:
        """Make room on ``device`` for an allocation of ``nbytes`` made outside aimdo,
        evicting VBAR pages lowest priority first. Returns the bytes freed."""
        return self._core.reclaim(device, nbytes)

    def external_alloc(self, device: int, nbytes: int, stream: int = 0) -> int:
        """Allocate ``nbytes`` of stream-ordered memory on ``device`` for someone else
        (PyTorch's allocator): first evict what the budget needs (plus the device's
        ``allocator_headroom``), on the driver's out-of-memory evict that much more and
        retry once. Returns the device address. OutOfMemoryError when the budget cannot
        be met. The bytes count as the device's usage until ``external_free``."""
        return self._core.external_alloc(device, nbytes, stream)

    def external_free(self, ptr: int, stream: int = 0) -> None:
        """Free an ``external_alloc`` allocation from any thread; its device is found from
        the pointer. ValueError for a pointer this Manager did not hand out."""
        self._core.external_free(ptr, stream)

    def external_bytes(self, device: int) -> int:
        """Bytes of ``external_alloc`` allocations alive on ``device``."""
        return self._core.external_bytes(device)

    def reset_floors(self, device: int | None = None) -> None:
        """Set the floor of every VBAR on ``device`` (every device when None) to 0."""
        self._core.reset_floors(device)

    def poll(self, device: int, fresh: bool = False) -> dict:
        """The free-memory figure the budget uses on ``device``: read from the driver now
        if the poll interval has passed (or it never was), or whatever the interval says
        when ``fresh`` (memory given back by others, to count before the next poll is
        due), else the cached one. Returns
        ``time`` (seconds on the backend's clock), ``free_bytes`` (what the driver
        reported) and ``usage_bytes`` (what aimdo had in use then)."""
        return dict(self._core.poll(device, fresh))

    def memory_info(self, device: int) -> tuple[int, int]:
        """(free, total) bytes of ``device`` as the driver reports them now."""
        free, total = self._core.memory_info(device)
        return int(free), int(total)

    def peer_link(self, device: int, peer: int) -> PeerLink:
        """How ``device`` reaches ``peer``'s memory (PeerLink). ValueError for a device
        this Manager does not manage, or a device asked about itself."""
        for which in (device, peer):
            if which not in self.devices:
                raise ValueError(f"device {which} is not one of this Manager's {self.devices}")
        if device == peer:
            raise ValueError(f"device {device} is not its own peer")
        return PeerLink(*self._backend.driver.peer_link(device, peer))

    def vbar_count(self, device: int) -> int:
        return self._core.vbar_count(device)

    def vbars(self, device: int) -> list[_core.Vbar]:
        """The live VBARs of ``device``, most important (last evicted) first."""
        return self._core.vbars(device)

    def report(self, device: int) -> dict:
        """What ``device`` holds now and what it did so far (docs/design.md §6.2b): its
        budget, usage and resident bytes, its counters (``stats``, with ``driver_seconds``
        from ``driver_ns``) and, per VBAR in priority order, its size, resident, pinned and
        watermark bytes. A snapshot: other threads may be faulting meanwhile."""
        stats = self.stats(device)
        report = {
            "device": device,
            "budget_bytes": self.budget_bytes(device),
            "usage_bytes": self.usage_bytes(device),
            "resident_bytes": self.resident_bytes(device),
            **stats,
            "driver_seconds": stats["driver_ns"] / 1e9,
            "vbars": [],
        }
        for vbar in self.vbars(device):
            pages = vbar.residency()
            page = vbar.page_size_bytes
            report["vbars"].append(
                {
                    "size_bytes": vbar.size_bytes,
                    "page_count": len(pages),
                    "resident_bytes": sum(page for resident, _ in pages if resident),
                    "pinned_bytes": sum(page for _, pinned in pages if pinned),
                    "watermark_bytes": vbar.watermark_bytes,
                }
            )
        return report

    def stats(self, device: int) -> dict[str, int]:
        """Counters of ``device``: faults, hits, offloaded, pages_mapped, pages_released,
        evictions, evicted_bytes, synchronizes, polls, transient_retries, oom_retries,
        pages_recycled."""
        return dict(self._core.stats(device))

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Close every VBAR on every device and free what ``external_alloc`` handed out.
        Idempotent. InvalidStateError while PyTorch's allocator allocates through this
        Manager (``aimdo.torch.use_allocator``): PyTorch's tensors live in its memory, so
        it stays open for the life of the process (aimdo closes it at exit). DriverError
        (CUDA_ERROR_NOT_INITIALIZED) in a child made by fork(): the driver resources are
        the parent's, and the child's driver is not initialized (at exit, aimdo leaves
        them to the parent without trying)."""
        if _core.serves_allocator(self._core):
            raise _core.InvalidStateError(
                "this Manager serves PyTorch's CUDA allocator (aimdo.torch.use_allocator): "
                "PyTorch's tensors live in its memory, so it stays open until the process exits"
            )
        self._core.close()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<aimdo.Manager backend={self.backend_name} devices={self.devices} {state}>"
