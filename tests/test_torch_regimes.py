"""An offload group called as one model: the batch run in a regime (split over the devices,
or on the first with the others as donors or idle), forced or chosen from the prediction
of this machine's links, and logged (issue 13, item 5)."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo._schedule import use_seconds  # noqa: E402
from aimdo._torch_regime import bound_by_host, choose, gather  # noqa: E402
from aimdo.predict import Regime  # noqa: E402
from test_torch_group import group_manager, resident_blocks  # noqa: E402
from torch_support import reference, stack, where  # noqa: E402


def expected_outputs(model, x):
    """The plain model's output for the whole batch on device 0, and for the batch split
    in two, each half on its device, put together on device 0."""
    whole = reference(model, x, 0)
    halves = [reference(model, half, device) for device, half in enumerate(x.tensor_split(2))]
    return whole, torch.cat([half.to(where(0)) for half in halves])


@pytest.mark.parametrize(
    "regime, computing, from_peers",
    [
        ("split with peers", [0, 1], True),
        ("split from the host", [0, 1], False),
        ("donor", [0], True),
        ("one device", [0], False),
    ],
)
def test_a_forced_regime_runs_the_batch_on_its_devices(make_manager, regime, computing, from_peers):
    model = stack(blocks=6)  # 12 blocks of 1 MiB + 4 KiB, 6 small norms
    x = torch.randn(4, 256)
    whole, split = expected_outputs(model, x)
    manager = group_manager(make_manager, pages=5)  # each device holds 10 of the 12 MiB
    with atorch.offload_group(model, [0, 1], manager=manager, regime=regime) as group:
        assert group.regime.name == regime and group.ranking is None
        for _ in range(3):
            out = group(x.to(where(0)))
        assert torch.equal(out, split if len(computing) == 2 else whole)
        stats = group.last_stats
        for index in (0, 1):
            ran = stats[index].layers > 0
            assert ran == (index in computing), (index, stats[index])
        for index in computing:
            # Steady state: what a device lacks is on the other's pages (peers on) or comes
            # from the host (peers off).
            assert stats[index].bytes_copied > 0
            expected = stats[index].bytes_copied if from_peers else 0
            assert stats[index].bytes_from_peers == expected
        if regime == "donor":
            # The donor holds, resident, the blocks the first device lacks.
            assert resident_blocks(group.offloads[1]) | resident_blocks(group.offloads[0]) == {
                block.name for block in group.offloads[0]._blocks
            }


def test_one_device_copies_what_offload_alone_copies(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload(model, 0, manager=manager) as alone:
        for _ in range(3):
            model(x.to(where(0)))
        copied = alone.last_stats.bytes_copied
    with atorch.offload_group(model, [0, 1], manager=manager, regime="one device") as group:
        for _ in range(3):
            group(x.to(where(0)))
        assert group.last_stats[0].bytes_copied == copied
        assert group.last_stats[0].bytes_from_peers == 0


def test_auto_chooses_on_the_third_call_the_fastest_it_can_run(make_manager, caplog):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    whole, split = expected_outputs(model, x)
    manager = group_manager(make_manager, pages=5)
    caplog.set_level(logging.INFO, logger="aimdo")
    with atorch.offload_group(model, [0, 1], manager=manager) as group:
        # The first two calls run the whole batch on the first device (the second is
        # timed), the third runs the split (its host timed); then the group has chosen.
        for _ in range(2):
            assert torch.equal(group(x.to(where(0))), whole)
            assert group.regime is None
        assert torch.equal(group(x.to(where(0))), split)
        chosen = group.regime
        names = [regime.name for regime in group.ranking]
        assert sorted(names) == sorted([*atorch.REGIMES, "layer split"])
        assert chosen == choose(group.ranking, peers=True, can_split=True)
        assert chosen.name in atorch.REGIMES
        logged = [r.getMessage() for r in caplog.records if "offload group" in r.getMessage()]
        assert len(logged) == 1 and repr(chosen.name) in logged[0]
        assert any("fastest first" in r.getMessage() for r in caplog.records)
        before = group.offloads[1].last_stats
        out = group(x.to(where(0)))
        splits = chosen.name in ("split with peers", "split from the host")
        assert torch.equal(out, split if splits else whole)
        # The second device ran a forward in this call exactly when the regime splits.
        assert (group.offloads[1].last_stats is not before) == splits


def test_auto_does_not_split_a_batch_of_one(make_manager):
    model = stack(blocks=6)
    x = torch.randn(1, 256)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(model, [0, 1], manager=manager) as group:
        for _ in range(2):
            out = group(x.to(where(0)))
        assert group.regime.name in ("donor", "one device")
        assert torch.equal(out, reference(model, x, 0))
        assert torch.equal(group(x.to(where(0))), reference(model, x, 0))


def test_a_split_regime_runs_a_batch_too_small_to_split_on_the_first_device(make_manager):
    model = stack(blocks=6)
    x = torch.randn(1, 256)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(model, [0, 1], manager=manager, regime="split with peers") as group:
        assert torch.equal(group(x.to(where(0))), reference(model, x, 0))
        assert group.last_stats[1].layers == 0


def test_choose_skips_what_the_group_cannot_run():
    ranking = [
        Regime("layer split", 1.0, ""),
        Regime("split with peers", 2.0, ""),
        Regime("donor", 3.0, ""),
        Regime("split from the host", 4.0, ""),
        Regime("one device", 5.0, ""),
    ]
    assert choose(ranking, peers=True, can_split=True).name == "split with peers"
    assert choose(ranking, peers=False, can_split=True).name == "split from the host"
    assert choose(ranking, peers=True, can_split=False).name == "donor"
    assert choose(ranking, peers=False, can_split=False).name == "one device"


def test_a_split_is_counted_no_faster_than_its_host():
    ranking = [
        Regime("split with peers", 0.1, "p"),
        Regime("donor", 0.2, "d"),
        Regime("split from the host", 0.3, "h"),
        Regime("one device", 0.4, "o"),
    ]
    bounded = bound_by_host(ranking, 0.25)
    assert [(r.name, r.seconds) for r in bounded] == [
        ("donor", 0.2),
        ("split with peers", 0.25),
        ("split from the host", 0.3),
        ("one device", 0.4),
    ]
    assert "bound by the host" in bounded[1].detail and bounded[2].detail == "h"
    assert bound_by_host(ranking, 0.0) == ranking


def test_choose_forces_a_regime_from_then_on(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    whole, split = expected_outputs(model, x)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(model, [0, 1], manager=manager, regime="one device") as group:
        assert torch.equal(group(x.to(where(0))), whole)
        group.choose("split from the host")
        assert group.regime.name == "split from the host"
        assert torch.equal(group(x.to(where(0))), split)
        assert all(stats.bytes_from_peers == 0 for stats in group.last_stats)


def test_bad_regimes_are_refused_before_anything_changes(make_manager):
    model = stack(blocks=2)
    manager = group_manager(make_manager, pages=5)
    with pytest.raises(ValueError, match="does not run a layer split"):
        atorch.offload_group(model, [0, 1], manager=manager, regime="layer split")
    with pytest.raises(ValueError, match="regime must be"):
        atorch.offload_group(model, [0, 1], manager=manager, regime="fastest")
    with pytest.raises(ValueError, match="peers=False forbids"):
        atorch.offload_group(model, [0, 1], manager=manager, peers=False, regime="donor")
    with pytest.raises(ValueError, match="with donors runs the 'donor' regime"):
        atorch.offload_group(model, [0, 1], manager=manager, donors=[1], regime="one device")
    assert manager.vbar_count(0) == 0 and manager.vbar_count(1) == 0
    with atorch.offload_group(model, [0, 1], manager=manager, peers=False) as group:
        with pytest.raises(ValueError, match="has no peers"):
            group.choose("split with peers")
        with pytest.raises(ValueError, match="'auto' is chosen by a call"):
            group.choose("auto")
        assert group.regime is None
    with pytest.raises(aimdo.InvalidStateError, match="undone"):
        group(torch.randn(2, 256).to(where(0)))


def test_a_group_with_donors_runs_the_donor_regime(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    manager = group_manager(make_manager, pages=5)
    with atorch.offload_group(model, [0, 1], manager=manager, donors=[1]) as group:
        assert group.regime.name == "donor"
        with pytest.raises(ValueError, match="made with donors"):
            group.choose("split with peers")
        for _ in range(2):
            out = group(x.to(where(0)))
        assert torch.equal(out, reference(model, x, 0))
        assert group.last_stats[1].layers == 0


def test_gather_keeps_output_types_and_refuses_what_it_cannot_join():
    class Output(dict):
        pass

    parts = [
        (torch.ones(1, 2), Output(a=torch.zeros(1), b=None), [torch.ones(2, 1)], "same"),
        (torch.ones(2, 2), Output(a=torch.ones(1), b=None), [torch.zeros(1, 1)], "same"),
    ]
    joined = gather(parts, torch.device("cpu"))
    assert type(joined) is tuple and joined[0].shape == (3, 2)
    assert type(joined[1]) is Output and torch.equal(joined[1]["a"], torch.tensor([0.0, 1.0]))
    assert joined[1]["b"] is None and joined[2][0].shape == (3, 1) and joined[3] == "same"
    with pytest.raises(TypeError, match="of type str"):
        gather(["a", "b"], torch.device("cpu"))
    with pytest.raises(TypeError, match="without a batch dimension"):
        gather([torch.tensor(1.0), torch.tensor(2.0)], torch.device("cpu"))
    with pytest.raises(TypeError, match="keys differ"):
        gather([{"a": torch.ones(1)}, {"b": torch.ones(1)}], torch.device("cpu"))


def test_use_seconds_leaves_copies_out_and_keeps_the_rest():
    # Marks at whole seconds: the outer block a, a nested b, a parent's own compute
    # between a and c, and compute before the first block.
    a, b, c = "a", "b", "c"
    marks = [
        ("start", None, 0.0),
        ("enter", a, 1.0),  # 1 s before: counts for a (the first use)
        ("ready", a, 3.0),  # 2 s copying a: counts for nobody
        ("enter", b, 4.0),  # 1 s of a's own compute
        ("ready", b, 4.5),  # copying b
        ("exit", b, 6.5),  # 2 s of b
        ("exit", a, 7.0),  # 0.5 s of a again
        ("enter", c, 8.0),  # 1 s outside every use: the use before (a)
        ("ready", c, 8.0),
        ("exit", c, 11.0),  # 3 s of c
        ("end", None, 11.25),  # after the last use: c
    ]
    seconds = use_seconds(marks, lambda first, second: second - first)
    assert seconds == [(a, 3.5), (b, 2.0), (c, 3.25)]


@pytest.mark.sim_only
def test_a_simulator_twin_has_the_same_devices_and_links_and_nothing_on_them():
    sim = aimdo.SimBackend("2x1GiB", real_bytes=True, topology="h200-nvlink")
    sim.add_external_usage(0, 1 << 20)
    twin = sim.twin()
    assert twin.device_count == 2 and not twin.real_bytes
    assert twin.external_usage(0) == 0
    assert twin.peer_link(0, 1) == sim.peer_link(0, 1)
    assert twin.peer_link(0, 1).access


def test_all_devices_copy_at_once_and_a_failure_releases_the_others(monkeypatch):
    import threading as threads

    import aimdo._torch_regime as regime

    rates = {0: 5.0, 1: 3.0, 2: 4.0}

    def bandwidth(device, ready):
        if device == 2 and rates[2] < 0:
            raise RuntimeError("no pinned memory")
        ready.wait(timeout=10)  # every device starts its copies together
        return rates[device]

    monkeypatch.setattr(regime, "_host_bandwidth", bandwidth)
    assert regime._all_at_once([0, 1, 2]) == 3.0
    rates[2] = -1.0
    with pytest.raises((RuntimeError, threads.BrokenBarrierError)):
        regime._all_at_once([0, 1, 2])
