"""A process made by fork() from one that uses aimdo (issue 10).

The CUDA driver answers every call from a forked child with CUDA_ERROR_NOT_INITIALIZED,
and the child cannot reach the parent's device memory. The simulator must behave the
same, so a child can neither crash its parent nor corrupt it: every driver operation in
the child raises aimdo.DriverError, nothing the child does or drops changes the parent's
pages, files or mappings, and views the child holds no longer share the parent's pages.

Scenarios that could kill their parent (a SIGBUS from a shrunk trap file) run the parent
in a forked process of its own (``Forked``), so that a regression fails the test instead
of killing the test runner. Every forked process leaves through os._exit.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass

import aimdo
import pytest
from conftest import BACKEND

MiB = 1 << 20
NOT_INITIALIZED = "CUDA_ERROR_NOT_INITIALIZED"
TIMEOUT_S = 120.0


@pytest.fixture(autouse=True)
def no_simulator_leaks():
    """Replaces conftest's fixture of that name: the simulators here live in forked
    processes, which check their own leaks (Parent.check), and conftest's list of
    simulators would keep a child from dropping its copy of one."""
    yield


@dataclass
class Ended:
    """How a forked process ended: what its body returned (None if it never reported),
    its exit code, or the signal that killed it."""

    report: object
    exit_code: int | None
    signal_number: int | None

    def describe(self) -> str:
        if self.signal_number is not None:
            return f"killed by {signal.Signals(self.signal_number).name}"
        return f"exit code {self.exit_code}, report {self.report!r}"


class Forked:
    """``body()`` running in a child made by os.fork(). The child sends what body returned
    (as JSON), or the exception it raised, through a pipe and leaves through os._exit, so
    it runs none of the parent's cleanup (atexit handlers, pytest's fixtures)."""

    def __init__(self, body):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(read_fd)
                try:
                    message = {"report": body()}
                    code = 0
                except BaseException as error:  # reported, never unwound into pytest
                    message = {"report": f"raised {type(error).__name__}: {error}"}
                    code = 71
                data = json.dumps(message).encode()
                while data:
                    data = data[os.write(write_fd, data) :]
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        self._read_fd = read_fd

    def wait(self, timeout_s: float = TIMEOUT_S) -> Ended:
        """How the child ended; one still running after ``timeout_s`` is killed."""
        chunks = []
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._read_fd], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    break
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self._read_fd)
        _, status = os.waitpid(self.pid, 0)
        report = json.loads(b"".join(chunks)).get("report") if chunks else None
        if os.WIFSIGNALED(status):
            return Ended(report, None, os.WTERMSIG(status))
        return Ended(report, os.WEXITSTATUS(status), None)


def outcome(step) -> str:
    """What a step did: "ok", "DriverError <error name> in <operation>" or the exception."""
    try:
        step()
        return "ok"
    except aimdo.DriverError as error:
        return f"DriverError {error.error_name} in {error.operation}"
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def pattern(seed: int, size: int) -> bytes:
    unit = bytes([seed, 0x11, 0x22, 0x3C, seed ^ 0xFF, 0x77, 0x99, 0xC3])
    return (unit * (size // len(unit) + 1))[:size]


# --- the driver itself: what every backend answers a forked child --------------------


def test_every_driver_operation_answers_not_initialized_in_a_forked_child():
    """The CUDA driver's rule, held against both backends through the raw operations: in
    the child each answers CUDA_ERROR_NOT_INITIALIZED (3), and the parent's reservation,
    allocation and mapping are still there afterwards, exactly as it left them."""
    if BACKEND == "sim":
        backend = aimdo.SimBackend("2x1GiB")
    else:
        try:
            backend = aimdo.CudaBackend()
        except aimdo.DriverError as error:
            pytest.skip(f"no usable CUDA driver: {error}")
        if backend.device_count == 0:
            pytest.skip("no GPU")
    driver = backend.driver
    page = 2 * MiB  # the granularity of both backends' devices
    assert driver.raw_make_current(0)[0] == 0
    code, _, va = driver.raw_reserve(0, 4 * page, page)
    assert code == 0
    code, _, handle = driver.raw_create(0, page)
    assert code == 0
    assert driver.raw_map(va, page, handle)[0] == 0
    assert driver.raw_set_access(va, page, 0)[0] == 0
    event = driver.event_create(0)
    host = ctypes.create_string_buffer(16)

    def answer_of(call, *arguments) -> list:
        """What a guarded method that raises DriverError answered: [code, name]."""
        try:
            call(*arguments)
        except aimdo.DriverError as error:
            return [error.code, error.error_name]
        return [0, "CUDA_SUCCESS"]

    def child() -> dict:
        return {
            "cuCtxSetCurrent": driver.raw_make_current(0)[:2],
            "cuMemGetInfo": driver.raw_memory_info(0)[:2],
            "cuMemAddressReserve": driver.raw_reserve(0, page, page)[:2],
            "cuMemCreate": driver.raw_create(0, page)[:2],
            "cuMemMap": driver.raw_map(va + page, page, handle)[:2],
            "cuMemSetAccess": driver.raw_set_access(va, page, 0)[:2],
            "cuCtxSynchronize": driver.raw_synchronize(0)[:2],
            "cuMemUnmap": driver.raw_unmap(va, page)[:2],
            "cuMemRelease": driver.raw_release(handle)[:2],
            "cuMemAddressFree": driver.raw_free_range(va, 4 * page)[:2],
            "cuMemcpyHtoDAsync": driver.raw_copy_from_host(0, va, ctypes.addressof(host), 16)[:2],
            "cuEventCreate": driver.raw_event_create(0)[:2],
            "cuEventRecord": driver.raw_event_record(0, event)[:2],
            "cuStreamWaitEvent": driver.raw_stream_wait_event(0, 0, event)[:2],
            "cuEventSynchronize": answer_of(driver.event_synchronize, event),
            "cuEventDestroy": answer_of(driver.event_destroy, event),
        }

    ended = Forked(child).wait()
    assert ended.exit_code == 0, ended.describe()
    refused = [3, NOT_INITIALIZED]
    # The CUDA driver (580.159 on an H200) answered these two success in the child, on the
    # parent's event; the simulator refuses them as it refuses every call there (stricter,
    # so that nothing comes to rely on them).
    on_the_event = {
        name: ended.report.pop(name) for name in ("cuEventSynchronize", "cuEventDestroy")
    }
    if BACKEND == "sim":
        assert on_the_event == dict.fromkeys(on_the_event, refused)
    assert ended.report == {operation: refused for operation in ended.report}, ended.report
    assert len(ended.report) == 14
    # The parent's objects outlived the child's calls: each goes away exactly once, now.
    driver.event_destroy(event)
    assert driver.raw_make_current(0)[0] == 0
    assert driver.raw_unmap(va, page)[0] == 0
    assert driver.raw_release(handle)[0] == 0
    assert driver.raw_free_range(va, 4 * page)[0] == 0
    if BACKEND == "sim":
        assert backend.leaks() == []


# --- a forked child that exits normally ---------------------------------------------

EXIT_SCRIPT = r"""
import os
import sys

