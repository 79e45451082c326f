"""What SimBackend's arguments mean: device specs, seconds of virtual time, error codes.

Each function checks one kind of argument and turns it into what the native simulator
takes, raising TypeError or ValueError with a message naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ._sizes import parse_size

DEFAULT_DEVICES = "2x24GiB"
DEFAULT_GRANULARITY = 2 << 20
#: Host-to-device bandwidth of a simulated device: about what one H100 of a pair reached
#: from pinned host memory with both copying at once (docs/measurements.md).
DEFAULT_BANDWIDTH = 50e9
#: The simulator's clocks count int64 nanoseconds from 0: virtual time ends here, about
#: 292 years in. Work or waits that would pass it are refused with ValueError.
END_OF_TIME_NS = (1 << 63) - 1

#: A device spec: a capacity (``"24GiB"`` or bytes) or a mapping with keys ``capacity``
#: (required), ``name``, ``granularity`` (bytes or a size string), ``integrated`` and
#: ``bandwidth`` (host-to-device bytes per second).
DeviceSpec = str | int | Mapping

#: One device as the native simulator takes it: (name, capacity bytes, granularity bytes,
#: integrated, host-to-device bytes per second).
NativeSpec = tuple[str, int, int, bool, float]

_ERROR_CODES = {
    "out_of_memory": 2,
    "not_ready": 600,
    "error": 999,
    "invalid_value": 1,
}


def default_spec(
    index: int, capacity: int, granularity: int = DEFAULT_GRANULARITY, integrated: bool = False
) -> NativeSpec:
    return (f"aimdo simulated GPU {index}", capacity, granularity, integrated, DEFAULT_BANDWIDTH)


def parse_devices(devices: str | Iterable[DeviceSpec]) -> list[NativeSpec]:
    """``"2x24GiB"``, ``"24GiB,12GiB"`` or a list of DeviceSpec, as native specs."""
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
    return [_parse_device(index, spec) for index, spec in enumerate(specs)]


def _parse_device(index: int, spec: DeviceSpec) -> NativeSpec:
    if not isinstance(spec, Mapping):
        return default_spec(index, parse_size(spec))
    unknown = set(spec) - {"capacity", "name", "granularity", "integrated", "bandwidth"}
    if unknown:
        raise ValueError(f"device spec {index}: unknown keys {sorted(unknown)}")
    if "capacity" not in spec:
        raise ValueError(f"device spec {index}: 'capacity' is required")
    name, _, granularity, _, bandwidth = default_spec(index, 0)
    capacity = parse_size(spec["capacity"])
    name = str(spec.get("name", name))
    granularity = parse_size(spec.get("granularity", granularity))
    integrated = bool(spec.get("integrated", False))
    bandwidth = spec.get("bandwidth", bandwidth)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
        raise TypeError(f"device spec {index}: bandwidth must be a number of bytes per second")
    if not math.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"device spec {index}: bandwidth must be positive, got {bandwidth}")
    return (name, capacity, granularity, integrated, float(bandwidth))


def error_code(error: str | int) -> int:
    """An injected failure's CUresult: a name (``"out_of_memory"``...) or a code."""
    if isinstance(error, str):
        if error not in _ERROR_CODES:
            raise ValueError(
                f"error must be one of {sorted(_ERROR_CODES)} or a code, got {error!r}"
            )
        return _ERROR_CODES[error]
    if isinstance(error, int) and not isinstance(error, bool):
        return error
    raise TypeError(f"error must be a name or an int code, not {type(error).__name__}")


def nanoseconds(seconds: float, what: str = "seconds") -> int:
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
        raise ValueError(
            f"{what} of {seconds} s is past the end of the simulator's virtual "
            f"time ({END_OF_TIME_NS} ns, about 292 years)"
        )
    return round(ns)
