"""Steering while running (issue 15, item 3): a device's budget changed at run time, from
another thread too, evicting down to it at once and growing back into a larger one; an
offloaded model paused (its device memory given back, its state kept) and resumed."""

from __future__ import annotations

import logging
import threading

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from aimdo._sizes import format_size  # noqa: E402
from conftest import PAGE  # noqa: E402
from torch_support import new_manager, one_page_layers, reference, where  # noqa: E402


def offloaded(make_manager, layers: int, pages: int):
    log = []
    model = one_page_layers(layers, log)
    x = torch.randn(2, model[0].in_features)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=pages)
    return model, x.to(where(0)), expected, manager


def test_a_smaller_budget_evicts_at_once_and_a_larger_one_fills_again(make_manager, caplog):
    caplog.set_level(logging.INFO, logger="aimdo")
    model, x, expected, manager = offloaded(make_manager, layers=8, pages=8)
    limit = manager.limit_bytes(0)
    with atorch.offload(model, 0, manager=manager) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 8 * PAGE
        evicted = manager.set_budget(0, vram_limit=limit - 5 * PAGE)
        assert evicted == 5 * PAGE and manager.resident_bytes(0) == 3 * PAGE
        # The budget counts what others used when the Manager polled (on a GPU: the
        # contexts), which the test's limit added (conftest.make_manager).
        others = manager.baseline[0]
        assert manager.budget_bytes(0) == 3 * PAGE + others
        logged = [r.getMessage() for r in caplog.records if "set_budget" in r.getMessage()]
        assert logged == [
            f"aimdo: device 0 budget {format_size(8 * PAGE + others)} -> "
            f"{format_size(3 * PAGE + others)} (set_budget); 10.00 MiB evicted at once"
        ]
        for _ in range(2):
            assert torch.equal(model(x), expected)
            assert manager.resident_bytes(0) <= 3 * PAGE
        assert handle.last_stats.offloaded_layers == 5
        assert manager.set_budget(0, vram_limit=limit) == 0
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 8 * PAGE
        assert handle.last_stats.hits == 8


def test_the_budget_changes_from_another_thread_during_a_forward(make_manager):
    model, x, expected, manager = offloaded(make_manager, layers=8, pages=8)
    limit = manager.limit_bytes(0)
    evicted = []

    def shrink(module, args):
        worker = threading.Thread(
            target=lambda: evicted.append(manager.set_budget(0, vram_limit=limit - 4 * PAGE))
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive()

    with atorch.offload(model, 0, manager=manager):
        for _ in range(2):
            assert torch.equal(model(x), expected)
        handle = model[4].register_forward_pre_hook(shrink)
        assert torch.equal(model(x), expected)
        handle.remove()
        # The layer running (pinned) stayed; every other page over the budget went.
        assert evicted and 0 < evicted[0] <= 4 * PAGE
        assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) <= 4 * PAGE


def test_set_budget_refuses_bad_input_and_changes_nothing(make_manager):
    manager = new_manager(make_manager, pages=8)
    budget = manager.budget_bytes(0)
    with pytest.raises(aimdo.DeviceNotInitializedError):
        manager.set_budget(7, vram_limit=PAGE)
    with pytest.raises(ValueError):
        manager.set_budget(0, vram_limit="lots")
    with pytest.raises(TypeError):
        manager.set_budget(0, headroom=1.5)
    assert manager.budget_bytes(0) == budget


def test_a_paused_model_gives_its_memory_back_and_resumes(make_manager):
    model, x, expected, manager = offloaded(make_manager, layers=8, pages=4)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 4 * PAGE and handle.staging_bytes > 0
        assert handle.pause() == 4 * PAGE
        assert handle.paused
        assert manager.resident_bytes(0) == 0 and handle.staging_bytes == 0
        with pytest.raises(aimdo.InvalidStateError, match="paused"):
            model(x)
        assert handle.pause() == 0  # nothing left to give back
        handle.resume()
        assert not handle.paused
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 4 * PAGE


def test_a_running_model_cannot_be_paused(make_manager):
    model, x, expected, manager = offloaded(make_manager, layers=4, pages=4)
    refused = []

    def pause_now(module, args):
        try:
            offload.pause()
        except aimdo.InvalidStateError as error:
            refused.append(error)

    with atorch.offload(model, 0, manager=manager) as offload:
        model[2].register_forward_pre_hook(pause_now)
        assert torch.equal(model(x), expected)
        assert len(refused) == 1 and not offload.paused
    with pytest.raises(aimdo.InvalidStateError, match="undone"):
        offload.pause()
