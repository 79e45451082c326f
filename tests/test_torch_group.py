"""aimdo.torch.offload_group: one model on several devices, one host copy of its weights,
complementary placement, and blocks copied from another device's pages (issue 13)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from conftest import BACKEND  # noqa: E402
from torch_support import (  # noqa: E402
    count_copies,
    mixed_pages,
    new_manager,
    reference,
    stack,
    weight_bytes,
    where,
)


def group_manager(make_manager, pages: int, topology: str = "h200-nvlink"):
    """Devices 0 and 1 at `pages` pages each: two H200s over NVLink on the simulator (or
    the topology named), the first two GPUs on CUDA (skipped without peer access)."""
    if BACKEND == "sim":
        sim = aimdo.SimBackend("2x1GiB", real_bytes=True, topology=topology)
        return make_manager(pages=pages, devices=(0, 1), sim=sim)
    manager = make_manager(pages=pages, devices=(0, 1))
    if not manager.peer_link(1, 0).access:
        pytest.skip("GPUs 0 and 1 have no peer access")
    return manager


def resident_blocks(offload) -> set[str]:
    """Names of the blocks whose every page is resident on the offload's device."""
    pages = offload.vbar.residency()
    size = offload.vbar.page_size
    names = set()
    for name, offset, nbytes in offload.placement():
        if all(pages[p][0] for p in range(offset // size, (offset + nbytes - 1) // size + 1)):
            names.add(name)
    return names


def test_each_device_pulls_what_it_lacks_from_the_others_pages(make_manager):
    model = stack(blocks=6)  # 12 blocks of 1 MiB + 4 KiB (up, down), 6 small norms
    x = torch.randn(2, 256)
    expected = [reference(model, x, device) for device in (0, 1)]
    with torch.no_grad():
        on_host = model(x)
    manager = group_manager(make_manager, pages=5)  # each holds 10 of the 12 MiB
    with atorch.offload_group(model, [0, 1], manager=manager) as group:
        assert group[0] is model and group[1] is not model
        # One host copy: the copy shares the model's weight tensors, held by the leader.
        assert group.offloads[0].pinned_bytes == weight_bytes(model)
        assert group.offloads[1].pinned_bytes == 0
        for step in range(3):
            for device in (0, 1):
                out = group[device](x.to(where(device)))
                assert torch.equal(out, expected[device])
            if step == 0:
                continue
            # Together the two devices hold every block: what one lacks it copies from
            # the other's pages, nothing from the host.
            names = {name for name, _, _ in group.offloads[0].placement()}
            assert resident_blocks(group.offloads[0]) | resident_blocks(group.offloads[1]) == (
                names
            )
            for stats in group.last_stats:
                assert stats.bytes_copied > 0 and stats.bytes_from_peers == stats.bytes_copied
        # The peers' pins are all given back after each forward.
        for offload in group.offloads:
            assert not any(pinned for _, pinned in offload.vbar.residency())
    # Undone: the model is back, on the host, whole.
    with torch.no_grad():
        assert torch.equal(model(x), on_host)


@pytest.mark.sim_only  # which copies ride: the schedule's bookkeeping, on the CPU
def test_blocks_copied_from_a_peer_ride_in_the_room_of_a_staging_buffer(make_manager, monkeypatch):
    # 32 pages of blocks of 1 and 3 pages, 6 pages of budget on each device, prefetch 1:
    # a device copies what it lacks from the other's pages, and the small blocks after a
    # small one ride in the room its staging buffer has left.
    torch.manual_seed(0)
    model = mixed_pages(repeats=4)
    x = torch.randn(2, 256)
    expected = [reference(model, x, device) for device in (0, 1)]
    manager = group_manager(make_manager, pages=6)
    counted = count_copies(monkeypatch)
    with atorch.offload_group(model, [0, 1], manager=manager, prefetch=1) as group:
        for _ in range(4):
            for device in (0, 1):
                assert torch.equal(group[device](x.to(where(device))), expected[device])
    assert counted.get(("peer", True), 0) > 0


def test_two_threads_run_the_two_devices_at_once(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = [reference(model, x, device) for device in (0, 1)]
    manager = group_manager(make_manager, pages=5)
    failures = []
    with atorch.offload_group(model, [0, 1], manager=manager) as group:

        def run(device):
            try:
                if BACKEND == "cuda":
                    torch.cuda.set_device(device)
                for _ in range(5):
                    out = group[device](x.to(where(device)))
                    if not torch.equal(out, expected[device]):
                        failures.append(f"device {device}: output differs")
            except BaseException as error:  # noqa: BLE001 - reported below
                failures.append(f"device {device}: {error!r}")

        threads = [threading.Thread(target=run, args=(device,)) for device in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        for offload in group.offloads:
            assert not any(pinned for _, pinned in offload.vbar.residency())


@pytest.mark.sim_only
@pytest.mark.parametrize("topology, peers", [("rtx4090-pcie", True), ("h200-nvlink", False)])
def test_without_peer_access_or_with_peers_off_every_copy_comes_from_the_host(
    make_manager, topology, peers
):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = group_manager(make_manager, pages=5, topology=topology)
    with atorch.offload_group(model, [0, 1], manager=manager, peers=peers) as group:
        for _ in range(2):
            for device in (0, 1):
                assert torch.equal(group[device](x), expected)
        for offload in group.offloads:
            assert offload.vbar.readers == []
        for stats in group.last_stats:
            assert stats.bytes_copied > 0 and stats.bytes_from_peers == 0


@pytest.mark.sim_only
def test_a_failed_peer_copy_gives_the_pin_back_and_the_next_forward_recovers(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(model, [0, 1], manager=manager) as group:
        for device in (0, 1):
            assert torch.equal(group[device](x), expected)
        manager.sim.fail("cuMemcpyDtoDAsync", device=1, error="error")
        with pytest.raises(aimdo.DriverError, match="cuMemcpyDtoDAsync"):
            group[1](x)
        # Nothing stays pinned on either device: device 0 can evict the pages again.
        for offload in group.offloads:
            assert not any(pinned for _, pinned in offload.vbar.residency())
        assert torch.equal(group[1](x), expected)
        assert group.last_stats[1].bytes_from_peers == group.last_stats[1].bytes_copied > 0


@pytest.mark.sim_only
def test_the_second_device_places_the_same_order_rotated_by_half(make_manager):
    model = stack(blocks=6)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(model, [0, 1], manager=manager) as group:
        first = [name for name, _, _ in group.offloads[0].placement()]
        second = [name for name, _, _ in group.offloads[1].placement()]
        assert first[:6] == second[:6] == [f"{i}.norm" for i in range(6)]  # small: first
        assert second[6:] == first[12:] + first[6:12]


def test_bad_groups_are_refused_before_anything_changes(make_manager):
    model = stack(blocks=2)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(ValueError, match="distinct devices"):
        atorch.offload_group(model, [0, 0], manager=manager)
    with pytest.raises(ValueError, match="distinct devices"):
        atorch.offload_group(model, [], manager=manager)
    with pytest.raises(aimdo.DeviceNotInitializedError):
        atorch.offload_group(model, [0, 7], manager=manager)
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    assert manager.vbar_count(0) == 0


@pytest.mark.sim_only
@pytest.mark.parametrize("count", [2, 4, 8])
def test_n_devices_together_hold_the_model_and_pull_only_from_each_other(make_manager, count):
    model = stack(blocks=8)  # 16 blocks of 1 MiB + 4 KiB, 8 small norms
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    sim = aimdo.SimBackend(f"{count}x1GiB", real_bytes=True, topology="h200-nvlink")
    pages = -(-10 // count) + 1  # ceil(10 / count) + 1: together more than the 16 MiB
    manager = make_manager(pages=pages, devices=range(count), sim=sim)
    with atorch.offload_group(model, range(count), manager=manager) as group:
        for _ in range(3):
            for index in range(count):
                assert torch.equal(group[index](x), expected)
        names = {name for name, _, _ in group.offloads[0].placement()}
        held = set().union(*(resident_blocks(offload) for offload in group.offloads))
        assert held == names
        for stats in group.last_stats:
            assert stats.bytes_copied > 0 and stats.bytes_from_peers == stats.bytes_copied
        for offload in group.offloads:
            assert offload.vbar.readers == [d for d in range(count) if d != offload.vbar.device]


@pytest.mark.sim_only
def test_a_donor_holds_what_the_computing_device_lacks(make_manager):
    # Donor mode: device 0 computes; device 1 never runs, its pages (filled at once) hold
    # the blocks device 0 keeps last, so device 0 copies those from it, not the host.
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = group_manager(make_manager, pages=4)  # 8 of the 12 MiB each
    with atorch.offload_group(model, [0, 1], manager=manager, donors=[1]) as group:
        donor = group.offloads[1]
        held = resident_blocks(donor)
        assert len(held) == 6 + 7  # the 6 norms, then 7 blocks of 1 MiB + 4 KiB in 8 MiB
        assert donor.fill() == 0  # filled already: nothing to copy
        for _ in range(3):
            assert torch.equal(group[0](x), expected)
        stats = group.last_stats[0]
        alone = resident_blocks(group.offloads[0])
        assert alone | held == {name for name, _, _ in donor.placement()}
        # Every block device 0 lacks is on the donor: nothing comes from the host.
        assert stats.bytes_copied > 0 and stats.bytes_from_peers == stats.bytes_copied
    with pytest.raises(aimdo.InvalidStateError, match="undone"):
        donor.fill()


def test_donors_must_leave_a_device_to_compute(make_manager):
    model = stack(blocks=2)
    manager = new_manager(make_manager, pages=4)
    for donors in ([0], [3]):
        with pytest.raises(ValueError, match="donors"):
            atorch.offload_group(model, [0], manager=manager, donors=donors)
    assert manager.vbar_count(0) == 0


@pytest.mark.sim_only
def test_members_are_undone_with_the_group_and_never_while_one_runs(make_manager):
    model = stack(blocks=4)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = group_manager(make_manager, pages=5)
    group = atorch.offload_group(model, [0, 1], manager=manager)
    # A member alone would free pages its peers read: only the group undoes it.
    with pytest.raises(aimdo.InvalidStateError, match="undo the group"):
        group.offloads[1].undo()
    entered, leave = threading.Event(), threading.Event()

    def hold(module, args, output):
        entered.set()
        leave.wait(30)

    handle = group[1][0].register_forward_hook(hold)  # the copy's first block
    worker = threading.Thread(target=lambda: group[1](x))
    worker.start()
    try:
        assert entered.wait(30)
        with pytest.raises(aimdo.InvalidStateError, match="while one of its modules runs"):
            group.undo()
        assert not any(offload.undone for offload in group.offloads)  # nothing changed
    finally:
        leave.set()
        worker.join()
        handle.remove()
    assert torch.equal(group[0](x), expected)
    group.undo()
    group.undo()  # a second call does nothing
    assert all(offload.undone for offload in group.offloads)
    assert manager.vbar_count(0) == manager.vbar_count(1) == 0
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.sim_only
@pytest.mark.parametrize("topology, peers", [("h200-nvlink", False), ("rtx4090-pcie", True)])
def test_a_donor_without_peer_access_is_refused(make_manager, topology, peers):
    model = stack(blocks=2)
    manager = group_manager(make_manager, pages=4, topology=topology)
    with pytest.raises(ValueError, match="would serve no one"):
        atorch.offload_group(model, [0, 1], manager=manager, peers=peers, donors=[1])
    assert manager.vbar_count(0) == manager.vbar_count(1) == 0
