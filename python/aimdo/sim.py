"""The simulator backend: N deterministic simulated GPUs, no GPU needed.

``SimBackend`` models what aimdo needs from a GPU driver (address reservations,
physical allocations, mappings, access rights, per-thread current context, free
memory) and enforces the real driver's rules, so code that passes on the simulator
misuses nothing the real driver would refuse. It adds powers no real GPU has: memory
used by others on demand (``add_external_usage``), failures injected on chosen driver
operations (``fail``), a virtual clock per device (``now``, ``advance``) and a report
of everything still allocated (``leaks``).

Pass one to ``aimdo.Manager(backend=...)``; ``backend="sim"`` makes a default one
(two devices of 24 GiB).

A simulator belongs to the process that created it. In a child made by ``os.fork()`` it
answers every driver call with CUDA_ERROR_NOT_INITIALIZED, as the CUDA driver does
(aimdo raises ``aimdo.DriverError``), views of its memory are refused the same way, and
views the child inherited no longer reach the parent's pages (they read zeros).
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Union

from . import _core
from ._sizes import parse_size

__all__ = ["SimBackend", "SimHold", "DeviceSpec", "COST_NAMES", "END_OF_TIME_NS", "live_backends"]

DEFAULT_DEVICES = "2x24GiB"
DEFAULT_GRANULARITY = 2 << 20
#: Host-to-device bandwidth of a simulated device: about what one H100 of a pair reached
#: from pinned host memory with both copying at once (shared/h100-measurements.md).
DEFAULT_BANDWIDTH = 50e9
#: The simulator's clocks count int64 nanoseconds from 0: virtual time ends here, about
#: 292 years in. Work or waits that would pass it are refused with ValueError.
END_OF_TIME_NS = (1 << 63) - 1

#: A device spec: a capacity (``"24GiB"`` or bytes) or a mapping with keys ``capacity``
#: (required), ``name``, ``granularity`` (bytes or a size string), ``integrated`` and
#: ``bandwidth`` (host-to-device bytes per second).
DeviceSpec = Union[str, int, Mapping]

#: Driver functions whose simulated cost ``SimBackend(costs=...)`` can set.
COST_NAMES = ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "cuMemRelease",
              "cuMemGetInfo", "cuCtxSynchronize", "cuMemAddressReserve", "cuMemAddressFree",
              "cuMemAllocAsync", "cuMemFreeAsync")

_ERROR_CODES = {
    "out_of_memory": 2,
    "not_ready": 600,
    "error": 999,
    "invalid_value": 1,
}

_live: "weakref.WeakSet[SimBackend]" = weakref.WeakSet()


def live_backends() -> list["SimBackend"]:
    """Simulators alive in this process (the test suite checks each for leaks)."""
    return list(_live)


def _detach_from_parent() -> None:
    """Runs in every child made by os.fork() (multiprocessing's fork start method too):
    the child's views and tensors of real-bytes simulator memory stop sharing pages with
    the parent, so nothing the child writes through them reaches the parent's data."""
    for backend in list(_live):
        backend._driver.detach_from_parent()


os.register_at_fork(after_in_child=_detach_from_parent)


def _parse_devices(devices: str | Iterable[DeviceSpec]) -> list[tuple[str, int, int, bool, float]]:
    if isinstance(devices, str):
        text = devices.strip()
        if "x" in text.lower() and text.lower().split("x", 1)[0].strip().isdigit():
            count_text, size_text = text.lower().split("x", 1)
            count = int(count_text)
            if count < 1:
                raise ValueError(f"{devices!r}: a simulator needs at least one device")
            specs: list[DeviceSpec] = [size_text.strip()] * count
        else:
            specs = [part for part in text.split(",")]
    else:
        specs = list(devices)
    if not specs:
        raise ValueError("a simulator needs at least one device")
    out = []
    for index, spec in enumerate(specs):
        name = f"aimdo simulated GPU {index}"
        granularity = DEFAULT_GRANULARITY
        integrated = False
        bandwidth = DEFAULT_BANDWIDTH
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"capacity", "name", "granularity", "integrated", "bandwidth"}
            if unknown:
                raise ValueError(f"device spec {index}: unknown keys {sorted(unknown)}")
            if "capacity" not in spec:
                raise ValueError(f"device spec {index}: 'capacity' is required")
            capacity = parse_size(spec["capacity"])
            name = str(spec.get("name", name))
            granularity = parse_size(spec.get("granularity", granularity))
            integrated = bool(spec.get("integrated", False))
            bandwidth = spec.get("bandwidth", bandwidth)
            if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
                raise TypeError(f"device spec {index}: bandwidth must be a number of bytes per second")
            if not math.isfinite(bandwidth) or bandwidth <= 0:
                raise ValueError(f"device spec {index}: bandwidth must be positive, got {bandwidth}")
        else:
            capacity = parse_size(spec)
        out.append((name, capacity, granularity, integrated, float(bandwidth)))
    return out


