"""The simulator with the adaptors SimBackend puts over it, and replay on a fresh one.

A SimBackend's driver is a stack of native Drivers, each one concern (cpp/adaptors/,
cpp/sim/), sharing one event log:

    RecordingDriver    writes each call it sees to the log, while the log records
      FailingDriver    counts each call, fails those asked for; logs fail/fail_rate/clear
        SimDriver      the simulated GPUs; logs external usage, advance, compute, copies

The adaptors wrap any Driver: ``aimdo.sim.Recording`` puts a recorder over the CUDA
backend, and ``SimBackend.replay`` replays what it wrote on a fresh stack made here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _core
from ._sim_config import NO_TOPOLOGY, NativeSpec, NativeTopology, default_spec


class SimStack:
    """One simulator and its adaptors. ``driver`` (the recorder) is what a Manager runs on;
    ``gpu``, ``failures`` and ``events`` are the layers' own objects, for their powers."""

    def __init__(
        self,
        specs: list[NativeSpec],
        *,
        seed: int,
        free_delay_ns: int,
        real_bytes: bool,
        costs_ns: dict[str, int],
        topology: NativeTopology = NO_TOPOLOGY,
    ):
        self.events = _core.EventLog()
        self.gpu = _core.SimDriver(
            specs, free_delay_ns, real_bytes, costs_ns, self.events, topology
        )
        self.failures = _core.FailingDriver(self.gpu, seed, self.events)
        self.driver = _core.RecordingDriver(self.failures, self.events, self.gpu.address_naming())


@dataclass
class ReplayReport:
    """What a replay found. ``differences``: ``"line N: logged '...', replayed '...'"``
    for each line that did not come out as logged (empty: reproduced). ``notes``: values
    the recording machine reported about itself (free and total memory) that the
    simulator answered otherwise; listed for a log recorded on another backend only, where
    they are not differences."""

    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def replay(log: str, specs: list[NativeSpec], **options) -> ReplayReport:
    """Replays ``log`` on a fresh SimStack built with ``options`` and the devices its header
    describes (``specs`` where they are the same devices, or where it has no header)."""
    _, logged, line_number, line = _core.read_log_header(log)
    same = len(logged) == len(specs) and all(
        (total, granularity, integrated) == spec[1:4]
        for (total, granularity, integrated), spec in zip(logged, specs, strict=True)
    )
    if logged and not same:
        specs = [
            default_spec(index, total, granularity, integrated)
            for index, (total, granularity, integrated) in enumerate(logged)
        ]
    try:
        stack = SimStack(specs, **options)
    except ValueError as error:
        raise ValueError(
            f"cannot replay log line {line_number} ('{line[:200]}'): the simulator "
            f"cannot have the devices its header describes: {error}"
        ) from None
    differences, notes = _core.replay_on_simulator(log, stack.driver, stack.failures, stack.gpu)
    return ReplayReport(list(differences), list(notes))
