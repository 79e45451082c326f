"""offload(prefetch="auto"): the depth chosen from the module's own timed compute, predicted
at each candidate depth on a simulator of the machine (issue 12: the prefetch depth follows
each block's measured compute)."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo._torch_tune as tune  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo.predict import PredictedStep  # noqa: E402
from torch_support import new_manager, reference, stack, where  # noqa: E402


def test_auto_prefetch_takes_the_fastest_predicted_depth(make_manager, caplog):
    model = stack(blocks=6)  # 12 blocks of 1 MiB + 4 KiB, 6 small norms
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=4)
    caplog.set_level(logging.INFO, logger="aimdo")
    with atorch.offload(model, 0, manager=manager, prefetch="auto") as offloaded:
        assert offloaded.prefetch == tune.START
        assert torch.equal(model(x.to(where(0))), expected)  # learns the order
        assert offloaded.prefetch_predictions is None
        assert torch.equal(model(x.to(where(0))), expected)  # timed, then chosen
        predicted = offloaded.prefetch_predictions
        assert sorted(predicted) == list(tune.CANDIDATES)
        best = min(predicted.values())
        within = [p for p, seconds in predicted.items() if seconds <= best * (1 + tune.MARGIN)]
        assert offloaded.prefetch == min(within)
        logged = [r.getMessage() for r in caplog.records if "takes prefetch" in r.getMessage()]
        assert len(logged) == 1 and f"takes prefetch {offloaded.prefetch}," in logged[0]
        for _ in range(2):  # runs on at the chosen depth, timed no more
            assert torch.equal(model(x.to(where(0))), expected)
        assert offloaded.prefetch_predictions is predicted
        assert offloaded.last_stats.layers == 18


def test_the_shallowest_depth_within_the_margin_of_the_fastest_is_kept(make_manager, monkeypatch):
    table = {1: 1.0, 2: 0.9, 3: 0.85, 4: 0.849, 6: 0.86, 8: 0.9}
    asked = []

    def predict(manager, device, sizes, seconds, *, steps, prefetch, staging_bytes):
        asked.append((prefetch, staging_bytes))
        return [PredictedStep(seconds=table[prefetch])]

    monkeypatch.setattr(tune, "predict_offload", predict)
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, prefetch="auto") as offloaded:
        for _ in range(2):
            model(x.to(where(0)))
        # 0.85 is within 1% of the fastest (0.849): the shallower 3 is kept.
        assert offloaded.prefetch == 3
        assert offloaded.prefetch_predictions == table
        assert [p for p, _ in asked] == list(tune.CANDIDATES)
        # Each depth was predicted with the staging offload would give it.
        sizes = [block.nbytes for block in offloaded._blocks]
        budget = manager.budget_bytes(0)
        for prefetch, staging in asked:
            assert staging == tune.auto_staging_bytes(sizes, prefetch, budget)
        schedule = offloaded._runner.schedule
        assert schedule.slot_limit_bytes == tune.auto_staging_bytes(sizes, 3, budget) // 4


def test_a_declared_order_is_timed_on_the_first_forward(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    manager = new_manager(make_manager, pages=4)
    order = [m for m in model.modules() if list(m.parameters(recurse=False))]
    with atorch.offload(model, 0, manager=manager, prefetch="auto", order=order) as offloaded:
        assert torch.equal(model(x.to(where(0))), reference(model, x, 0))
        assert offloaded.prefetch_predictions is not None


def test_a_failed_forward_is_timed_again_by_the_next(make_manager):
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=4)
    fail = {"now": False}

    def hook(module, args):
        if fail["now"]:
            raise RuntimeError("injected")

    handle = model[3].register_forward_pre_hook(hook)
    with atorch.offload(model, 0, manager=manager, prefetch="auto") as offloaded:
        model(x.to(where(0)))
        fail["now"] = True
        with pytest.raises(RuntimeError, match="injected"):
            model(x.to(where(0)))
        assert offloaded.prefetch_predictions is None
        assert offloaded._runner.schedule.marks is None
        fail["now"] = False
        assert torch.equal(model(x.to(where(0))), expected)
        assert offloaded.prefetch_predictions is not None
    handle.remove()


def test_a_failed_prediction_keeps_the_depth_and_warns(make_manager, monkeypatch, caplog):
    def predict(*args, **kwargs):
        raise RuntimeError("no simulator today")

    monkeypatch.setattr(tune, "predict_offload", predict)
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, prefetch="auto") as offloaded:
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
        assert offloaded.prefetch == tune.START and offloaded.prefetch_predictions is None
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no simulator today" in warned[0].getMessage()


def test_bad_prefetch_values_are_refused(make_manager):
    model = stack(blocks=2)
    manager = new_manager(make_manager, pages=4)
    with pytest.raises(ValueError, match="non-negative int or 'auto'"):
        atorch.offload(model, 0, manager=manager, prefetch="fast")
    with pytest.raises(ValueError, match="prefetch='auto' is offload"):
        atorch.offload_group(model, [0, 1], manager=manager, prefetch="auto")
    assert manager.vbar_count(0) == 0
    assert isinstance(model[0].up.weight, torch.nn.Parameter)
    with atorch.offload(model, 0, manager=manager, prefetch=1) as offloaded:
        assert offloaded.prefetch == 1 and offloaded.prefetch_predictions is None