import aimdo

try:
    manager = aimdo.init(backend=sys.argv[1], devices=[0], page_size=2 << 20)
except aimdo.DriverError as error:  # the cuda backend on a machine without a usable GPU
    print(f"no usable device: {error}")
    sys.exit(77)
vbar = manager.create_vbar(4 << 20, device=0)
allocation = vbar.alloc(2 << 20)
assert vbar.fault(allocation) is not None
vbar.unpin(allocation)
sys.stdout.flush()
sys.stderr.flush()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit: the child runs the atexit handlers it inherited
_, status = os.waitpid(pid, 0)
print(f"child exit code {os.waitstatus_to_exitcode(status)}")
"""


def test_a_forked_child_exits_without_closing_the_parents_manager():
    """aimdo's atexit handler closes the default Manager. In a child made by fork() that
    Manager's driver resources are the parent's and the driver is not initialized, so
    closing would raise DriverError and Python would print "Exception ignored in atexit
    callback" with a traceback: the child must leave them alone and exit quietly. Runs on
    the suite's backend (CUDA too, where the driver refuses the child by itself)."""
    result = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, BACKEND], capture_output=True, text=True, timeout=300
    )
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "child exit code 0" in result.stdout, result.stdout + result.stderr
    for sign in ("Exception ignored", "Traceback", "DriverError"):
        assert sign not in result.stderr, result.stderr


# --- the simulator with real bytes: a child cannot crash or corrupt its parent ----------


