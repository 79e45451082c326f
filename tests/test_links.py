"""Links between devices (issue 13, the seam): what the driver reports of peer access,
peer access to mapped pages, device-to-device copies, and the simulator's link matrix
(host links, shared or not, and peer links) in virtual time."""

from __future__ import annotations

from types import SimpleNamespace

import aimdo
import pytest
from conftest import BACKEND
from test_real_bytes import CudaBytes, SimBytes

MiB = 1 << 20
G = 2 * MiB  # both backends' minimum granularity
SUCCESS, INVALID_VALUE, INVALID_DEVICE, INVALID_CONTEXT = 0, 1, 101, 201


def ok(result):
    assert result[0] == SUCCESS, result
    return result[2] if len(result) > 2 else None


def two_devices():
    """A backend with two devices that reach each other's memory: two H200s over NVLink
    on the simulator, the machine's first two GPUs on CUDA (skipped without two GPUs
    with peer access)."""
    if BACKEND == "sim":
        return aimdo.SimBackend("2x1GiB", topology="h200-nvlink", real_bytes=True)
    backend = aimdo.CudaBackend()
    if backend.device_count < 2:
        pytest.skip("needs two GPUs")
    if not backend.driver.peer_link(0, 1)[0]:
        pytest.skip("GPUs 0 and 1 have no peer access")
    return backend


class Page:
    """One granularity-sized page mapped on `device` (raw driver calls), closed in order."""

    def __init__(self, driver, device: int):
        self.driver, self.device = driver, device
        ok(driver.raw_make_current(device))
        self.va = ok(driver.raw_reserve(device, G, G))
        self.handle = ok(driver.raw_create(device, G))
        ok(driver.raw_map(self.va, G, self.handle))
        ok(driver.raw_set_access(self.va, G, device))

    def region(self):
        """The page as test_real_bytes' byte movers take an allocation."""
        return SimpleNamespace(device=self.device, address=self.va, size=G)

    def close(self):
        ok(self.driver.raw_make_current(self.device))
        ok(self.driver.raw_synchronize(self.device))
        ok(self.driver.raw_unmap(self.va, G))
        ok(self.driver.raw_release(self.handle))
        ok(self.driver.raw_free_range(self.va, G))


