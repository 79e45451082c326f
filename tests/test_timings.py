"""Timings (issue 15, item 1): per forward and per block, bytes copied by source, copy
time, compute time and the compute's stall on copies (aimdo.torch, Offload.last_timings);
per device, driver calls and their time, and resident bytes per VBAR (Manager.report)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo.sim import COST_NAMES  # noqa: E402
from conftest import BACKEND, PAGE  # noqa: E402
from torch_support import new_manager, one_page_layers, reference, stack, where  # noqa: E402


# -- per device ---------------------------------------------------------------------------
def test_every_driver_call_of_a_fault_is_counted(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    allocation = vbar.alloc(3 * PAGE)
    before = manager.stats(0)
    vbar.fault(allocation)
    after = manager.stats(0)
    mapped = after["pages_mapped"] - before["pages_mapped"]
    polls = after["polls"] - before["polls"]
    assert mapped == 3
    # Each page: cuMemCreate, cuMemMap, cuMemSetAccess; each poll: cuMemGetInfo.
    assert after["driver_calls"] - before["driver_calls"] == 3 * mapped + polls
    assert after["driver_ns"] > before["driver_ns"]


@pytest.mark.sim_only
def test_driver_time_is_the_simulated_cost_of_the_calls(make_manager):
    costs = dict.fromkeys(COST_NAMES, 0.0)
    costs["cuMemMap"] = 0.001
    manager = make_manager(pages=8, sim=aimdo.SimBackend("1x1GiB", costs=costs))
    vbar = manager.create_vbar(4 * PAGE, device=0)
    before = manager.stats(0)["driver_ns"]
    vbar.fault(vbar.alloc(3 * PAGE))
    report = manager.report(0)
    assert report["driver_ns"] - before == 3 * 1_000_000  # three maps of 1 ms, nothing else
    assert report["driver_seconds"] == report["driver_ns"] / 1e9


def test_the_report_gives_each_vbar_in_priority_order_with_its_pages(make_manager):
    manager = make_manager(pages=4)
    low = manager.create_vbar(4 * PAGE, device=0)
    high = manager.create_vbar(2 * PAGE, device=0)  # created last: most important
    low.fault(low.alloc(3 * PAGE))  # 3 pages resident and pinned
    first = high.alloc(PAGE)
    high.fault(first)
    high.unpin(first)  # 1 page resident, not pinned
    assert manager.vbars(0) == [high, low]
    report = manager.report(0)
    # The budget counts what others used at the Manager's poll (conftest.make_manager).
    assert report["resident_bytes"] == 4 * PAGE
    assert report["budget_bytes"] == 4 * PAGE + manager.baseline[0]
    assert report["vbars"] == [
        {
            "size_bytes": 2 * PAGE,
            "page_count": 2,
            "resident_bytes": PAGE,
            "pinned_bytes": 0,
            "watermark_bytes": 2 * PAGE,
        },
        {
            "size_bytes": 4 * PAGE,
            "page_count": 4,
            "resident_bytes": 3 * PAGE,
            "pinned_bytes": 3 * PAGE,
            "watermark_bytes": 4 * PAGE,
        },
    ]
    high.close()
    assert manager.vbars(0) == [low]


# -- per forward, per block ---------------------------------------------------------------
def offloaded_layers(make_manager, layers: int, pages: int, **options):
    log = []
    model = one_page_layers(layers, log)
    x = torch.randn(2, model[0].in_features)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=pages)
    handle = atorch.offload(model, 0, manager=manager, **options)
    handle.test_manager = manager
    return model, x.to(where(0)), expected, handle


def test_timings_are_off_by_default_and_switch_between_forwards(make_manager):
    model, x, expected, handle = offloaded_layers(make_manager, layers=4, pages=8)
    with handle:
        assert handle.timings is False
        model(x)
        assert handle.last_timings is None
        handle.timings = True
        assert torch.equal(model(x), expected)
        assert handle.last_timings is not None
        with pytest.raises(TypeError, match="timings must be a bool"):
            handle.timings = 1
        assert handle.timings is True
    manager = handle.test_manager
    with pytest.raises(TypeError, match="timings must be a bool"):
        atorch.offload(model, 0, manager=manager, timings="yes")
    assert not manager.vbars(0)  # refused before anything was made


def test_each_block_says_what_it_copied_and_where_from(make_manager):
    # 6 one-page layers, 4 pages: the 4 placed first stay resident, 2 are copied each time.
    model, x, expected, handle = offloaded_layers(
        make_manager, layers=6, pages=4, timings=True, spread=False
    )
    with handle:
        for step in range(3):
            assert torch.equal(model(x), expected)
            timings, stats = handle.last_timings, handle.last_stats
            assert [b.name for b in timings.blocks] == [str(i) for i in range(6)]
            assert all(b.uses == 1 and b.nbytes == PAGE for b in timings.blocks)
            copied = {b.name for b in timings.blocks if b.bytes_copied}
            if step == 0:  # the first forward copies everything in
                assert copied == {str(i) for i in range(6)}
            else:
                assert copied == {"4", "5"}
            for b in timings.blocks:
                assert (b.source == "host") == (b.name in copied)
                assert (b.copy_seconds > 0) == (b.name in copied)
                assert b.compute_seconds > 0
            assert timings.bytes_from_host == stats.bytes_copied == PAGE * len(copied)
            assert timings.bytes_from_peers == timings.bytes_from_files == 0
            assert timings.bytes_copied == stats.bytes_copied
            # Compute and stall are the forward, cut in two (up to the marks' own time).
            assert timings.compute_seconds + timings.stall_seconds <= timings.seconds + 1e-4
            assert timings.compute_seconds == sum(b.compute_seconds for b in timings.blocks)
            assert timings.clock == ("cuda events" if BACKEND == "cuda" else "host clock")


def test_a_block_used_twice_is_one_row_with_two_uses(make_manager):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Linear(256, 256)
            self.other = torch.nn.Linear(256, 256)

        def forward(self, x):
            return self.shared(self.other(self.shared(x)))

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, timings=True) as handle:
        for _ in range(2):
            assert torch.equal(model(x.to(where(0))), expected)
        rows = {b.name: b.uses for b in handle.last_timings.blocks}
        assert rows == {"shared": 2, "other": 1}


def test_peer_copies_and_file_reads_are_their_own_sources(make_manager, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    real = stack(blocks=6)
    x = torch.randn(2, 256)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in real.state_dict().items()}, str(path)
    )
    with torch.device("meta"):
        model = stack(blocks=6)
    manager = new_manager(make_manager, pages=4)  # 8 of the 12 MiB: some copied each time
    with atorch.offload(
        model, 0, manager=manager, checkpoint=path, host_limit=0, timings=True
    ) as handle:
        for _ in range(2):
            model(x.to(where(0)))
        timings = handle.last_timings
        assert timings.bytes_from_files == handle.last_stats.bytes_from_files > 0
        assert timings.bytes_from_host == timings.bytes_from_peers == 0
        assert {b.source for b in timings.blocks if b.bytes_copied} == {"file"}


def test_a_group_member_times_its_copies_from_the_peer(make_manager):
    from test_torch_group import group_manager

    model = stack(blocks=6)
    x = torch.randn(2, 256)
    manager = group_manager(make_manager, pages=5)  # each holds 10 of the 12 MiB
    with atorch.offload_group(model, [0, 1], manager=manager, timings=True) as group:
        assert all(member.timings for member in group.offloads)
        member = group.offloads[1]
        for _ in range(3):
            for device in (0, 1):
                group[device](x.to(where(device)))
        timings, stats = member.last_timings, member.last_stats
        assert stats.bytes_from_peers > 0
        assert timings.bytes_from_peers == stats.bytes_from_peers
        assert timings.bytes_from_host == stats.bytes_copied - stats.bytes_from_peers
        assert all(b.source == "peer" for b in timings.blocks if b.bytes_copied)


def test_a_failed_forward_leaves_no_timings(make_manager):
    model, x, expected, handle = offloaded_layers(make_manager, layers=4, pages=8, timings=True)
    with handle:
        model(x)
        assert handle.last_timings is not None
        with pytest.raises(RuntimeError):
            model(x[:, :3])  # wrong width: the first layer raises
        assert handle.last_timings is None
        assert torch.equal(model(x), expected)
        assert handle.last_timings is not None


def test_timings_and_the_prefetch_tuner_share_one_timed_forward(make_manager):
    model, x, expected, handle = offloaded_layers(
        make_manager, layers=6, pages=4, timings=True, prefetch="auto"
    )
    with handle:
        for _ in range(3):
            assert torch.equal(model(x), expected)
            assert handle.last_timings is not None
        assert handle.prefetch_predictions is not None  # the tuner chose from its forward
        assert handle.prefetch in handle.prefetch_predictions


def test_the_table_names_the_slowest_blocks(make_manager):
    model, x, expected, handle = offloaded_layers(
        make_manager, layers=6, pages=4, timings=True, spread=False
    )
    with handle:
        model(x)
        model(x)
        text = handle.last_timings.table(top=2)
    lines = text.splitlines()
    assert lines[0].startswith("forward ") and "host 4.00 MiB" in lines[0]
    assert len(lines) == 1 + 1 + 2 + 1 and lines[-1] == "... and 4 more blocks"
    as_dict = handle.last_timings.as_dict()
    assert as_dict["bytes_copied"] == 2 * PAGE and len(as_dict["blocks"]) == 6
