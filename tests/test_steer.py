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
from torch_support import new_manager, one_page_layers, reference, stack, where  # noqa: E402


def offloaded(make_manager, layers: int, pages: int):
    log = []
    model = one_page_layers(layers, log)
    x = torch.randn(2, model[0].in_features)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=pages)
    return model, x.to(where(0)), expected, manager


def on_simulator(make_manager, layers: int, pages: int, **options):
    """A simulator of its own (for tests that script it), a Manager of `pages` pages on
    it, a model of one-page layers, an input and the model's plain output."""
    sim = aimdo.SimBackend("2x1GiB", real_bytes=True)
    manager = make_manager(pages=pages, sim=sim, **options)
    model = one_page_layers(layers, [])
    x = torch.randn(2, model[0].in_features)
    return sim, manager, model, x, reference(model, x, 0)


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


def test_a_paused_device_gives_every_page_back_and_resumes_where_it_was(make_manager, caplog):
    caplog.set_level(logging.INFO, logger="aimdo")
    model, x, expected, manager = offloaded(make_manager, layers=8, pages=6)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        raw = manager.create_vbar(2 * PAGE, device=0)  # another user's, above the model
        page = raw.alloc(PAGE)
        raw.fault(page)
        raw.unpin(page)
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert handle.vbar.loaded_bytes == 5 * PAGE and raw.loaded_bytes == PAGE
        assert handle.staging_bytes > 0
        watermarks = (handle.vbar.watermark_bytes, raw.watermark_bytes)
        assert manager.pause(0) == 6 * PAGE
        assert manager.paused(0) and not handle.paused
        assert manager.resident_bytes(0) == 0 and handle.staging_bytes == 0
        assert raw.fault(page) is None  # offloaded while paused
        with pytest.raises(aimdo.InvalidStateError, match="device is paused"):
            model(x)
        assert manager.pause(0) == 0  # nothing left
        assert [r.getMessage() for r in caplog.records if "paused" in r.getMessage()] == [
            "aimdo: device 0 paused: 12.00 MiB of pages given back (2 VBARs)",
            "aimdo: device 0 paused: 0 B of pages given back (2 VBARs)",
        ]
        manager.resume(0)
        assert not manager.paused(0)
        # The other VBAR's watermark is back where it was; the offload's is raised to the
        # top, so that it fills again where the budget has room.
        top = -(-handle.vbar.size_bytes // PAGE) * PAGE
        assert (handle.vbar.watermark_bytes, raw.watermark_bytes) == (top, watermarks[1])
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert raw.fault(page) is not None  # the other VBAR maps its page again
        raw.unpin(page)
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert handle.vbar.loaded_bytes == 5 * PAGE and raw.loaded_bytes == PAGE
        manager.resume(0)  # not paused: nothing


def test_a_device_is_paused_from_another_thread_during_a_forward(make_manager):
    model, x, expected, manager = offloaded(make_manager, layers=8, pages=8)
    freed = []

    def pause(module, args):
        worker = threading.Thread(target=lambda: freed.append(manager.pause(0)))
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive()

    with atorch.offload(model, 0, manager=manager) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        hook = model[4].register_forward_pre_hook(pause)
        # The forward in progress finishes, bit for bit, its later blocks offloaded.
        assert torch.equal(model(x), expected)
        hook.remove()
        # Every page was resident and none pinned between two layers: all given back.
        assert freed == [8 * PAGE]
        assert handle.last_stats.offloaded_layers == 4  # layers 4 to 7, after the pause
        assert manager.resident_bytes(0) == 0 and handle.staging_bytes == 0
        with pytest.raises(aimdo.InvalidStateError, match="device is paused"):
            model(x)
        manager.resume(0)
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 8 * PAGE


def test_a_model_paused_within_a_paused_device_fills_again_once_both_resume(make_manager):
    model, x, expected, manager = offloaded(make_manager, layers=4, pages=4)
    with atorch.offload(model, 0, manager=manager) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        handle.pause()
        manager.pause(0)
        handle.resume()  # the device is still paused: nothing grows yet
        assert handle.vbar.watermark_bytes == 0
        manager.resume(0)
        assert handle.vbar.watermark_bytes == 4 * PAGE
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 4 * PAGE and handle.last_stats.hits == 4


def test_a_vbar_dropped_while_its_device_is_paused_is_freed(make_manager):
    import gc

    manager = new_manager(make_manager, pages=4)
    vbar = manager.create_vbar(2 * PAGE, device=0)
    manager.pause(0)
    del vbar
    gc.collect()
    assert manager.vbar_count(0) == 0
    manager.resume(0)
    assert not manager.paused(0)


def test_pause_refuses_a_device_it_does_not_have(make_manager):
    manager = new_manager(make_manager, pages=2)
    with pytest.raises(aimdo.DeviceNotInitializedError):
        manager.pause(5)
    with pytest.raises(aimdo.DeviceNotInitializedError):
        manager.resume(5)
    assert not manager.paused(0)


def test_evictions_for_memory_others_take_are_logged_once(make_manager, caplog):
    model, x, expected, manager = offloaded(make_manager, layers=8, pages=8)
    with atorch.offload(model, 0, manager=manager):
        for _ in range(2):
            assert torch.equal(model(x), expected)
        caplog.set_level(logging.INFO, logger="aimdo")
        caplog.clear()
        taken = manager.external_alloc(0, 3 * PAGE)  # memory made outside aimdo's VBARs
        try:
            for _ in range(2):
                assert torch.equal(model(x), expected)
            logged = [r.getMessage() for r in caplog.records if "evictions" in r.getMessage()]
            assert len(logged) == 1, logged
            assert logged[0].startswith(
                "aimdo: device 0: evictions for other memory lowered this model's resident "
                "share from 16.00 MiB to 10.00 MiB of "
            )
        finally:
            manager.external_free(taken)


@pytest.mark.sim_only
def test_memory_others_take_without_aimdo_is_given_back_at_the_next_forward(make_manager):
    # PyTorch's own pool grows without asking aimdo (no use_allocator): the next forward's
    # faults, hits all, poll the device (when a poll is due) and evict what it lacks.
    sim, manager, model, x, expected = on_simulator(make_manager, 8, pages=8, poll_interval=0)
    with atorch.offload(model, 0, manager=manager) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 8 * PAGE and handle.last_stats.hits == 8
        sim.add_external_usage(0, 3 * PAGE)
        try:
            assert manager.resident_bytes(0) == 8 * PAGE  # nothing evicts by itself
            assert torch.equal(model(x), expected)
            # Evicted by the forward's first fault: aimdo's pages and the others' fit.
            assert manager.resident_bytes(0) == 5 * PAGE
            assert handle.vbar.watermark_bytes == 5 * PAGE
            assert handle.last_stats.offloaded_layers == 3
            assert manager.stats(0)["evicted_bytes"] == 3 * PAGE
        finally:
            sim.remove_external_usage(0, 3 * PAGE)


@pytest.mark.sim_only
def test_a_pause_that_fails_part_way_still_stops_the_offloads_and_resume_undoes_it(
    make_manager,
):
    sim, manager, model, x, expected = on_simulator(make_manager, 4, pages=4)
    with atorch.offload(model, 0, manager=manager) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        sim.fail("cuMemUnmap", device=0, error="error", count=2)  # a release tries twice
        with pytest.raises(aimdo.DriverError):
            manager.pause(0)
        assert manager.paused(0)
        with pytest.raises(aimdo.InvalidStateError, match="device is paused"):
            model(x)
        manager.resume(0)
        assert not manager.paused(0) and handle.vbar.watermark_bytes == 4 * PAGE
        for _ in range(2):
            assert torch.equal(model(x), expected)


@pytest.mark.sim_only
def test_residency_evictions_took_grows_back_once_others_give_the_memory_back(make_manager):
    sim, manager, model, x, expected = on_simulator(make_manager, 8, pages=8, poll_interval=0)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        sim.add_external_usage(0, 3 * PAGE)
        try:
            for _ in range(2):  # evicted at the first; no room after either
                assert torch.equal(model(x), expected)
                assert manager.resident_bytes(0) == 5 * PAGE
                assert handle.vbar.watermark_bytes == 5 * PAGE
        finally:
            sim.remove_external_usage(0, 3 * PAGE)
        # The forward after the memory came back ends by raising the watermark by the
        # room (3 pages); the one after it maps them.
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 8 * PAGE
        assert manager.resident_bytes(0) == 5 * PAGE and handle.last_stats.offloaded_layers == 3
        assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 8 * PAGE and handle.last_stats.offloaded_layers == 0
        assert handle.last_stats.copied_layers == 3 and handle.last_stats.hits == 5


@pytest.mark.sim_only
def test_a_raise_the_next_forward_undoes_waits_for_more_room(make_manager):
    # Others' memory that comes during each forward and goes at its end (as a pool
    # emptied after every step would): the room seen between forwards is not there when
    # the faults need it. One raise is tried; once undone, none until the room grows.
    sim, manager, model, x, expected = on_simulator(make_manager, 8, pages=8, poll_interval=0)
    transient = {"on": False}

    def take(module, args):
        if transient["on"]:
            sim.add_external_usage(0, 3 * PAGE)

    def give(module, args, output):
        if transient["on"]:
            sim.remove_external_usage(0, 3 * PAGE)

    first, last = model[0].register_forward_pre_hook(take), model[7].register_forward_hook(give)
    try:
        with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
            for _ in range(2):
                assert torch.equal(model(x), expected)
            transient["on"] = True
            assert torch.equal(model(x), expected)  # evicted 3 pages; room at its end: raised
            assert handle.vbar.watermark_bytes == 8 * PAGE
            assert torch.equal(model(x), expected)  # the raise undone
            assert handle.vbar.watermark_bytes == 5 * PAGE
            evicted = manager.stats(0)["evicted_bytes"]
            for _ in range(3):  # no raise: the room is what the undone one had
                assert torch.equal(model(x), expected)
                assert handle.vbar.watermark_bytes == 5 * PAGE
            assert manager.stats(0)["evicted_bytes"] == evicted
            assert manager.resident_bytes(0) == 5 * PAGE
            # Nor does it wait for ever: FUTILE_WAIT forwards after the undone raise, the
            # same room is tried again, and holds once the others' memory stopped coming.
            transient["on"] = False
            assert torch.equal(model(x), expected)
            assert handle.vbar.watermark_bytes == 8 * PAGE
            assert torch.equal(model(x), expected)
            assert manager.resident_bytes(0) == 8 * PAGE
            assert handle.vbar.watermark_bytes == 8 * PAGE
    finally:
        first.remove()
        last.remove()


def test_a_resume_fills_the_whole_budget_again(make_manager):
    # From the top, the first forward after a resume fills in the order of use, and a fault
    # can find the room held by a less important block its window pins: it lowers the
    # watermark to its own start, below the budget (here to half of it). The next raise,
    # by the room, fills the budget.
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        for _ in range(3):
            assert torch.equal(model(x.to(where(0))), expected)
        assert manager.resident_bytes(0) == 4 * PAGE
        handle.pause()
        handle.resume()
        assert torch.equal(model(x.to(where(0))), expected)
        assert manager.resident_bytes(0) == 2 * PAGE
        assert handle.vbar.watermark_bytes == 4 * PAGE  # raised again, by the room
        assert torch.equal(model(x.to(where(0))), expected)
        assert manager.resident_bytes(0) == 4 * PAGE
        assert handle.vbar.watermark_bytes == 4 * PAGE


@pytest.mark.sim_only
def test_a_raise_pending_when_the_watermark_goes_to_the_top_is_not_judged(make_manager):
    # A raise, then a resume (the watermark to the top) before the next forward: that
    # forward, filling from the top, ends lower (the window's pins), and must not count
    # as the raise undone, or the room would wait behind it.
    model = stack(blocks=6)
    x = torch.randn(2, 256)
    expected = reference(model, x, 0)
    manager = new_manager(make_manager, pages=4, poll_interval=0)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        for _ in range(3):
            assert torch.equal(model(x), expected)
        manager.backend.add_external_usage(0, 2 * PAGE)
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 2 * PAGE
        manager.backend.remove_external_usage(0, 2 * PAGE)
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 4 * PAGE  # raised, not judged yet
        handle.pause()
        handle.resume()
        assert torch.equal(model(x), expected)  # from the top: ends at half, raised again
        assert handle.vbar.watermark_bytes == 4 * PAGE
        assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 4 * PAGE


def two_page_layers(count: int) -> torch.nn.Module:
    """`count` bias-free float32 Linear layers of exactly two pages each."""
    wide = 2 * PAGE // 4 // 1024
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[
            torch.nn.Linear(wide, 1024, bias=False)
            if i % 2 == 0
            else torch.nn.Linear(1024, wide, bias=False)
            for i in range(count)
        ]
    ).eval()