class Parent:
    """The parent's side of every scenario: a real-bytes simulator whose trap file is
    shared with the child, resident pages of two page sizes holding known bytes, and
    views of them kept across fork().

    Before the fork: a VBAR of 2 MiB pages (``small``, allocation ``a``) and one of 4 MiB
    pages (``mid``, allocation ``m``), both faulted, written and unpinned (resident), and
    a 2 MiB page unmapped (so the trap file exists, 2 MiB long, when the child is made).
    After the fork (``grow_trap_file``): a 16 MiB page is faulted, viewed and unmapped, so
    the parent's trap file grows to 16 MiB and the parent holds a stale view into its end.
    A child that unmapped a 4 MiB page then would cut the shared file to 4 MiB under it.
    """

    def __init__(self):
        self.sim = aimdo.SimBackend("1x1GiB", real_bytes=True)
        self.manager = aimdo.Manager(self.sim, [0], page_size=2 * MiB, poll_interval=1e9)
        self.small = self.manager.create_vbar(8 * MiB, device=0)
        self.a = self.small.alloc(2 * MiB)
        self.cold = self.small.alloc(2 * MiB)  # never faulted: a fault of it needs the driver
        self.manager.add_devices(0, page_size=4 * MiB)
        self.mid = self.manager.create_vbar(8 * MiB, device=0)
        self.m = self.mid.alloc(4 * MiB)
        self.expected = {"a": pattern(1, self.a.size), "m": pattern(2, self.m.size)}
        self.signatures = {}
        self.views = {}
        for name, vbar, allocation in (("a", self.small, self.a), ("m", self.mid, self.m)):
            self.signatures[name] = vbar.fault(allocation)
            assert self.signatures[name] is not None
            view = self.sim.view(allocation)
            view[:] = self.expected[name]
            self.views[name] = view  # kept across the fork: the child inherits it
            vbar.unpin(allocation)
        self.manager.add_devices(0, page_size=2 * MiB)
        scratch = self.manager.create_vbar(2 * MiB, device=0)
        scratch_allocation = scratch.alloc(2 * MiB)
        assert scratch.fault(scratch_allocation) is not None
        scratch.unpin(scratch_allocation)
        scratch.close()  # unmaps 2 MiB: the trap file exists now
        self.stale = None

    def grow_trap_file(self) -> None:
        self.manager.add_devices(0, page_size=16 * MiB)
        big = self.manager.create_vbar(16 * MiB, device=0)
        b = big.alloc(16 * MiB)
        assert big.fault(b) is not None
        self.stale = self.sim.view(b)
        big.unpin(b)
        big.close()  # unmaps 16 MiB: the trap file grows to 16 MiB

    def check(self) -> dict:
        """The parent's state after the child is gone: whatever the child did, the stale
        view reads the trap pattern (and does not fault), the resident pages keep their
        signatures and bytes, nothing was written through a stale pointer and, once
        closed, nothing leaks."""
        found = {"stale_view_tail": bytes(self.stale[-16:]).hex() if self.stale else None}
        for name, vbar, allocation in (("a", self.small, self.a), ("m", self.mid, self.m)):
            signature = vbar.fault(allocation)
            found[f"{name}_signature_unchanged"] = signature == self.signatures[name]
            found[f"{name}_bytes_intact"] = bytes(self.sim.view(allocation)) == self.expected[name]
            vbar.unpin(allocation)
        found["violations"] = self.sim.violations()
        self.manager.close()
        found["leaks"] = self.sim.leaks()
        return found


def check_parent(found: dict) -> None:
    assert found["stale_view_tail"] == "5a" * 16, found
    assert found["a_signature_unchanged"] and found["m_signature_unchanged"], found
    assert found["a_bytes_intact"] and found["m_bytes_intact"], found
    assert found["violations"] == [], found
    assert found["leaks"] == [], found


def run_scenario(child_body, prepare=None) -> tuple[dict, Ended]:
    """In a forked "parent" process: build a Parent (then ``prepare(parent)``), fork a
    child that waits until the parent has grown its trap file and then reports what
    ``child_body(parent)`` returns; once the child is gone, check the parent. Returns the
    parent's findings and how the child ended.

    The parent is a process of its own because a simulator belongs to the process that
    made it, and because a parent killed by its child must fail the test, not kill pytest.
    """

    def parent_process() -> dict:
        parent = Parent()
        if prepare is not None:
            prepare(parent)
        go_read, go_write = os.pipe()

        def child():
            os.close(go_write)
            os.read(go_read, 1)  # wait for the parent (EOF if it died)
            return child_body(parent)

        forked_child = Forked(child)
        os.close(go_read)
        parent.grow_trap_file()
        os.write(go_write, b"g")
        os.close(go_write)
        child_end = forked_child.wait()
        return {"parent": parent.check(), "child": child_end.__dict__}

    ended = Forked(parent_process).wait()
    assert ended.signal_number is None and ended.exit_code == 0, (
        f"the parent did not survive its child: {ended.describe()}"
    )
    return ended.report["parent"], Ended(**ended.report["child"])


