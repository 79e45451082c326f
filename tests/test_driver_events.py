"""Host-to-device copies and events on the Driver seam: Driver.copy_from_host
(cuMemcpyHtoDAsync) and Driver.event_create, event_record, stream_wait_event,
event_synchronize and event_destroy (cuEventCreate and friends).

The first tests run on both backends: on the simulator with real bytes, on CUDA from
page-locked host memory into a page mapped with the raw driver calls. The rest hold the
simulator to its rules (exact error codes, virtual time, leaks, failure injection, holds,
the event log and replay) and are skipped on CUDA.
"""

from __future__ import annotations

import ctypes
import re
import threading
from types import SimpleNamespace

import aimdo
import pytest
from aimdo import _core
from aimdo.sim import COST_NAMES, DEFAULT_COSTS, Recording, SimBackend
from conftest import BACKEND
from test_real_bytes import CudaBytes

MiB = 1 << 20
G = 2 * MiB  # both backends' minimum granularity
SUCCESS, INVALID_VALUE, INVALID_DEVICE, INVALID_CONTEXT, INVALID_HANDLE = 0, 1, 101, 201, 400
UNKNOWN = 999
NEW_OPERATIONS = (
    "cuMemcpyHtoDAsync",
    "cuEventCreate",
    "cuEventDestroy",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuStreamWaitEvent",
)
FIRST_EVENT = 0xEE01000000000001  # the simulator's first event of device 0


def ok(result):
    assert result[0] == SUCCESS, result
    return result[2] if len(result) > 2 else None


class Mapped:
    """`size` bytes (a multiple of G) of `device`'s memory, mapped with access set by raw
    driver calls, which leave `device` current; close() gives them back in order."""

    def __init__(self, driver, device: int, size: int = G):
        self.driver, self.device, self.size = driver, device, size
        ok(driver.raw_make_current(device))
        self.va = ok(driver.raw_reserve(device, size, G))
        self.handle = ok(driver.raw_create(device, size))
        ok(driver.raw_map(self.va, size, self.handle))
        ok(driver.raw_set_access(self.va, size, device))

    def close(self) -> None:
        ok(self.driver.raw_make_current(self.device))
        ok(self.driver.raw_synchronize(self.device))
        ok(self.driver.raw_unmap(self.va, self.size))
        ok(self.driver.raw_release(self.handle))
        ok(self.driver.raw_free_range(self.va, self.size))


def backend_under_test():
    """A backend of the kind AIMDO_BACKEND names: a simulator with real bytes, or the GPUs."""
    if BACKEND == "sim":
        return SimBackend("2x1GiB", real_bytes=True)
    try:
        return aimdo.CudaBackend()
    except aimdo.DriverError as error:
        pytest.skip(f"no usable CUDA driver: {error}")


class HostBuffer:
    """Host memory holding `data`: page-locked (cuMemHostAlloc) on CUDA, so that the copy
    is asynchronous, in the context current on the calling thread; any host memory on the
    simulator, which reads it during the call."""

    def __init__(self, data: bytes):
        self.size = len(data)
        self._cu = None
        if BACKEND == "cuda":
            from cuda.bindings import driver as cu

            error, self.address = cu.cuMemHostAlloc(self.size, 0)
            assert error == cu.CUresult.CUDA_SUCCESS, error
            self._cu = cu
            ctypes.memmove(self.address, data, self.size)
        else:
            self._buffer = ctypes.create_string_buffer(data, self.size)
            self.address = ctypes.addressof(self._buffer)

    def close(self) -> None:
        if self._cu is not None:
            (error,) = self._cu.cuMemFreeHost(self.address)
            assert error == self._cu.CUresult.CUDA_SUCCESS, error
            self._cu = None


def device_bytes(backend, device: int, address: int, size: int) -> bytes:
    """What device memory [address, address + size) holds, read once the copies are done."""
    if BACKEND == "sim":
        return bytes(backend.view(address, size))
    region = SimpleNamespace(device=device, address=address, size=size)
    return CudaBytes().read(region)