class _HostView:
    """ctypes arrays over simulator memory, of a subclass that can carry its owner."""

    _types: dict[int, type] = {}

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
            f"[{address:#x}, +{nbytes}) is not mapped with access set: fault the allocation first")
    array = _HostView.of_size(nbytes).from_address(address)
    array.owner = driver  # the memory lives as long as the simulator
    return memoryview(array).cast("B")


class SimHold:
    """A driver call held open by ``SimBackend.hold``. ``wait_arrived`` waits (at most
    ``timeout`` seconds of real time) for the call to arrive; ``release`` lets it go on.
    As a context manager it releases on exit, so a failing test never leaves a thread
    blocked."""

    def __init__(self, driver, hold_id: int, operation: str, device: int):
        self._driver = driver
        self._id = hold_id
        self.operation = operation
        self.device = device

    def wait_arrived(self, timeout: float = 30.0) -> bool:
        return self._driver.wait_held(self._id, _nanoseconds(timeout, "timeout"))

    def release(self) -> None:
        self._driver.release_hold(self._id)

    def __enter__(self) -> "SimHold":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class SimBackend:
    """Simulated GPUs. ``devices`` is ``"2x24GiB"``, ``"24GiB,12GiB"`` or a list of
    specs (see ``DeviceSpec``); ``seed`` makes runs with fault rates reproducible;
    ``free_delay`` (seconds of virtual time) delays the reuse of stream-ordered frees;
    ``record`` keeps the event log from the start (see ``log``); ``real_bytes`` backs
    mapped pages with host memory really mapped at the VBAR's addresses (see ``view``);
    ``costs`` sets the virtual time driver functions take, in seconds, by name (see
    ``COST_NAMES``; the defaults are from shared/h100-measurements.md).

    Thread-safe: every method may be called from any thread.
    """

    def __init__(
        self,
        devices: str | Iterable[DeviceSpec] = DEFAULT_DEVICES,
        *,
        seed: int = 0,
        free_delay: float = 0.0,
        record: bool = False,
        real_bytes: bool = False,
        costs: Mapping[str, float] | None = None,
    ):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        free_delay_ns = _nanoseconds(free_delay, "free_delay")
        self._specs = _parse_devices(devices)
        if costs is None:
            costs = {}
        if not isinstance(costs, Mapping):
            raise TypeError("costs must map driver function names to seconds")
        unknown = sorted(set(costs) - set(COST_NAMES))
        if unknown:
            raise ValueError(f"costs: no simulated cost named {unknown}; known: {list(COST_NAMES)}")
        costs_ns = {name: _nanoseconds(seconds, f"costs[{name!r}]")
                    for name, seconds in costs.items()}
        self._driver = _core.SimDriver(self._specs, seed, free_delay_ns, bool(record),
                                       bool(real_bytes), costs_ns)
        _live.add(self)

    # -- what it is -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return "sim"

    @property
    def seed(self) -> int:
        return self._driver.seed

    @property
    def device_count(self) -> int:
        return len(self._specs)

    @property
    def driver(self) -> _core.SimDriver:
        """The native driver object (what ``aimdo.Manager`` runs on)."""
        return self._driver

    def __repr__(self) -> str:
        caps = ", ".join(f"{spec[1] / (1 << 30):g}GiB" for spec in self._specs)
        return f"SimBackend(devices=[{caps}], seed={self.seed})"

    # -- other users of the device ----------------------------------------------------
    def add_external_usage(self, device: int, nbytes: int | str) -> None:
        """Someone else (another process, PyTorch) takes ``nbytes`` on ``device``.
        ValueError when the device has less than that free."""
        self._driver.add_external_usage(device, parse_size(nbytes))

    def remove_external_usage(self, device: int, nbytes: int | str) -> None:
        """Give back external usage added earlier. ValueError for more than was added."""
        self._driver.remove_external_usage(device, parse_size(nbytes))

    def external_usage(self, device: int) -> int:
        return self._driver.external_usage(device)

    # -- what the driver sees ---------------------------------------------------------
    def physical_bytes(self, device: int) -> int:
        """Bytes of physical allocations alive on ``device`` (aimdo's VBAR pages)."""
        return self._driver.physical_bytes(device)

    def used_bytes(self, device: int) -> int:
        """All memory the device counts as used: physical, stream-ordered and external."""
        return self._driver.used_bytes(device)

    def is_accessible(self, address: int, nbytes: int) -> bool:
        """True when every byte of ``[address, address + nbytes)`` is mapped with access set."""
        return self._driver.is_accessible(address, nbytes)

    @property
    def real_bytes(self) -> bool:
        return self._driver.real_bytes

    def view(self, address, nbytes: int | None = None) -> memoryview:
        """A writable memoryview of ``nbytes`` at ``address`` (or of a whole Allocation),
        in real-bytes mode. The range must be mapped with access set (between a fault and
        its unpin, for a VBAR's allocation): otherwise aimdo.InvalidStateError. A view
        kept after its pages are unmapped never crashes: it reads a trap pattern (0x5A),
        not the data, and writes through it are reported by ``violations()``. New pages
        hold a poison pattern (0xA5), as real GPU memory holds whatever was there.
        aimdo.DriverError (CUDA_ERROR_NOT_INITIALIZED) in a child made by fork()."""
        if nbytes is None:
            address, nbytes = address.address, address.size
        return host_view(self._driver, address, nbytes)

    def violations(self) -> list[str]:
        """Writes made through views after their pages were unmapped (real-bytes mode)."""
        return list(self._driver.violations())

    def leaks(self) -> list[str]:
        """One readable line per live reservation, physical allocation, mapping and
        stream-ordered allocation; empty when nothing leaks."""
        return list(self._driver.leaks())

    # -- fault injection --------------------------------------------------------------
    @staticmethod
    def operations() -> list[str]:
        """Driver operations that ``fail`` and ``call_count`` know, by CUDA function name."""
        return list(_core.SimDriver.operation_names())

    def fail(
        self,
        operation: str,
        *,
        device: int | None = None,
        error: str | int = "out_of_memory",
        skip: int = 0,
        count: int = 1,
    ) -> None:
        """Make the next ``count`` calls of ``operation`` (on ``device``, or any device)
        fail after ``skip`` matching calls succeed. ``error`` is ``"out_of_memory"``,
        ``"not_ready"`` (transient: aimdo retries it), ``"error"``, ``"invalid_value"``
        or a CUresult code. The error aimdo raises is flagged ``injected``."""
        code = _error_code(error)
        self._driver.fail(operation, -1 if device is None else device, code, skip, count)

    def clear_failures(self) -> None:
        self._driver.clear_failures()

    def call_count(self, operation: str, device: int | None = None) -> int:
        """Calls of ``operation`` seen so far on ``device`` (all devices when None),
        injected failures included."""
        return self._driver.call_count(operation, -1 if device is None else device)

    def hold(self, operation: str, device: int) -> "SimHold":
        """Hold the next call of ``operation`` on ``device`` open until released: it
        blocks before taking any of the simulator's locks. For tests that need a driver
        call in flight (see SimHold)."""
        return SimHold(self._driver, self._driver.hold(operation, device), operation, device)

    def fail_rate(
        self,
        operation: str,
        probability: float,
        *,
        device: int | None = None,
        error: str | int = "out_of_memory",
    ) -> None:
        """Fail each call of ``operation`` (on ``device``, or any) with ``probability``,
        drawn from a generator seeded by the simulator's seed: the same calls fail again
        for the same seed and call sequence. Lasts until ``clear_failures``."""
        code = _error_code(error)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)):
            raise TypeError("probability must be a number")
        self._driver.fail_rate(operation, -1 if device is None else device, code, float(probability))

    # -- virtual time -----------------------------------------------------------------
    def now(self, device: int | None = None) -> float:
        """Seconds on ``device``'s virtual clock (the moment its queued compute and driver
        calls are done; ``copy_engine_now`` tells its copies), or
        on the host's clock when ``device`` is None (it moves when the host waits for a
        device, and with ``advance``)."""
        if device is None:
            return self._driver.host_now_ns() / 1e9
        if not 0 <= device < self.device_count:
            raise ValueError(f"the simulator has no device {device}")
        return self._driver.now_ns(device) / 1e9

    def advance(self, seconds: float, device: int | None = None) -> None:
        """Move ``device``'s clock (every clock, the host's too, when None) forward.
        ValueError when that would take any of them past the end of virtual time (about
        292 years, ``END_OF_TIME_NS``); then no clock moves. ``compute``,
        ``copy_to_device`` and the async ones refuse work that would end past it alike."""
        self._driver.advance(-1 if device is None else device, _nanoseconds(seconds))

    def copy_to_device(self, device: int, nbytes: int) -> None:
        """Declare a host-to-device copy: the device's clock moves by nbytes / bandwidth."""
        self._driver.copy_to_device(device, nbytes)

    def compute(self, device: int, seconds: float) -> None:
        """Declare ``seconds`` of compute queued on ``device``."""
        self._driver.compute(device, _nanoseconds(seconds))

    def copy_async(self, device: int, nbytes: int, after: float = 0.0) -> float:
        """Queue a host-to-device copy on ``device``'s copy engine, which runs beside its
        compute: it starts when the copies queued before it are done and not before
        ``after`` (seconds of virtual time: an event it waits for). Returns when it is done."""
        return self._driver.copy_async(device, nbytes, _nanoseconds(after)) / 1e9

    def compute_async(self, device: int, seconds: float, after: float = 0.0) -> float:
        """Queue ``seconds`` of compute on ``device``'s compute engine, starting after the
        work queued before it and not before ``after``. Returns when it is done."""
        return self._driver.compute_async(device, _nanoseconds(seconds), _nanoseconds(after)) / 1e9

    def copy_engine_now(self, device: int) -> float:
        """Seconds of virtual time when ``device``'s queued copies are done."""
        return self._driver.copy_engine_now_ns(device) / 1e9

    def pending_free_bytes(self, device: int) -> int:
        """Stream-ordered frees on ``device`` that are not reusable yet (see free_delay)."""
        return self._driver.pending_free_bytes(device)

    # -- event log --------------------------------------------------------------------
    def record(self, on: bool = True) -> None:
        """Start (or stop) keeping the event log."""
        self._driver.set_recording(bool(on))

    def log(self) -> str:
        """The event log: one line per driver call (arguments, result, outputs) and per
        use of a simulator power, in call order. Addresses are relative to their device's
        region, so the same seed and the same calls give the same text, byte for byte."""
        return self._driver.log()

    def replay(self, log: str) -> list[str]:
        """Re-issue every call of ``log`` on a fresh simulator with this one's devices,
        seed and options; return the lines whose result differs (empty: reproduced),
        each as ``"line N: logged '...', replayed '...'"``. Blank lines are skipped.

        A line that is not as the simulator writes it (a missing, extra or repeated
        field, a number that does not read or is out of range for its type, an unknown
        name) or that a simulator power refuses is a ValueError naming the line, by
        number and text; TypeError when ``log`` is not a str."""
        if not isinstance(log, str):
            raise TypeError(f"log must be a str, not {type(log).__name__}")
        try:
            log.encode("utf-8")
        except UnicodeEncodeError as error:
            number = log.count("\n", 0, error.start) + 1
            text = log.split("\n")[number - 1]
            raise ValueError(f"cannot replay log line {number} ({text[:200]!r}): "
                             "it is not valid text (it holds a lone surrogate)") from None
        return list(self._driver.replay(log))