@pytest.mark.sim_only
def test_a_child_using_aimdo_gets_driver_errors_and_leaves_the_parent_intact():
    def child_body(parent: Parent) -> dict:
        steps = {}
        # A resident page is a hit that needs no driver call (on CUDA too): not checked.
        steps["fault a resident page"] = outcome(lambda: parent.small.fault(parent.a))
        steps["unpin it"] = outcome(lambda: parent.small.unpin(parent.a))
        steps["fault a page of a parent's VBAR"] = outcome(lambda: parent.small.fault(parent.cold))
        created = {}

        def create():
            created["vbar"] = parent.manager.create_vbar(8 * MiB, device=0)  # 4 MiB pages

        steps["create a VBAR of 4 MiB pages"] = outcome(create)
        if "vbar" in created:  # only when the driver let the child reserve a range
            allocation = created["vbar"].alloc(4 * MiB)
            steps["fault it"] = outcome(lambda: created["vbar"].fault(allocation))
            steps["close it"] = outcome(created["vbar"].close)
        steps["close a parent's VBAR"] = outcome(parent.mid.close)
        steps["close the Manager"] = outcome(parent.manager.close)
        return steps

    found, child = run_scenario(child_body)
    assert child.exit_code == 0, child.describe()
    # Every step that needs the driver was refused the way CUDA refuses a forked child.
    for step in (
        "fault a page of a parent's VBAR",
        "create a VBAR of 4 MiB pages",
        "close a parent's VBAR",
        "close the Manager",
    ):
        assert child.report[step].startswith(f"DriverError {NOT_INITIALIZED} in "), child.report
    check_parent(found)


@pytest.mark.sim_only
def test_a_child_dropping_its_objects_leaves_the_parent_intact():
    def child_body(parent: Parent) -> str:
        # The child's copies of the parent's objects die here: VBARs of 2 and 4 MiB pages
        # with resident pages, the Manager and the simulator with its host memory.
        simulator = weakref.ref(parent.sim)
        parent.small = parent.mid = parent.a = parent.m = None
        parent.manager = parent.sim = None
        parent.views = {}
        gc.collect()
        return "dropped" if simulator() is None else "the simulator is still referenced"

    found, child = run_scenario(child_body)
    check_parent(found)
    assert child.exit_code == 0 and child.report == "dropped", child.describe()


@pytest.mark.sim_only
def test_a_child_writing_through_views_cannot_reach_the_parents_pages():
    def child_body(parent: Parent) -> dict:
        steps = {}
        inherited = parent.views["a"]  # made by the parent before the fork
        steps["inherited view reads"] = bytes(inherited[:4]).hex()

        def write_inherited():
            inherited[:] = b"\x01" * len(inherited)

        steps["write through the inherited view"] = outcome(write_inherited)

        def write_new_view():
            parent.sim.view(parent.a)[:16] = b"\x02" * 16

        steps["write through a new view"] = outcome(write_new_view)

        def write_after_fault():
            parent.small.fault(parent.a)
            parent.sim.view(parent.a)[:16] = b"\x03" * 16

        steps["fault and write"] = outcome(write_after_fault)
        return steps

    found, child = run_scenario(child_body)
    check_parent(found)
    assert child.exit_code == 0, child.describe()
    assert child.report["write through the inherited view"] == "ok", child.report  # no crash
    assert child.report["inherited view reads"] != pattern(1, 4).hex(), child.report
    for step in ("write through a new view", "fault and write"):
        assert child.report[step].startswith(f"DriverError {NOT_INITIALIZED} in "), child.report


@pytest.mark.sim_only
def test_a_child_writing_through_tensors_cannot_reach_the_parents_pages():
    torch = pytest.importorskip("torch")
    from aimdo import torch as atorch

    def keep_a_tensor(parent: Parent) -> None:
        assert parent.small.fault(parent.a) == parent.signatures["a"]
        parent.tensor = atorch.as_tensor(parent.a, torch.uint8, parent.a.size)
        parent.small.unpin(parent.a)

    def child_body(parent: Parent) -> dict:
        steps = {}
        inherited = parent.tensor  # made by the parent before the fork
        # Small slices: one thread does them (an OpenMP pool is not safe after fork()).
        steps["write through the inherited tensor"] = outcome(lambda: inherited[:16].fill_(4))

        def write_new_tensor():
            atorch.as_tensor(parent.a, torch.uint8, parent.a.size)[:16].fill_(5)

        steps["write through a new tensor"] = outcome(write_new_tensor)
        return steps

    found, child = run_scenario(child_body, prepare=keep_a_tensor)
    check_parent(found)
    assert child.exit_code == 0, child.describe()
    assert child.report["write through the inherited tensor"] == "ok", child.report
    assert child.report["write through a new tensor"].startswith(
        f"DriverError {NOT_INITIALIZED} in "
    ), child.report
