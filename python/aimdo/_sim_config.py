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


# --- links -------------------------------------------------------------------------------

#: Native topology: (peer link matrix of (bytes/s, latency ns, rank), empty for none; host
#: link of each device, empty for each its own; host latency ns).
NativeTopology = tuple[list[list[tuple[float, int, int]]], list[int], int]

NO_TOPOLOGY: NativeTopology = ([], [], 0)

#: Machines as the simulator models their links. Each preset sets every device's host
#: bandwidth (``host_bandwidth``, bytes/s, over any ``bandwidth`` the device specs give:
#: pass a mapping topology to keep those), whether the devices share one host link
#: (``shared_host_link``), and the peer link between any two devices (``peer``: bandwidth
#: bytes/s, latency s), or None where the driver refuses peer access.
PRESETS: dict[str, dict] = {
    # Two H200s of one host joined by NVLink (NV18), as lent here: pinned host-to-device
    # 55.2-55.4 GB/s per GPU and 110 GB/s with both copying at once (independent links);
    # a 1 GiB peer copy GPU0 -> GPU1 390 GB/s (docs/measurements.md, "2 x NVIDIA H200").
    # Latency of a small peer copy over NVLink with P2P on: 1.8-2.3 us (p2pBandwidth-
    # LatencyTest, github.com/NVIDIA/cuda-samples/issues/230).
    "h200-nvlink": {
        "host_bandwidth": 55.3e9,
        "shared_host_link": False,
        "peer": {"bandwidth": 390e9, "latency": 2e-6},
    },
    # RTX 4090s on a consumer board, each in an x8 slot of the CPU's 16 lanes (x8/x8):
    # nvbandwidth measured 23.9-26.4 GB/s host-to-device per 4090 at x16
    # (github.com/NVIDIA/nvbandwidth/issues/15); no x8 measurement was found, so half of
    # 25 GB/s, with the two halves independent. GeForce cards have no P2P ("GeForce cards
    # don't support GPU Direct P2P", github.com/NVIDIA/nccl/issues/1309).
    "rtx4090-pcie": {
        "host_bandwidth": 12.5e9,
        "shared_host_link": False,
        "peer": None,
    },
    # The same cards behind one x16 link (a PCIe switch or chipset): 25 GB/s for one card
    # alone, shared when both copy (same sources).
    "rtx4090-pcie-shared": {
        "host_bandwidth": 25e9,
        "shared_host_link": True,
        "peer": None,
    },
}

#: A topology: a preset name, or a mapping with keys ``peers`` (a device-count square
#: matrix whose entries are None for no link or a mapping with ``bandwidth`` in bytes/s,
#: and optionally ``latency`` in seconds and ``rank``), ``host_links`` (a list giving each
#: device's host link number; devices with the same number share one) and
#: ``host_latency`` (seconds per host-to-device copy).
Topology = str | Mapping | None


def parse_topology(
    topology: Topology, specs: list[NativeSpec]
) -> tuple[NativeTopology, list[NativeSpec]]:
    """The native topology, and the device specs with a preset's host bandwidth."""
    if topology is None:
        return NO_TOPOLOGY, specs
    count = len(specs)
    if isinstance(topology, str):
        if topology not in PRESETS:
            raise ValueError(f"topology: no preset named {topology!r}; known: {sorted(PRESETS)}")
        preset = PRESETS[topology]
        peer = preset["peer"]
        peers = []
        if peer is not None:
            link = (float(peer["bandwidth"]), nanoseconds(peer["latency"], "latency"), 0)
            peers = [[(0.0, 0, 0) if i == j else link for j in range(count)] for i in range(count)]
        host_links = [0] * count if preset["shared_host_link"] else []
        specs = [(*spec[:4], float(preset["host_bandwidth"])) for spec in specs]
        return (peers, host_links, 0), specs
    if not isinstance(topology, Mapping):
        raise TypeError(f"topology must be a preset name or a mapping, got {topology!r}")
    unknown = set(topology) - {"peers", "host_links", "host_latency"}
    if unknown:
        raise ValueError(f"topology: unknown keys {sorted(unknown)}")
    rows = topology.get("peers") or []
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError("topology: peers must be a list of rows")
    peers = [_parse_peer_row(i, row, count) for i, row in enumerate(rows)]
    if peers and len(peers) != count:
        raise ValueError(f"topology: peers has {len(peers)} rows for {count} devices")
    host_links = topology.get("host_links") or []
    if isinstance(host_links, (str, bytes)) or not isinstance(host_links, Iterable):
        raise TypeError("topology: host_links must be a list of link numbers")
    host_links = list(host_links)
    if host_links and (
        len(host_links) != count
        or any(isinstance(n, bool) or not isinstance(n, int) for n in host_links)
        or any(not 0 <= n < count for n in host_links)
    ):
        raise ValueError(
            f"topology: host_links must give each of the {count} devices a link number in "
            f"[0, {count}), got {host_links!r}"
        )
    latency = nanoseconds(topology.get("host_latency", 0), "host_latency")
    return (peers, host_links, latency), specs


def _parse_peer_row(i: int, row, count: int) -> list[tuple[float, int, int]]:
    if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
        raise TypeError(f"topology: peers row {i} must be a list")
    row = list(row)
    if len(row) != count:
        raise ValueError(f"topology: peers row {i} has {len(row)} entries for {count} devices")
    out = []
    for j, link in enumerate(row):
        if link is None:
            out.append((0.0, 0, 0))
            continue
        if i == j:
            raise ValueError(f"topology: device {i} cannot be its own peer (peers[{i}][{i}])")
        if not isinstance(link, Mapping) or "bandwidth" not in link:
            raise TypeError(f"topology: peers[{i}][{j}] must be None or a mapping with 'bandwidth'")
        unknown = set(link) - {"bandwidth", "latency", "rank"}
        if unknown:
            raise ValueError(f"topology: peers[{i}][{j}]: unknown keys {sorted(unknown)}")
        bandwidth = link["bandwidth"]
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise TypeError(f"topology: peers[{i}][{j}] bandwidth must be bytes per second")
        if not math.isfinite(bandwidth) or bandwidth <= 0:
            raise ValueError(f"topology: peers[{i}][{j}] bandwidth must be positive")
        rank = link.get("rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < 1 << 31:
            raise ValueError(f"topology: peers[{i}][{j}] rank must be a non-negative int")
        latency = nanoseconds(link.get("latency", 0), f"peers[{i}][{j}] latency")
        out.append((float(bandwidth), latency, rank))
    return out
