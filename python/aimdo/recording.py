"""Record a run on any backend, to replay it on the simulator.

    recording = aimdo.sim.Recording(aimdo.CudaBackend())
    with aimdo.Manager(recording, [0]) as manager:
        ...                                   # VBARs, faults, evictions, on real GPUs
    differences = aimdo.SimBackend().replay(recording.log())

``Recording`` puts a recording adaptor (cpp/adaptors/recording_driver.hpp) over the
backend's driver: each driver call aimdo makes is written to an event log, after the
call, with the answer it got. The log opens with a header naming the backend and each
device's total memory and granularity, from which the replaying simulator takes its
devices. The backend's own powers (a simulator's external usage, advance, failures) are
not driver calls and are not in this log: a SimBackend made with ``record=True`` logs
those too.

Replay on the simulator translates what differs between two machines by nature: the
recording's addresses and handles become the simulator's (each reservation, physical
allocation, stream-ordered allocation and event is matched with the one the same log line
makes on replay); a host-to-device copy, whose host address is not logged, copies zeros.
A log recorded on another backend is compared by answer codes; the values a device
reported about itself (free memory) are listed as notes (``replay_report``).
"""

from __future__ import annotations

from . import _core

__all__ = ["Recording"]


class Recording:
    """``backend`` (a CudaBackend, a SimBackend) with its driver calls recorded from now on.
    Use it where a backend goes (``aimdo.Manager(recording, ...)``). Thread-safe."""

    def __init__(self, backend):
        driver = getattr(backend, "driver", None)
        if not isinstance(driver, _core.Driver):
            raise TypeError(
                f"Recording needs a backend (CudaBackend, SimBackend), not {type(backend).__name__}"
            )
        self._backend = backend
        self._events = _core.EventLog()
        naming = getattr(backend, "_address_naming", None)
        if naming is not None:
            self._driver = _core.RecordingDriver(driver, self._events, naming())
        else:
            self._driver = _core.RecordingDriver(driver, self._events)
        self._driver.start()

    @property
    def backend(self):
        """The backend recorded."""
        return self._backend

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def driver(self) -> _core.RecordingDriver:
        """The native driver object (what ``aimdo.Manager`` runs on)."""
        return self._driver

    @property
    def device_count(self) -> int:
        return self._backend.device_count

    def log(self) -> str:
        """The event log: its header, then one line per driver call, in the order the calls
        returned."""
        return self._events.text()

    def __repr__(self) -> str:
        return f"Recording({self._backend!r})"