def _error_code(error: str | int) -> int:
    if isinstance(error, str):
        if error not in _ERROR_CODES:
            raise ValueError(f"error must be one of {sorted(_ERROR_CODES)} or a code, got {error!r}")
        return _ERROR_CODES[error]
    if isinstance(error, int) and not isinstance(error, bool):
        return error
    raise TypeError(f"error must be a name or an int code, not {type(error).__name__}")


def _nanoseconds(seconds: float, what: str = "seconds") -> int:
    """``seconds`` as int nanoseconds of virtual time. TypeError for what is not a number;
    ValueError for a NaN, a negative value or one past END_OF_TIME_NS."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number of seconds")
    if (isinstance(seconds, float) and not math.isfinite(seconds)) or seconds < 0:
        raise ValueError(f"{what} must be finite and not negative, got {seconds}")
    # An int is scaled exactly (it may be too large for a float); a float's product is
    # inf past about 1.8e299 s, which the range check below refuses like any other.
    ns = seconds * 1_000_000_000 if isinstance(seconds, int) else seconds * 1e9
    if ns > END_OF_TIME_NS:
        raise ValueError(f"{what} of {seconds} s is past the end of the simulator's virtual time "
                         f"({END_OF_TIME_NS} ns, about 292 years)")
    return round(ns)
