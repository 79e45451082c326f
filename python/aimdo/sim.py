"""The simulator backend: N deterministic simulated GPUs, no GPU needed.

``SimBackend`` models what aimdo needs from a GPU driver (address reservations,
physical allocations, mappings, access rights, per-thread current context, free
memory) and enforces the real driver's rules, so code that passes on the simulator
misuses nothing the real driver would refuse. It adds powers no real GPU has: memory
used by others on demand (``add_external_usage``), failures injected on chosen driver
operations (``fail``), a virtual clock per device (``now``, ``advance``) and a report
of everything still allocated (``leaks``).

Pass one to ``aimdo.Manager(backend=...)``; ``backend="sim"`` makes a default one
(two devices of 24 GiB). Its driver is the simulator under two adaptors that work on any
backend (aimdo._sim_stack): one keeps the event log (``log``, ``replay``), one counts
calls and injects failures. ``Recording`` puts the first over any backend, so that a run
on real GPUs replays here (``replay``; see aimdo.recording).

A simulator belongs to the process that created it. In a child made by ``os.fork()`` it
answers every driver call with CUDA_ERROR_NOT_INITIALIZED, as the CUDA driver does
(aimdo raises ``aimdo.DriverError``), views of its memory are refused the same way, and
views the child inherited no longer reach the parent's pages (they read zeros).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from . import _core
from ._host_view import host_view
from ._peer import PeerLink
from ._sim_config import (
    DEFAULT_DEVICES,
    END_OF_TIME_NS,
    DeviceSpec,
    Topology,
    error_code,
    nanoseconds,
    parse_devices,
    parse_topology,
)
from ._sim_config import (
    PRESETS as TOPOLOGY_PRESETS,
)
from ._sim_stack import ReplayReport, SimStack, replay
from ._sizes import parse_size
from .recording import Recording

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "COST_NAMES",
    "DEFAULT_COSTS",
    "END_OF_TIME_NS",
    "DeviceSpec",
    "PeerLink",
    "Recording",
    "ReplayReport",
    "SimBackend",
    "SimHold",
    "TOPOLOGY_PRESETS",
    "Topology",
]

#: The operations table (cpp/operations/operations.hpp), one tuple per driver operation:
#: (CUDA name, Driver method, default cost in ns or None, log arguments, log outputs).
_OPERATIONS = _core.operations()
#: Driver functions whose simulated cost ``SimBackend(costs=...)`` can set.
COST_NAMES = tuple(name for name, _, cost_ns, _, _ in _OPERATIONS if cost_ns is not None)
#: Their default costs in seconds (measured on H100s: docs/measurements.md; those of
#: cuMemcpyHtoDAsync and the event functions are launch costs, not measured).
DEFAULT_COSTS = {
    name: cost_ns / 1e9 for name, _, cost_ns, _, _ in _OPERATIONS if cost_ns is not None
}

#: Simulators alive in this process, for the at-fork handler below.
_live: weakref.WeakSet[SimBackend] = weakref.WeakSet()


def _detach_from_parent() -> None:
    """Runs in every child made by os.fork() (multiprocessing's fork start method too):
    the child's views and tensors of real-bytes simulator memory stop sharing pages with
    the parent, so nothing the child writes through them reaches the parent's data."""
    for backend in list(_live):
        backend._stack.gpu.detach_from_parent()


os.register_at_fork(after_in_child=_detach_from_parent)


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
        return self._driver.wait_held(self._id, nanoseconds(timeout, "timeout"))

    def release(self) -> None:
        self._driver.release_hold(self._id)

    def __enter__(self) -> Self:
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
    ``COST_NAMES``; the defaults, ``DEFAULT_COSTS``, are from docs/measurements.md);
    ``topology`` models the links (a name from ``TOPOLOGY_PRESETS``, such as
    ``"h200-nvlink"`` or ``"rtx4090-pcie"``, or a mapping, see ``Topology``): by default each
    device has its own host link and no device reaches another's memory.

    Its driver is the simulator under two adaptors (see aimdo._sim_stack): one records
    the calls (``log``, ``replay``), one counts them and fails chosen ones (``fail``).

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
        topology: Topology = None,
    ):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        free_delay_ns = nanoseconds(free_delay, "free_delay")
        native_topology, self._specs = parse_topology(topology, parse_devices(devices))
        if costs is None:
            costs = {}
        if not isinstance(costs, Mapping):
            raise TypeError("costs must map driver function names to seconds")
        unknown = sorted(set(costs) - set(COST_NAMES))
        if unknown:
            raise ValueError(f"costs: no simulated cost named {unknown}; known: {list(COST_NAMES)}")
        costs_ns = {
            name: nanoseconds(seconds, f"costs[{name!r}]") for name, seconds in costs.items()
        }
        self._options = {
            "seed": seed,
            "free_delay_ns": free_delay_ns,
            "real_bytes": bool(real_bytes),
            "costs_ns": costs_ns,
            "topology": native_topology,
        }
        self._stack = SimStack(self._specs, **self._options)
        if record:
            self._stack.driver.start()
        _live.add(self)

    def twin(self) -> SimBackend:
        """A new simulator of the same devices, links, costs and seed, with nothing on it,
        no real bytes and no log: for predictions of what runs on this one."""
        twin = SimBackend.__new__(SimBackend)
        twin._specs = list(self._specs)
        twin._options = {**self._options, "real_bytes": False}
        twin._stack = SimStack(twin._specs, **twin._options)
        _live.add(twin)
        return twin

    # -- what it is -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return "sim"

    @property
    def seed(self) -> int:
        return self._options["seed"]

    @property
    def device_count(self) -> int:
        return len(self._specs)

    @property
    def driver(self) -> _core.RecordingDriver:
        """The native driver object (what ``aimdo.Manager`` runs on): the simulator under
        its adaptors. An attribute the adaptors lack is the simulator's."""
        return self._stack.driver

    def _address_naming(self) -> _core.AddressNaming:
        """How a log names this simulator's addresses (for aimdo.sim.Recording)."""
        return self._stack.gpu.address_naming()

    def __repr__(self) -> str:
        caps = ", ".join(f"{spec[1] / (1 << 30):g}GiB" for spec in self._specs)
        return f"SimBackend(devices=[{caps}], seed={self.seed})"

    # -- other users of the device ----------------------------------------------------
    def add_external_usage(self, device: int, nbytes: int | str) -> None:
        """Someone else (another process, PyTorch) takes ``nbytes`` on ``device``.
        ValueError when the device has less than that free."""
        self._stack.gpu.add_external_usage(device, parse_size(nbytes))

    def remove_external_usage(self, device: int, nbytes: int | str) -> None:
        """Give back external usage added earlier. ValueError for more than was added."""
        self._stack.gpu.remove_external_usage(device, parse_size(nbytes))

    def external_usage(self, device: int) -> int:
        return self._stack.gpu.external_usage(device)

    # -- what the driver sees ---------------------------------------------------------
    def physical_bytes(self, device: int) -> int:
        """Bytes of physical allocations alive on ``device`` (aimdo's VBAR pages)."""
        return self._stack.gpu.physical_bytes(device)

    def used_bytes(self, device: int) -> int:
        """All memory the device counts as used: physical, stream-ordered and external."""
        return self._stack.gpu.used_bytes(device)

    def adopt(self, device: int, tensor) -> None:
        """Take a contiguous CPU ``torch.Tensor``'s memory as ``device``'s, so that a
        device-to-device or host-to-device copy (``Driver.copy``, ``Driver.copy_from_host``)
        may write it: on the simulator, what a CUDA tensor is on a real GPU (aimdo.torch
        adopts its staging buffers so). It is given back when the tensor is freed.
        TypeError for anything else; ValueError for an empty tensor or memory adopted
        already."""
        import torch  # only aimdo.torch, which has it, adopts

        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            raise TypeError("adopt takes a CPU torch.Tensor")
        if not tensor.is_contiguous() or tensor.nbytes == 0:
            raise ValueError("adopt takes a contiguous, non-empty tensor")
        pointer = tensor.data_ptr()
        self._stack.gpu.adopt(device, pointer, tensor.nbytes)
        weakref.finalize(tensor, self._stack.gpu.disown, device, pointer)

    def is_accessible(self, address: int, nbytes: int, from_device: int | None = None) -> bool:
        """True when every byte of ``[address, address + nbytes)`` is mapped with access set
        for its own device (or, given ``from_device``, for that device: a peer)."""
        return self._stack.gpu.is_accessible(
            address, nbytes, -1 if from_device is None else from_device
        )

    @property
    def real_bytes(self) -> bool:
        return self._stack.gpu.real_bytes

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
        return host_view(self._stack.gpu, address, nbytes)

    def violations(self) -> list[str]:
        """Writes made through views after their pages were unmapped (real-bytes mode)."""
        return list(self._stack.gpu.violations())

    def leaks(self) -> list[str]:
        """One readable line per live reservation, physical allocation, mapping,
        stream-ordered allocation and event; empty when nothing leaks."""
        return list(self._stack.gpu.leaks())

    # -- fault injection --------------------------------------------------------------
    @staticmethod
    def operations() -> list[str]:
        """Driver operations that ``fail`` and ``call_count`` know, by CUDA function name."""
        return [name for name, *_ in _OPERATIONS]

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
        code = error_code(error)
        self._stack.failures.fail(operation, -1 if device is None else device, code, skip, count)

    def clear_failures(self) -> None:
        self._stack.failures.clear_failures()

    def call_count(self, operation: str, device: int | None = None) -> int:
        """Calls of ``operation`` seen so far on ``device`` (all devices when None),
        injected failures included."""
        return self._stack.failures.call_count(operation, -1 if device is None else device)

    def hold(self, operation: str, device: int) -> SimHold:
        """Hold the next call of ``operation`` on ``device`` open until released: it
        blocks before taking any of the simulator's locks. For tests that need a driver
        call in flight (see SimHold)."""
        return SimHold(self._stack.gpu, self._stack.gpu.hold(operation, device), operation, device)

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
        code = error_code(error)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)):
            raise TypeError("probability must be a number")
        self._stack.failures.fail_rate(
            operation, -1 if device is None else device, code, float(probability)
        )

    # -- virtual time -----------------------------------------------------------------
    def now(self, device: int | None = None) -> float:
        """Seconds on ``device``'s virtual clock (the moment its queued compute and driver
        calls are done; ``copy_engine_now`` tells its copies), or
        on the host's clock when ``device`` is None (it moves when the host waits for a
        device, and with ``advance``)."""
        if device is None:
            return self._stack.gpu.host_now_ns() / 1e9
        if not 0 <= device < self.device_count:
            raise ValueError(f"the simulator has no device {device}")
        return self._stack.gpu.now_ns(device) / 1e9

    def advance(self, seconds: float, device: int | None = None) -> None:
        """Move ``device``'s clock (every clock, the host's too, when None) forward.
        ValueError when that would take any of them past the end of virtual time (about
        292 years, ``END_OF_TIME_NS``); then no clock moves. ``compute``,
        ``copy_to_device`` and the async ones refuse work that would end past it alike."""
        self._stack.gpu.advance(-1 if device is None else device, nanoseconds(seconds))

    def copy_to_device(self, device: int, nbytes: int) -> None:
        """Declare a host-to-device copy: the device's clock moves by nbytes / bandwidth."""
        self._stack.gpu.copy_to_device(device, nbytes)

    def compute(self, device: int, seconds: float) -> None:
        """Declare ``seconds`` of compute queued on ``device``."""
        self._stack.gpu.compute(device, nanoseconds(seconds))

    def copy_async(self, device: int, nbytes: int, after: float = 0.0) -> float:
        """Queue a host-to-device copy on ``device``'s copy engine, which runs beside its
        compute: it starts when the copies queued before it are done and not before
        ``after`` (seconds of virtual time: an event it waits for). Returns when it is done."""
        return self._stack.gpu.copy_async(device, nbytes, nanoseconds(after)) / 1e9

    def peer_copy_async(self, device: int, peer: int, nbytes: int, after: float = 0.0) -> float:
        """Queue a copy of ``nbytes`` from ``peer``'s memory to ``device``'s on ``device``'s
        copy engine, over the peer link (nbytes / its bandwidth + its latency), starting
        when the copies queued before it are done and not before ``after``. Returns when
        it is done. ValueError where the topology has no link from ``device`` to ``peer``."""
        return self._stack.gpu.peer_copy_async(device, peer, nbytes, nanoseconds(after)) / 1e9

    def peer_link(self, device: int, peer: int) -> PeerLink:
        """How ``device`` reaches ``peer``'s memory, as the driver reports it."""
        return PeerLink(*self._stack.driver.peer_link(device, peer))

    def compute_async(self, device: int, seconds: float, after: float = 0.0) -> float:
        """Queue ``seconds`` of compute on ``device``'s compute engine, starting after the
        work queued before it and not before ``after``. Returns when it is done."""
        return self._stack.gpu.compute_async(device, nanoseconds(seconds), nanoseconds(after)) / 1e9

    def copy_engine_now(self, device: int) -> float:
        """Seconds of virtual time when ``device``'s queued copies are done."""
        return self._stack.gpu.copy_engine_now_ns(device) / 1e9

    def pending_free_bytes(self, device: int) -> int:
        """Stream-ordered frees on ``device`` that are not reusable yet (see free_delay)."""
        return self._stack.gpu.pending_free_bytes(device)

    # -- event log --------------------------------------------------------------------
    def record(self, on: bool = True) -> None:
        """Start (or stop) keeping the event log. The first start writes its header: the
        backend and each device's total memory and granularity."""
        if on:
            self._stack.driver.start()
        else:
            self._stack.driver.stop()

    def log(self) -> str:
        """The event log: its header, then one line per driver call (arguments, result,
        outputs) and per use of a simulator power, in call order. Addresses are relative to
        their device's region, so the same seed and the same calls give the same text,
        byte for byte."""
        return self._stack.events.text()

    def replay(self, log: str) -> list[str]:
        """Re-issue every call of ``log`` on a fresh simulator with this one's seed and
        options and the devices the log's header describes (this one's, if it has none);
        return the lines whose result differs (empty: reproduced), each as
        ``"line N: logged '...', replayed '...'"``. Blank lines are skipped.

        A log this simulator could have written must come out byte for byte. One
        recorded on another backend (``Recording`` over the CUDA backend) must come out
        with the same answer codes, its addresses and handles translated to the
        simulator's (see ``replay_report`` for the free-memory figures that differ).

        A line that is not as a recorder writes it (a missing, extra or repeated field, a
        number that does not read or is out of range for its type, an unknown name) or
        that a simulator power refuses is a ValueError naming the line, by number and
        text; TypeError when ``log`` is not a str."""
        return self.replay_report(log).differences

    def replay_report(self, log: str) -> ReplayReport:
        """What ``replay`` found: its differences, and notes on values the recording
        machine reported about itself that differ here (free memory)."""
        if not isinstance(log, str):
            raise TypeError(f"log must be a str, not {type(log).__name__}")
        try:
            log.encode("utf-8")
        except UnicodeEncodeError as error:
            number = log.count("\n", 0, error.start) + 1
            text = log.split("\n")[number - 1]
            raise ValueError(
                f"cannot replay log line {number} ({text[:200]!r}): "
                "it is not valid text (it holds a lone surrogate)"
            ) from None
        return replay(log, self._specs, **self._options)