def pattern(size: int) -> bytes:
    return (bytes(range(1, 256)) * (size // 255 + 1))[:size]


def copy_and_wait(driver, page: Mapped, data: bytes, offset: int) -> None:
    """Copies `data` from host memory to `page` + `offset`, records an event after it, makes
    the stream wait for it, waits on the host for it and destroys it."""
    host = HostBuffer(data)
    try:
        driver.copy_from_host(0, page.va + offset, host.address, len(data))
        event = driver.event_create(0)
        driver.event_record(0, event)
        driver.stream_wait_event(0, 0, event)
        driver.event_synchronize(event)
        driver.event_destroy(event)
    finally:
        host.close()


# --- both backends ---------------------------------------------------------------------------


def test_a_host_copy_lands_its_bytes_once_an_event_recorded_after_it_is_done():
    backend = backend_under_test()
    driver = backend.driver
    assert driver.backend_name == BACKEND
    page = Mapped(driver, 0)
    data = pattern(G // 2)
    try:
        copy_and_wait(driver, page, data, G // 4)
        assert device_bytes(backend, 0, page.va + G // 4, len(data)) == data
        if BACKEND == "sim":
            assert backend.violations() == []
    finally:
        page.close()


def test_a_recorded_run_with_copies_and_events_replays_on_a_fresh_simulator():
    recording = Recording(backend_under_test())
    driver = recording.driver
    page = Mapped(driver, 0)
    try:
        copy_and_wait(driver, page, pattern(4096), 8192)
    finally:
        page.close()
    log = recording.log()
    calls = {line.split()[0] for line in log.splitlines()}
    assert set(NEW_OPERATIONS) <= calls, calls
    report = SimBackend("2x1GiB", real_bytes=True).replay_report(log)
    assert report.differences == []


def test_an_event_never_recorded_is_waited_for_at_once():
    driver = backend_under_test().driver
    event = driver.event_create(0)
    try:
        driver.event_synchronize(event)
        driver.stream_wait_event(0, 0, event)
    finally:
        driver.event_destroy(event)


def test_a_null_event_is_an_invalid_handle():
    driver = backend_under_test().driver
    for call, arguments in (
        (driver.event_synchronize, (0,)),
        (driver.event_destroy, (0,)),
        (driver.event_record, (0, 0)),
        (driver.stream_wait_event, (0, 0, 0)),
    ):
        with pytest.raises(aimdo.DriverError, match="CUDA_ERROR_INVALID_HANDLE") as raised:
            call(*arguments)
        assert raised.value.code == INVALID_HANDLE, call


# --- the simulator's rules ---------------------------------------------------------------------


@pytest.mark.sim_only
def test_a_host_copy_is_refused_with_the_drivers_codes():
    backend = SimBackend("2x1GiB", real_bytes=True)
    driver = backend.driver
    own, other = Mapped(driver, 0), Mapped(driver, 1)
    ok(driver.raw_make_current(0))
    no_access = ok(driver.raw_reserve(0, G, G))
    handle = ok(driver.raw_create(0, G))
    ok(driver.raw_map(no_access, G, handle))  # mapped, access never set
    host = ctypes.create_string_buffer(G)
    src = ctypes.addressof(host)
    try:
        ok(driver.raw_copy_from_host(0, own.va, src, G))
        assert driver.raw_copy_from_host(5, own.va, src, 1)[0] == INVALID_DEVICE
        assert driver.raw_copy_from_host(-1, own.va, src, 1)[0] == INVALID_DEVICE
        assert driver.raw_copy_from_host(0, own.va, src, 0)[0] == INVALID_VALUE
        # The copying device's context must be current.
        assert driver.raw_copy_from_host(1, other.va, src, 1)[0] == INVALID_CONTEXT
        # The destination: the device's own memory, mapped with access set, all of it.
        assert driver.raw_copy_from_host(0, other.va, src, 1)[0] == INVALID_VALUE
        assert driver.raw_copy_from_host(0, no_access, src, 1)[0] == INVALID_VALUE
        assert driver.raw_copy_from_host(0, own.va + G - 1, src, 2)[0] == INVALID_VALUE
        assert driver.raw_copy_from_host(0, 0x1000, src, 1)[0] == INVALID_VALUE
        # The source: host memory, not null, not the simulator's own device memory.
        assert driver.raw_copy_from_host(0, own.va, 0, 1)[0] == INVALID_VALUE
        assert driver.raw_copy_from_host(0, own.va, other.va, 1)[0] == INVALID_VALUE
        assert driver.raw_copy_from_host(0, own.va, 2**64 - 1, 2)[0] == INVALID_VALUE
        # Through the guarded method: DriverError naming the CUDA function and the code.
        with pytest.raises(aimdo.DriverError, match="cuMemcpyHtoDAsync of 1 bytes") as raised:
            driver.copy_from_host(0, own.va, 0, 1)
        assert (raised.value.code, raised.value.operation) == (1, "cuMemcpyHtoDAsync")
        assert not raised.value.injected
        with pytest.raises(ValueError):
            driver.copy_from_host(0, own.va, src, -1)
    finally:
        ok(driver.raw_make_current(0))
        ok(driver.raw_unmap(no_access, G))
        ok(driver.raw_release(handle))
        ok(driver.raw_free_range(no_access, G))
        other.close()
        own.close()


@pytest.mark.sim_only
def test_a_host_copy_writes_memory_the_device_adopted():
    torch = pytest.importorskip("torch")
    backend = SimBackend("1x1GiB", real_bytes=True)
    driver = backend.driver
    target = torch.zeros(4096, dtype=torch.uint8)
    backend.adopt(0, target)
    data = pattern(4096)
    host = ctypes.create_string_buffer(data, len(data))
    driver.copy_from_host(0, target.data_ptr() + 100, ctypes.addressof(host), 3996)
    assert bytes(target.numpy()) == bytes(100) + data[:3996]
    ok(driver.raw_make_current(0))
    past_the_end = driver.raw_copy_from_host(0, target.data_ptr() + 1, ctypes.addressof(host), 4096)
    assert past_the_end[0] == INVALID_VALUE


@pytest.mark.sim_only
def test_events_check_their_handles_and_devices():
    backend = SimBackend("2x1GiB")
    driver = backend.driver
    ok(driver.raw_make_current(0))
    first = ok(driver.raw_event_create(0))
    assert first == FIRST_EVENT
    assert driver.raw_event_create(1)[0] == INVALID_CONTEXT
    assert driver.raw_event_create(7)[0] == INVALID_DEVICE
    ok(driver.raw_make_current(1))
    other = ok(driver.raw_event_create(1))
    assert other == 0xEE02000000000001
    assert driver.raw_event_record(0, first)[0] == INVALID_CONTEXT
    # An event is recorded on its own device's streams only; any device may wait for it.
    assert driver.raw_event_record(1, first)[0] == INVALID_HANDLE
    ok(driver.raw_stream_wait_event(1, 0, first))
    ok(driver.raw_stream_wait_event(1, 0, other))
    assert driver.raw_stream_wait_event(0, 0, other)[0] == INVALID_CONTEXT
    assert driver.raw_stream_wait_event(9, 0, first)[0] == INVALID_DEVICE
    # Handles that name no event: none, a stranger's, one not made yet, a device the
    # simulator lacks, a physical allocation's, and one destroyed.
    unknown = [0, 0x1234, FIRST_EVENT + 1, 0xEE05000000000001, 0x1000000000001]
    driver.event_destroy(other)
    unknown.append(other)
    for event in unknown:
        for call, arguments in (
            (driver.event_destroy, (event,)),
            (driver.event_synchronize, (event,)),
            (driver.event_record, (1, event)),
            (driver.stream_wait_event, (1, 0, event)),
        ):
            with pytest.raises(aimdo.DriverError, match="CUDA_ERROR_INVALID_HANDLE") as raised:
                call(*arguments)
            assert raised.value.code == INVALID_HANDLE, hex(event)
    driver.event_destroy(first)


@pytest.mark.sim_only
def test_live_events_are_leaks_until_destroyed():
    backend = SimBackend("2x1GiB")
    driver = backend.driver
    recorded = driver.event_create(0)
    never = driver.event_create(1)
    driver.event_record(0, recorded)
    assert backend.leaks() == [
        "device 0: event 0xee01000000000001 (recorded)",
        "device 1: event 0xee02000000000001 (never recorded)",
    ]
    driver.event_destroy(recorded)
    assert backend.leaks() == ["device 1: event 0xee02000000000001 (never recorded)"]
    driver.event_destroy(never)
    assert backend.leaks() == []


@pytest.mark.sim_only
def test_host_copies_take_the_host_link_and_events_wait_for_them_in_virtual_time():
    """One x16 link shared by two devices (25 GB/s), every driver call free: 25 MB copied
    to device 0 takes 1 ms of its copy engine, the same to device 1 waits for the link, and
    a recorded event's synchronize moves the host and the device to the copy's end."""
    costs = dict.fromkeys(COST_NAMES, 0.0)
    backend = SimBackend("2x1GiB", topology="rtx4090-pcie-shared", costs=costs)
    driver = backend.driver
    size = 25_000_000
    pages = [Mapped(driver, 0, 12 * G), Mapped(driver, 1, 12 * G)]  # 24 MiB each
    host = ctypes.create_string_buffer(1)  # never read: no real bytes
    ms = 1e-3
    events = {}
    try:
        early = driver.event_create(0)
        driver.event_record(0, early)  # before any copy: done at 0
        driver.copy_from_host(0, pages[0].va, ctypes.addressof(host), size)
        driver.copy_from_host(1, pages[1].va, ctypes.addressof(host), size)
        assert backend.copy_engine_now(0) == pytest.approx(1 * ms, rel=1e-9)
        assert backend.copy_engine_now(1) == pytest.approx(2 * ms, rel=1e-9)
        assert backend.now(0) == backend.now(1) == backend.now() == 0
        for device in (0, 1):
            events[device] = driver.event_create(device)
            driver.event_record(device, events[device])
        never = driver.event_create(1)
        driver.event_synchronize(early)
        driver.event_synchronize(never)
        driver.stream_wait_event(0, 0, events[1])  # orders nothing in virtual time
        assert backend.now(0) == backend.now(1) == backend.now() == 0
        driver.event_synchronize(events[1])
        assert backend.now(1) == pytest.approx(2 * ms, rel=1e-9)
        assert backend.now() == pytest.approx(2 * ms, rel=1e-9)
        assert backend.now(0) == 0
        driver.event_synchronize(events[0])
        assert backend.now(0) == pytest.approx(1 * ms, rel=1e-9)
        assert backend.now() == pytest.approx(2 * ms, rel=1e-9)  # the host waited longer
        for event in (early, never, *events.values()):
            driver.event_destroy(event)
    finally:
        for page in pages:
            page.close()


@pytest.mark.sim_only
def test_the_new_calls_cost_their_launch_on_the_devices_clock():
    assert set(NEW_OPERATIONS) <= set(COST_NAMES)
    assert DEFAULT_COSTS["cuMemcpyHtoDAsync"] == pytest.approx(2e-6)
    assert DEFAULT_COSTS["cuEventRecord"] == pytest.approx(1e-6)
    backend = SimBackend("1x1GiB", costs={"cuEventCreate": 5e-6, "cuEventDestroy": 7e-6})
    driver = backend.driver
    event = driver.event_create(0)
    assert backend.now(0) == pytest.approx(5e-6, rel=1e-9)
    driver.event_record(0, event)
    driver.stream_wait_event(0, 0, event)
    driver.event_destroy(event)
    assert backend.now(0) == pytest.approx(5e-6 + 1e-6 + 1e-6 + 7e-6, rel=1e-9)


@pytest.mark.sim_only
def test_failures_are_injected_by_cuda_name_and_counted_per_device():
    backend = SimBackend("2x1GiB", real_bytes=True)
    driver = backend.driver
    page = Mapped(driver, 1)
    host = ctypes.create_string_buffer(b"x" * 64)
    try:
        backend.fail("cuMemcpyHtoDAsync", device=1, error="error")
        with pytest.raises(aimdo.DriverError, match="cuMemcpyHtoDAsync") as raised:
            driver.copy_from_host(1, page.va, ctypes.addressof(host), 64)
        assert (raised.value.code, raised.value.injected) == (UNKNOWN, True)
        driver.copy_from_host(1, page.va, ctypes.addressof(host), 64)
        assert bytes(backend.view(page.va, 64)) == b"x" * 64
        assert backend.call_count("cuMemcpyHtoDAsync", 1) == 2
        assert backend.call_count("cuMemcpyHtoDAsync", 0) == 0

        backend.fail("cuEventCreate", error="out_of_memory")
        with pytest.raises(aimdo.DriverError, match="cuEventCreate on device 1") as raised:
            driver.event_create(1)
        assert (raised.value.code, raised.value.injected) == (2, True)
        event = driver.event_create(1)
        # Calls naming only the event are counted on, and failed for, its device.
        backend.fail("cuEventSynchronize", device=1, error="not_ready")
        with pytest.raises(aimdo.DriverError, match="cuEventSynchronize") as raised:
            driver.event_synchronize(event)
        assert raised.value.code == 600
        driver.event_synchronize(event)
        for name in ("cuEventRecord", "cuStreamWaitEvent", "cuEventDestroy"):
            backend.fail(name, device=1, error="error")
        with pytest.raises(aimdo.DriverError, match="cuEventRecord"):
            driver.event_record(1, event)
        with pytest.raises(aimdo.DriverError, match="cuStreamWaitEvent"):
            driver.stream_wait_event(1, 0, event)
        with pytest.raises(aimdo.DriverError, match="cuEventDestroy"):
            driver.event_destroy(event)
        driver.event_destroy(event)
        counts = {name: backend.call_count(name, 1) for name in NEW_OPERATIONS}
        assert counts == {
            "cuMemcpyHtoDAsync": 2,
            "cuEventCreate": 2,
            "cuEventDestroy": 2,
            "cuEventRecord": 1,
            "cuEventSynchronize": 2,
            "cuStreamWaitEvent": 1,
        }
    finally:
        page.close()


@pytest.mark.sim_only
def test_a_held_event_synchronize_blocks_until_released():
    backend = SimBackend("2x1GiB")
    driver = backend.driver
    event = driver.event_create(1)
    with backend.hold("cuEventSynchronize", 1) as hold:
        waiter = threading.Thread(target=driver.event_synchronize, args=(event,), daemon=True)
        waiter.start()
        assert hold.wait_arrived(timeout=30)
        assert waiter.is_alive()
        driver.event_record(1, event)  # other calls on the device go on meanwhile
    waiter.join(30)
    assert not waiter.is_alive()
    driver.event_destroy(event)


@pytest.mark.sim_only
def test_the_log_lines_of_copies_and_events_and_their_replay():
    backend = SimBackend("2x1GiB", real_bytes=True, record=True)
    driver = backend.driver
    page = Mapped(driver, 0)
    host = ctypes.create_string_buffer(pattern(4096), 4096)
    try:
        driver.copy_from_host(0, page.va + 0x1000, ctypes.addressof(host), 4096)
        backend.fail("cuMemcpyHtoDAsync", device=0, error="error")
        with pytest.raises(aimdo.DriverError):
            driver.copy_from_host(0, page.va, ctypes.addressof(host), 4096)
        ok(driver.raw_make_current(1))
        assert driver.raw_copy_from_host(0, page.va, ctypes.addressof(host), 16)[0] == (
            INVALID_CONTEXT
        )
        event = driver.event_create(0)
        driver.event_record(0, event)
        driver.stream_wait_event(0, 0, event)
        driver.event_synchronize(event)
        driver.event_destroy(event)
        with pytest.raises(aimdo.DriverError):
            driver.event_synchronize(event)
    finally:
        page.close()
    log = backend.log()
    lines = [line for line in log.splitlines() if line.split()[0] in NEW_OPERATIONS]
    assert lines == [
        "cuMemcpyHtoDAsync dev=0 cur=0 va=r0+0x1000 size=4096 -> CUDA_SUCCESS",
        "cuMemcpyHtoDAsync dev=0 cur=0 va=r0+0x0 size=4096 -> CUDA_ERROR_UNKNOWN",
        "cuMemcpyHtoDAsync dev=0 cur=1 va=r0+0x0 size=16 -> CUDA_ERROR_INVALID_CONTEXT",
        "cuEventCreate dev=0 cur=0 -> CUDA_SUCCESS ev=0xee01000000000001",
        "cuEventRecord dev=0 cur=0 ev=0xee01000000000001 -> CUDA_SUCCESS",
        "cuStreamWaitEvent dev=0 cur=0 ev=0xee01000000000001 -> CUDA_SUCCESS",
        "cuEventSynchronize ev=0xee01000000000001 -> CUDA_SUCCESS",
        "cuEventDestroy ev=0xee01000000000001 -> CUDA_SUCCESS",
        "cuEventSynchronize ev=0xee01000000000001 -> CUDA_ERROR_INVALID_HANDLE",
    ]
    assert "@fail op=cuMemcpyHtoDAsync dev=0 code=999 skip=0 count=1" in log
    assert backend.replay(log) == []
    # An answer changed is a difference.
    changed = log.replace("size=16 -> CUDA_ERROR_INVALID_CONTEXT", "size=16 -> CUDA_SUCCESS")
    [difference] = backend.replay(changed)
    assert "logged 'cuMemcpyHtoDAsync dev=0 cur=1" in difference


@pytest.mark.sim_only
def test_a_gpus_log_replays_with_its_events_translated():
    """A log as the CUDA backend writes it: raw addresses, handles and event pointers.
    Replay maps each event the log created to the one the simulator creates, until the
    log destroys it (then the raw value names nothing, as on the GPU)."""
    gpu_event = 0x55D0C0FFEE00
    va = 0x7F3A00000000
    log = "\n".join(
        [
            "@recording backend=cuda",
            "@device dev=0 total=1073741824 granularity=2097152 integrated=0",
            "cuCtxSetCurrent dev=0 -> CUDA_SUCCESS",
            f"cuMemAddressReserve dev=0 size=2097152 align=2097152 -> CUDA_SUCCESS va={va:#x}",
            "cuMemCreate dev=0 size=2097152 -> CUDA_SUCCESS handle=0x20",
            f"cuMemMap va={va:#x} size=2097152 handle=0x20 -> CUDA_SUCCESS",
            f"cuMemSetAccess va={va:#x} size=2097152 dev=0 -> CUDA_SUCCESS",
            f"cuMemcpyHtoDAsync dev=0 cur=0 va={va + 0x3000:#x} size=8192 -> CUDA_SUCCESS",
            f"cuEventCreate dev=0 cur=0 -> CUDA_SUCCESS ev={gpu_event:#x}",
            f"cuEventRecord dev=0 cur=0 ev={gpu_event:#x} -> CUDA_SUCCESS",
            f"cuStreamWaitEvent dev=0 cur=0 ev={gpu_event:#x} -> CUDA_SUCCESS",
            f"cuEventSynchronize ev={gpu_event:#x} -> CUDA_SUCCESS",
            f"cuEventDestroy ev={gpu_event:#x} -> CUDA_SUCCESS",
            f"cuEventSynchronize ev={gpu_event:#x} -> CUDA_ERROR_INVALID_HANDLE",
            f"cuMemUnmap va={va:#x} size=2097152 -> CUDA_SUCCESS",
            "cuMemRelease handle=0x20 -> CUDA_SUCCESS",
            f"cuMemAddressFree va={va:#x} size=2097152 -> CUDA_SUCCESS",
        ]
    )
    for real_bytes in (False, True):
        assert SimBackend(real_bytes=real_bytes).replay(log) == []
    # The event's line read back in its own form: 0x-hex only.
    damaged = re.sub(
        r"ev=0x55d0c0ffee00 -> CUDA_SUCCESS$", "ev=12 -> CUDA_SUCCESS", log, count=1, flags=re.M
    )
    with pytest.raises(ValueError, match="ev=12 is not a 0x-hex number"):
        SimBackend().replay(damaged)


def test_the_operations_table_lists_the_new_calls_with_their_log_fields():
    rows = {
        name: (method, arguments, outputs)
        for name, method, _, arguments, outputs in _core.operations()
    }
    assert rows["cuMemcpyHtoDAsync"] == (
        "copy_from_host_async",
        ["dev", "cur", "va", "size"],
        [],
    )
    assert rows["cuEventCreate"] == ("event_create", ["dev", "cur"], ["ev"])
    assert rows["cuEventDestroy"] == ("event_destroy", ["ev"], [])
    assert rows["cuEventRecord"] == ("event_record", ["dev", "cur", "ev"], [])
    assert rows["cuEventSynchronize"] == ("event_synchronize", ["ev"], [])
    assert rows["cuStreamWaitEvent"] == ("stream_wait_event", ["dev", "cur", "ev"], [])


@pytest.mark.sim_only
def test_replay_makes_an_event_for_one_the_log_never_made():
    # A CUDA recording of an offload reading from files: its pump waits on and records
    # PyTorch's events, which no cuEventCreate line made.
    torch_event = 0x55D0C0FFEE00
    log = "\n".join(
        [
            "@recording backend=cuda",
            "@device dev=0 total=1073741824 granularity=2097152 integrated=0",
            "cuCtxSetCurrent dev=0 -> CUDA_SUCCESS",
            f"cuStreamWaitEvent dev=0 cur=0 ev={torch_event:#x} -> CUDA_SUCCESS",
            f"cuEventRecord dev=0 cur=0 ev={torch_event:#x} -> CUDA_SUCCESS",
            f"cuEventSynchronize ev={torch_event:#x} -> CUDA_SUCCESS",
        ]
    )
    backend = SimBackend()
    assert backend.replay(log) == []
    assert backend.leaks() == []  # the event made for it is gone with the replay