def test_a_peer_granted_access_copies_a_mapped_page_on_its_own_stream():
    backend = two_devices()
    driver = backend.driver
    link = aimdo.Manager(backend, [0, 1])
    try:
        assert link.peer_link(0, 1).access and link.peer_link(1, 0).access
    finally:
        link.close()
    source, destination = Page(driver, 0), Page(driver, 1)
    data = bytes(range(256)) * (G // 256)
    memory = SimBytes(backend) if BACKEND == "sim" else CudaBytes()
    try:
        memory.write(source.region(), data)
        if BACKEND == "sim":
            # Not open to device 1 yet: its copy engine cannot read the page.
            assert not backend.is_accessible(source.va, G, from_device=1)
            ok(driver.raw_make_current(1))
            assert driver.raw_copy(1, destination.va, source.va, G)[0] == INVALID_VALUE
        ok(driver.raw_set_access(source.va, G, 1))
        ok(driver.raw_make_current(1))
        ok(driver.raw_copy(1, destination.va, source.va, G))
        ok(driver.raw_synchronize(1))
        assert memory.read(destination.region()) == data
        if BACKEND == "sim":
            assert backend.is_accessible(source.va, G, from_device=1)
    finally:
        destination.close()
        source.close()


@pytest.mark.sim_only
def test_without_a_peer_link_access_and_copies_are_refused():
    backend = aimdo.SimBackend("2x1GiB", topology="rtx4090-pcie")
    driver = backend.driver
    assert backend.peer_link(0, 1) == aimdo.PeerLink(False, 0, False)
    source, destination = Page(driver, 0), Page(driver, 1)
    try:
        assert driver.raw_set_access(source.va, G, 1)[0] == INVALID_DEVICE
        ok(driver.raw_make_current(1))
        assert driver.raw_copy(1, destination.va, source.va, G)[0] == INVALID_VALUE
        # The destination must be the copying device's own mapped memory, its context current.
        ok(driver.raw_make_current(0))
        assert driver.raw_copy(1, destination.va, destination.va, G)[0] == INVALID_CONTEXT
        assert driver.raw_copy(0, destination.va, source.va, G)[0] == INVALID_VALUE
        assert driver.raw_copy(0, source.va, source.va, 0)[0] == INVALID_VALUE
        assert driver.raw_copy(5, source.va, source.va, G)[0] == INVALID_DEVICE
    finally:
        destination.close()
        source.close()


@pytest.mark.sim_only
def test_a_failed_peer_copy_is_injected_counted_and_logged():
    backend = aimdo.SimBackend("2x1GiB", topology="h200-nvlink", record=True)
    driver = backend.driver
    source, destination = Page(driver, 0), Page(driver, 1)
    try:
        ok(driver.raw_set_access(source.va, G, 1))
        ok(driver.raw_make_current(1))
        backend.fail("cuMemcpyDtoDAsync", device=1, error="error")
        assert driver.raw_copy(1, destination.va, source.va, G)[0] == 999
        ok(driver.raw_copy(1, destination.va, source.va, G))
        assert backend.call_count("cuMemcpyDtoDAsync", 1) == 2
    finally:
        destination.close()
        source.close()
    log = backend.log()
    copies = [line for line in log.splitlines() if line.startswith("cuMemcpyDtoDAsync")]
    assert copies == [
        "cuMemcpyDtoDAsync dev=1 cur=1 va=r1+0x0 src=r0+0x0 size=2097152 -> CUDA_ERROR_UNKNOWN",
        "cuMemcpyDtoDAsync dev=1 cur=1 va=r1+0x0 src=r0+0x0 size=2097152 -> CUDA_SUCCESS",
    ]
    assert backend.replay(log) == []


def test_the_manager_answers_peer_links_and_refuses_bad_devices(make_manager):
    manager = make_manager(pages=4)
    count = len(manager.devices)
    with pytest.raises(ValueError, match="not its own peer"):
        manager.peer_link(0, 0)
    with pytest.raises(ValueError, match="not one of this Manager's"):
        manager.peer_link(0, count + 3)
    if count > 1:
        link = manager.peer_link(0, 1)
        assert isinstance(link, aimdo.PeerLink) and isinstance(link.access, bool)


# --- the simulator's link matrix in virtual time -------------------------------------------


@pytest.mark.sim_only
def test_h200_nvlink_peer_copies_take_bytes_over_390_gbs_plus_2_us():
    backend = aimdo.SimBackend("2x141GiB", topology="h200-nvlink")
    done = backend.peer_copy_async(1, 0, 390_000_000)
    assert done == pytest.approx(1e-3 + 2e-6, abs=1e-9)
    # The next copy on device 1's engine queues behind it, and waits for `after` too.
    assert backend.peer_copy_async(1, 0, 390_000_000, after=0.01) == pytest.approx(
        0.011002, abs=1e-9
    )
    # Device 0's engine is its own; its host copy at 55.3 GB/s overlaps device 1's.
    assert backend.copy_async(0, 55_300_000) == pytest.approx(1e-3, abs=1e-9)
    assert backend.copy_async(1, 55_300_000) == pytest.approx(0.011002 + 1e-3, abs=1e-9)


@pytest.mark.sim_only
@pytest.mark.parametrize(
    "topology, first, second",
    [
        ("h200-nvlink", 1e-3, 1e-3),  # two independent links of 55.3 GB/s
        ("rtx4090-pcie", 55.3e6 / 12.5e9, 55.3e6 / 12.5e9),  # x8/x8: independent halves
        ("rtx4090-pcie-shared", 55.3e6 / 25e9, 2 * 55.3e6 / 25e9),  # one x16 link, shared
    ],
)
def test_host_links_are_independent_or_shared(topology, first, second):
    backend = aimdo.SimBackend("2x24GiB", topology=topology)
    assert backend.copy_async(0, 55_300_000) == pytest.approx(first, rel=1e-9)
    assert backend.copy_async(1, 55_300_000) == pytest.approx(second, rel=1e-9)


@pytest.mark.sim_only
def test_a_shared_host_link_serializes_copy_to_device_too():
    backend = aimdo.SimBackend("2x24GiB", topology={"host_links": [0, 0], "host_latency": 5e-6})
    backend.copy_to_device(0, 50_000_000)  # 1 ms at the default 50 GB/s, + 5 us
    backend.copy_to_device(1, 50_000_000)  # waits for the link
    assert backend.now(0) == pytest.approx(1.005e-3, rel=1e-9)
    assert backend.now(1) == pytest.approx(2.010e-3, rel=1e-9)


@pytest.mark.sim_only
@pytest.mark.parametrize("count", [2, 4, 8])
def test_every_pair_of_n_nvlink_devices_is_linked(count):
    backend = aimdo.SimBackend(f"{count}x8GiB", topology="h200-nvlink")
    for device in range(count):
        for peer in range(count):
            if device == peer:
                continue
            assert backend.peer_link(device, peer).access
    last = count - 1
    assert backend.peer_copy_async(last, 0, 390_000) == pytest.approx(1e-6 + 2e-6, abs=1e-9)


@pytest.mark.sim_only
def test_a_custom_matrix_links_one_way_only():
    backend = aimdo.SimBackend(
        "3x8GiB",
        topology={
            "peers": [
                [None, {"bandwidth": 100e9, "latency": 1e-6, "rank": 1}, None],
                [None, None, None],
                [None, None, None],
            ]
        },
    )
    assert backend.peer_link(0, 1) == aimdo.PeerLink(True, 1, True)
    assert backend.peer_link(1, 0) == aimdo.PeerLink(False, 0, False)
    assert backend.peer_copy_async(0, 1, 100_000_000) == pytest.approx(1.001e-3, abs=1e-9)
    with pytest.raises(ValueError, match="no link to device 0"):
        backend.peer_copy_async(1, 0, 1)
    with pytest.raises(ValueError, match="no device 3"):
        backend.peer_copy_async(3, 0, 1)


@pytest.mark.sim_only
@pytest.mark.parametrize(
    "topology, error, match",
    [
        ("dgx-a100", ValueError, "no preset named 'dgx-a100'"),
        (3, TypeError, "preset name or a mapping"),
        ({"links": []}, ValueError, "unknown keys"),
        ({"peers": [[None, None]]}, ValueError, "1 rows for 2 devices"),
        ({"peers": [[None], [None]]}, ValueError, "row 0 has 1 entries"),
        ({"peers": [[{"bandwidth": 1e9}, None], [None, None]]}, ValueError, "its own peer"),
        ({"peers": [[None, {"bandwidth": -1.0}], [None, None]]}, ValueError, "positive"),
        ({"peers": [[None, {"bandwidth": "fast"}], [None, None]]}, TypeError, "bytes per"),
        ({"peers": [[None, {}], [None, None]]}, TypeError, "'bandwidth'"),
        (
            {"peers": [[None, {"bandwidth": 1e9, "latency": -1}], [None, None]]},
            ValueError,
            "latency",
        ),
        ({"host_links": [0, 2]}, ValueError, "link number"),
        ({"peers": 5}, TypeError, "list of rows"),
        ({"host_links": "ab"}, TypeError, "list of link numbers"),
        ({"host_links": [0]}, ValueError, "link number"),
        ({"host_latency": -1.0}, ValueError, "host_latency"),
    ],
)
def test_a_bad_topology_is_refused_with_a_clear_error(topology, error, match):
    with pytest.raises(error, match=match):
        aimdo.SimBackend("2x8GiB", topology=topology)


@pytest.mark.sim_only
def test_a_peer_copy_is_recorded_and_replayed():
    backend = aimdo.SimBackend("2x8GiB", topology="h200-nvlink", record=True)
    backend.peer_copy_async(0, 1, 1 << 20, after=0.5)
    log = backend.log()
    assert "@peer_copy_async dev=0 peer=1 bytes=1048576 after=500000000" in log
    assert backend.replay(log) == []


@pytest.mark.sim_only
def test_a_page_pinned_for_a_peer_copy_is_not_evicted_until_unpinned(make_manager):
    # A peer pins the pages it copies from (pin_resident); the owner's eviction, under
    # outside pressure, takes every other page first and that one only once unpinned.
    sim = aimdo.SimBackend("2x1GiB", topology="h200-nvlink")
    manager = make_manager(pages=4, devices=(0, 1), sim=sim, poll_interval=0.0)
    vbar = manager.create_vbar(4 * G, 0)
    allocations = [vbar.alloc(G) for _ in range(4)]
    for allocation in allocations:
        assert vbar.fault(allocation) is not None
        vbar.unpin(allocation)
    vbar.share_with(1)
    assert vbar.readers == [1]
    pinned = vbar.pin_resident(allocations[2])
    assert pinned is not None and vbar.residency()[2] == (True, True)
    sim.add_external_usage(0, 4 * G)  # someone else takes the whole budget
    assert vbar.fault(allocations[0]) is None  # the fault sees the deficit, evicts
    assert [page[0] for page in vbar.residency()] == [False, False, True, False]
    vbar.unpin(allocations[2])
    manager.poll(0)
    vbar.free_memory(4 * G)
    assert [page[0] for page in vbar.residency()] == [False, False, False, False]
    assert vbar.pin_resident(allocations[2]) is None  # not resident: nothing pinned
    sim.remove_external_usage(0, 4 * G)
    vbar.close()


@pytest.mark.sim_only
def test_a_peer_is_opened_only_what_its_owner_opened_and_adopt_takes_tensors_only():
    # Found by review: granting a peer access to a page its owner had not opened left no
    # host memory behind it, and a copy from it crashed; adopt took any pointer.
    backend = aimdo.SimBackend("2x1GiB", topology="h200-nvlink", real_bytes=True)
    driver = backend.driver
    ok(driver.raw_make_current(0))
    va = ok(driver.raw_reserve(0, G, G))
    handle = ok(driver.raw_create(0, G))
    ok(driver.raw_map(va, G, handle))
    destination = Page(driver, 1)
    try:
        assert driver.raw_set_access(va, G, 1)[0] == INVALID_VALUE
        ok(driver.raw_make_current(1))
        assert driver.raw_copy(1, destination.va, va, G)[0] == INVALID_VALUE

        class Fake:
            nbytes = 4096

            def data_ptr(self):
                return 0x1000

        with pytest.raises(TypeError, match="CPU torch.Tensor"):
            backend.adopt(1, Fake())
    finally:
        destination.close()
        ok(driver.raw_make_current(0))
        ok(driver.raw_unmap(va, G))
        ok(driver.raw_release(handle))
        ok(driver.raw_free_range(va, G))


@pytest.mark.sim_only
def test_closing_a_shared_vbar_waits_for_its_readers_first(make_manager):
    sim = aimdo.SimBackend("2x1GiB", topology="h200-nvlink")
    manager = make_manager(pages=4, devices=(0, 1), sim=sim)
    vbar = manager.create_vbar(2 * G, 0)
    allocation = vbar.alloc(G)
    assert vbar.fault(allocation) is not None
    vbar.unpin(allocation)
    vbar.share_with(1)
    before = sim.call_count("cuCtxSynchronize", 1)
    vbar.close()
    assert sim.call_count("cuCtxSynchronize", 1) == before + 1  # device 1's queued copies
    unshared = manager.create_vbar(2 * G, 0)
    assert unshared.fault(unshared.alloc(G)) is not None
    unshared.close()
    assert sim.call_count("cuCtxSynchronize", 1) == before + 1  # no reader, no wait


@pytest.mark.sim_only
def test_a_vbar_is_shared_only_with_a_device_that_can_read_it(make_manager):
    sim = aimdo.SimBackend("2x1GiB", topology="rtx4090-pcie")
    manager = make_manager(pages=4, devices=(0, 1), sim=sim)
    vbar = manager.create_vbar(2 * G, 0)
    with pytest.raises(ValueError, match="no peer access"):
        vbar.share_with(1)
    with pytest.raises(ValueError, match="cannot be shared"):
        vbar.share_with(0)
    with pytest.raises(aimdo.DriverError, match="peer_link"):
        vbar.share_with(9)
    assert vbar.readers == []
    allocation = vbar.alloc(G)
    assert vbar.fault(allocation) is not None  # its pages still map
    vbar.unpin(allocation)
    vbar.close()