@pytest.mark.sim_only
def test_no_raise_for_room_smaller_than_the_block_above(make_manager):
    sim = aimdo.SimBackend("2x1GiB", real_bytes=True)
    manager = make_manager(pages=8, sim=sim, poll_interval=0)
    model = two_page_layers(4)
    x = torch.randn(2, model[0].in_features)
    expected = reference(model, x, 0)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 8 * PAGE
        sim.add_external_usage(0, 4 * PAGE)
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 4 * PAGE
        sim.remove_external_usage(0, PAGE)  # room for one page; the block above has two
        for _ in range(2):
            assert torch.equal(model(x), expected)
            assert handle.vbar.watermark_bytes == 4 * PAGE
        sim.remove_external_usage(0, PAGE)  # now room for it
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 6 * PAGE
        assert torch.equal(model(x), expected)
        assert manager.resident_bytes(0) == 6 * PAGE
        sim.remove_external_usage(0, 2 * PAGE)


@pytest.mark.sim_only
def test_a_failure_while_growing_back_leaves_the_forward_s_result(make_manager, monkeypatch):
    sim, manager, model, x, expected = on_simulator(make_manager, 8, pages=8, poll_interval=0)
    with atorch.offload(model, 0, manager=manager, prefetch=2) as handle:
        for _ in range(2):
            assert torch.equal(model(x), expected)
        sim.add_external_usage(0, 3 * PAGE)
        assert torch.equal(model(x), expected)
        sim.remove_external_usage(0, 3 * PAGE)

        def closed(device, nbytes=0):  # as when another thread closes the Manager
            raise aimdo.InvalidStateError("closed meanwhile")

        monkeypatch.setattr(manager, "deficit_bytes", closed)
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 5 * PAGE  # not raised, nothing raised
        monkeypatch.undo()
        assert torch.equal(model(x), expected)
        assert handle.vbar.watermark_bytes == 8 * PAGE
