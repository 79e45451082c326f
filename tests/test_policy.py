"""DESIGN §3, rule by rule, with the exact residency each scripted sequence must leave.

Budgets are in pages of PAGE bytes (see make_manager); residency strings read '.'
absent, 'R' resident, 'P' resident and pinned, one character per page.
"""

from __future__ import annotations

import pytest

import aimdo
from conftest import PAGE, residency, watermark_pages


def fault_unpin(vbar, allocation):
    signature = vbar.fault(allocation)
    assert signature is not None, f"{allocation} was offloaded"
    vbar.unpin(allocation)
    return signature


def paged(vbar, count):
    """`count` allocations of one page each, page i under allocation i."""
    return [vbar.alloc(PAGE) for _ in range(count)]


def load(vbar, allocations):
    for allocation in allocations:
        fault_unpin(vbar, allocation)


# --- rule 2: fault ---------------------------------------------------------------------


def test_budget_of_n_pages_holds_n_pages(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    load(vbar, paged(vbar, 8))
    assert residency(vbar) == "RRRRRRRR"
    assert manager.resident_bytes(0) == 8 * PAGE
    assert manager.usage_bytes(0) == 8 * PAGE
    assert manager.stats(0)["evictions"] == 0
    assert manager.stats(0)["pages_mapped"] == 8


def test_fault_pins_every_page_and_unpin_drops_the_pin(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    small = vbar.alloc(PAGE // 2)
    spanning = vbar.alloc(PAGE)  # starts half way into page 0, ends half way into page 1
    assert (spanning.offset, spanning.size) == (PAGE // 2, PAGE)
    signature = vbar.fault(spanning)
    assert len(signature) == 2
    assert residency(vbar) == "PP......"
    vbar.fault(small)
    vbar.unpin(spanning)
    assert residency(vbar) == "PR......"
    vbar.unpin(small)
    assert residency(vbar) == "RR......"
    assert vbar.loaded_bytes == 2 * PAGE


def test_a_resident_fault_is_a_hit_that_maps_nothing(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    allocation = vbar.alloc(3 * PAGE)
    first = fault_unpin(vbar, allocation)
    mapped = manager.stats(0)["pages_mapped"]
    second = fault_unpin(vbar, allocation)
    assert second == first
    assert manager.stats(0)["pages_mapped"] == mapped == 3
    assert manager.stats(0)["hits"] == 1


def test_eviction_takes_from_the_lowest_priority_vbar(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)  # new VBARs go to the top
    old_pages = paged(older, 8)
    new_pages = paged(newer, 8)
    load(older, old_pages[:6])
    load(newer, new_pages[:2])
    assert (residency(older), residency(newer)) == ("RRRRRR..", "RR......")
    # Budget full: each new page of `newer` costs `older` its top resident page.
    load(newer, new_pages[2:4])
    assert (residency(older), residency(newer)) == ("RRRR....", "RRRR....")
    assert watermark_pages(older) == 4
    assert watermark_pages(newer) == 8
    assert manager.stats(0)["evicted_bytes"] == 2 * PAGE


def test_fault_above_the_watermark_answers_offloaded_at_once(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    old_pages = paged(older, 8)
    load(older, old_pages[:8])
    load(newer, paged(newer, 3))
    assert watermark_pages(older) == 5
    before = manager.stats(0)
    assert older.fault(old_pages[5]) is None
    assert older.fault(old_pages[7]) is None
    after = manager.stats(0)
    assert after["offloaded"] == before["offloaded"] + 2
    assert after["pages_mapped"] == before["pages_mapped"]
    assert (residency(older), residency(newer)) == ("RRRRR...", "RRR.....")
    # Below the watermark it is still a hit.
    assert older.fault(old_pages[4]) is not None
    older.unpin(old_pages[4])


def test_missing_pages_are_counted_once(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 8))
    three = newer.alloc(3 * PAGE)
    signature = fault_unpin(newer, three)
    assert len(signature) == 3
    # Exactly the three missing pages were freed, not one more.
    assert manager.stats(0)["evicted_bytes"] == 3 * PAGE
    assert (residency(older), residency(newer)) == ("RRRRR...", "RRR.....")
    assert manager.resident_bytes(0) == 8 * PAGE


def test_a_lone_vbar_larger_than_the_budget_keeps_its_lowest_pages(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(12 * PAGE, device=0)
    assert vbar.page_count == 12  # never clamped to the budget
    pages = paged(vbar, 12)
    load(vbar, pages[:8])
    # Page 8 needs room: the VBAR evicts from its own top (pages 11..8 are absent, page
    # 7 is released) and its watermark falls to 7, below page 8: offloaded.
    assert vbar.fault(pages[8]) is None
    assert residency(vbar) == "RRRRRRR....."
    assert watermark_pages(vbar) == 7
    # Steady state: the resident prefix keeps hitting, the rest is offloaded.
    hits_before = manager.stats(0)["hits"]
    for allocation in pages[:7]:
        fault_unpin(vbar, allocation)
    for allocation in pages[7:]:
        assert vbar.fault(allocation) is None
    assert manager.stats(0)["hits"] == hits_before + 7
    assert residency(vbar) == "RRRRRRR....."


def test_signature_is_equal_exactly_while_the_pages_stay_mapped(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    allocation = vbar.alloc(2 * PAGE)
    other = vbar.alloc(2 * PAGE)
    first = fault_unpin(vbar, allocation)
    fault_unpin(vbar, other)
    assert fault_unpin(vbar, allocation) == first
    assert vbar.free_memory(8 * PAGE) == 4 * PAGE  # evicts both allocations
    vbar.prioritize()  # raise the watermark again
    again = fault_unpin(vbar, allocation)
    assert again != first
    assert len(again) == len(first) == 2
    assert fault_unpin(vbar, allocation) == again


# --- rule 3: evict -----------------------------------------------------------------------


def test_a_pinned_page_keeps_its_memory_until_unpinned(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    old_pages = paged(older, 8)
    load(older, old_pages[:7])
    assert older.fault(old_pages[7]) is not None  # stays pinned
    assert residency(older) == "RRRRRRRP"
    fault_unpin(newer, newer.alloc(PAGE))
    # The walk lowered the watermark past the pinned page 7 and released page 6.
    assert residency(older) == "RRRRRR.P"
    assert watermark_pages(older) == 6
    assert manager.usage_bytes(0) == 8 * PAGE
    older.unpin(old_pages[7])  # above the watermark: released now
    assert residency(older) == "RRRRRR.."
    assert manager.usage_bytes(0) == 7 * PAGE


@pytest.mark.sim_only
def test_the_device_is_synchronized_once_before_the_first_release(make_manager):
    manager = make_manager(pages=8)
    sim = manager.sim
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 8))
    syncs = sim.call_count("cuCtxSynchronize")
    unmaps = sim.call_count("cuMemUnmap")
    fault_unpin(newer, newer.alloc(3 * PAGE))
    assert sim.call_count("cuCtxSynchronize") == syncs + 1
    assert sim.call_count("cuMemUnmap") == unmaps + 3
    # A failing synchronize stops the eviction before any page is unmapped.
    sim.fail("cuCtxSynchronize", device=0, error="error")
    with pytest.raises(aimdo.DriverError) as caught:
        fault_unpin(newer, newer.alloc(PAGE))
    assert caught.value.operation == "cuCtxSynchronize"
    assert sim.call_count("cuMemUnmap") == unmaps + 3
    assert residency(older) == "RRRRR..."


def test_deprioritize_moves_a_vbar_to_the_bottom(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 4))
    load(newer, paged(newer, 4))
    newer.deprioritize()
    third = manager.create_vbar(8 * PAGE, device=0)
    fault_unpin(third, third.alloc(2 * PAGE))
    assert (residency(older), residency(newer), residency(third)) == ("RRRR....", "RR......", "RR......")


def test_prioritize_moves_to_the_top_and_resets_the_watermark(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    old_pages = paged(older, 8)
    load(older, old_pages[:6])
    load(newer, paged(newer, 4))
    assert (residency(older), watermark_pages(older)) == ("RRRR....", 4)
    older.prioritize()
    assert watermark_pages(older) == 8
    fault_unpin(older, old_pages[4])  # now `newer` is the lowest and pays
    assert (residency(older), residency(newer)) == ("RRRRR...", "RRR.....")
    assert watermark_pages(newer) == 3


# --- rule 4: unpin -------------------------------------------------------------------------


def test_unpin_releases_pages_above_the_watermark_only(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    pages = paged(vbar, 8)
    for allocation in pages[:4]:
        assert vbar.fault(allocation) is not None
    vbar.set_watermark(2 * PAGE)
    assert residency(vbar) == "PPPP...."
    vbar.unpin(pages[0])
    vbar.unpin(pages[3])
    assert residency(vbar) == "RPP....."
    vbar.unpin(pages[1])
    vbar.unpin(pages[2])
    assert residency(vbar) == "RR......"
    assert manager.usage_bytes(0) == 2 * PAGE


# --- rule 5: watermark, floor, free_memory, figures -----------------------------------------


def test_set_watermark_lowers_and_raises(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    pages = paged(vbar, 8)
    load(vbar, pages[:6])
    assert vbar.fault(pages[4]) is not None  # pinned
    vbar.set_watermark(3 * PAGE - 1)  # rounds up to 3 pages
    assert watermark_pages(vbar) == 3
    assert residency(vbar) == "RRR.P..."
    assert vbar.fault(pages[3]) is None
    vbar.unpin(pages[4])
    assert residency(vbar) == "RRR....."
    vbar.set_watermark(8 * PAGE)
    fault_unpin(vbar, pages[7])
    assert residency(vbar) == "RRR....R"


def test_the_floor_stops_eviction_and_reset_floors_lifts_it(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 8))
    older.floor_bytes = 6 * PAGE
    assert older.floor_bytes == 6 * PAGE
    four = newer.alloc(4 * PAGE)
    # `older` gives 2 pages down to its floor; the walk then lowers `newer` itself, whose
    # pages are all absent, so the allocation ends above its watermark: offloaded.
    assert newer.fault(four) is None
    assert (residency(older), watermark_pages(older)) == ("RRRRRR..", 6)
    assert (residency(newer), watermark_pages(newer)) == ("........", 0)
    manager.reset_floors(0)
    assert older.floor_bytes == 0
    newer.prioritize()
    fault_unpin(newer, four)
    assert (residency(older), residency(newer)) == ("RRRR....", "RRRR....")


def test_setting_a_floor_above_the_watermark_raises_the_watermark(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    vbar.set_watermark(2 * PAGE)
    vbar.floor_bytes = 5 * PAGE + 1  # rounds up to 6 pages
    assert vbar.floor_bytes == 6 * PAGE
    assert watermark_pages(vbar) == 6


def test_free_memory_evicts_from_that_vbar_alone(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 4))
    load(newer, paged(newer, 4))
    assert newer.free_memory(3 * PAGE) == 3 * PAGE
    assert (residency(older), residency(newer)) == ("RRRR....", "R.......")
    assert watermark_pages(newer) == 1
    older.floor_bytes = 3 * PAGE
    assert older.free_memory(PAGE // 2) == PAGE  # whole pages
    assert older.free_memory(8 * PAGE) == 0  # the floor holds
    assert residency(older) == "RRR....."
    assert manager.resident_bytes(0) == 4 * PAGE


def test_reclaim_makes_room_for_an_outside_allocation(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    load(vbar, paged(vbar, 8))
    assert manager.deficit_bytes(0, 3 * PAGE) == 3 * PAGE
    assert manager.reclaim(0, 3 * PAGE) == 3 * PAGE
    assert residency(vbar) == "RRRRR..."
    assert manager.reclaim(0, 3 * PAGE) == 0  # it fits now
    assert manager.deficit_bytes(0, 3 * PAGE) == 0
    assert manager.reclaim(0, 0) == 0


def test_loaded_bytes_and_residency_follow_the_pages(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(5 * PAGE + 7, device=0)
    assert vbar.page_count == 6
    assert vbar.loaded_bytes == 0
    assert vbar.residency() == [(False, False)] * 6
    head = vbar.alloc(PAGE + 1)  # pages 0 and 1
    assert vbar.fault(head) is not None
    assert vbar.residency()[:3] == [(True, True), (True, True), (False, False)]
    assert vbar.loaded_bytes == 2 * PAGE
    vbar.unpin(head)
    assert vbar.residency()[:2] == [(True, False), (True, False)]


# --- rule 7: close ---------------------------------------------------------------------------


def test_close_releases_every_page_pinned_or_not(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    pages = paged(vbar, 4)
    load(vbar, pages[:2])
    assert vbar.fault(pages[2]) is not None
    assert vbar.fault(pages[3]) is not None
    vbar.close()
    assert vbar.closed
    assert vbar.loaded_bytes == 0
    assert manager.resident_bytes(0) == 0
    assert manager.usage_bytes(0) == 0
    assert manager.vbar_count(0) == 0
    if manager.sim is not None:
        assert manager.sim.physical_bytes(0) == 0
        assert manager.sim.leaks() == []
    vbar.close()  # idempotent


def test_manager_close_closes_its_vbars(make_manager):
    manager = make_manager(pages=8, devices=(0, 1))
    vbars = [manager.create_vbar(4 * PAGE, device=d) for d in (0, 1)]
    for vbar in vbars:
        assert vbar.fault(vbar.alloc(PAGE)) is not None
    manager.close()
    assert manager.closed
    assert all(vbar.closed for vbar in vbars)
    assert [manager.resident_bytes(d) for d in (0, 1)] == [0, 0]


def test_dropping_the_last_reference_releases_a_vbar(make_manager):
    import gc

    manager = make_manager(pages=8)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    load(vbar, paged(vbar, 3))
    assert manager.resident_bytes(0) == 3 * PAGE
    del vbar
    gc.collect()
    assert manager.resident_bytes(0) == 0
    assert manager.vbar_count(0) == 0


# --- rule 1: budget -----------------------------------------------------------------------

MiB = 1 << 20


@pytest.mark.sim_only
def test_deficit_combines_accounting_and_the_polled_figure():
    total = 1024 * MiB
    sim = aimdo.SimBackend([total])
    limit, head, extra = 64 * MiB, 8 * MiB, 2 * MiB
    with aimdo.Manager(sim, [0], vram_limit=limit, headroom=head, extra_headroom=extra,
                       page_size=2 * MiB, poll_interval=2.0) as manager:

        def expected(usage, usage_at_poll, free_at_poll, size):
            simple = usage + size + head - limit
            measured = head - (free_at_poll - (total - limit)) + (usage - usage_at_poll) + size
            return max(simple, measured) + extra

        assert manager.budget_bytes(0) == limit - head - extra
        assert manager.deficit_bytes(0, 0) == expected(0, 0, total, 0) == -54 * MiB
        # Someone else takes 30 MiB: unseen until the poll interval has passed.
        sim.add_external_usage(0, 30 * MiB)
        assert manager.deficit_bytes(0, 0) == -54 * MiB
        sim.advance(2.0)
        free = total - 30 * MiB
        assert manager.deficit_bytes(0, 0) == expected(0, 0, free, 0) == -24 * MiB
        # What aimdo maps after the poll counts at once, through the accounting term.
        vbar = manager.create_vbar(8 * MiB, device=0)
        allocation = vbar.alloc(8 * MiB)
        assert vbar.fault(allocation) is not None
        assert manager.deficit_bytes(0, 4 * MiB) == expected(8 * MiB, 0, free, 4 * MiB) == -12 * MiB
        vbar.unpin(allocation)
        assert manager.stats(0)["polls"] == 2


@pytest.mark.sim_only
def test_poll_interval_zero_reads_free_memory_on_every_evaluation():
    sim = aimdo.SimBackend("1x1GiB")
    with aimdo.Manager(sim, [0], poll_interval=0) as manager:
        for _ in range(3):
            manager.deficit_bytes(0, 0)
        assert manager.stats(0)["polls"] == 3


@pytest.mark.sim_only
def test_external_usage_evicts_at_the_next_poll(make_manager):
    manager = make_manager(pages=8, poll_interval=0)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    load(vbar, paged(vbar, 8))
    manager.sim.add_external_usage(0, 3 * PAGE)
    assert manager.deficit_bytes(0, 0) == 3 * PAGE
    assert manager.reclaim(0, 0) == 3 * PAGE
    assert residency(vbar) == "RRRRR..."
    manager.sim.remove_external_usage(0, 3 * PAGE)
    assert manager.deficit_bytes(0, 0) == -3 * PAGE


@pytest.mark.sim_only
def test_a_driver_out_of_memory_evicts_one_page_more_and_retries_once(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 5))
    manager.sim.fail("cuMemCreate", device=0, error="out_of_memory")
    fault_unpin(newer, newer.alloc(PAGE))
    assert (residency(older), residency(newer)) == ("RRRR....", "R.......")
    assert manager.stats(0)["oom_retries"] == 1


@pytest.mark.sim_only
def test_headroom_is_kept_free(make_manager):
    manager = make_manager(pages=8, headroom=2 * PAGE)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    assert manager.budget_bytes(0) == 8 * PAGE
    load(vbar, paged(vbar, 8))
    assert residency(vbar) == "RRRRRRRR"
    assert manager.sim.used_bytes(0) == 8 * PAGE
    assert manager.limit_bytes(0) - manager.sim.used_bytes(0) == 2 * PAGE


# --- recycling: a fault that evicts for itself maps the evicted memory again -------------


@pytest.mark.parametrize("recycle", [True, False])
def test_a_fault_maps_the_memory_it_evicted_again_when_recycling(make_manager, recycle):
    manager = make_manager(pages=8)
    manager.add_devices([0], recycle_pages=recycle)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)
    load(older, paged(older, 8))
    sim = manager.sim
    if sim is not None:
        creates, releases = sim.call_count("cuMemCreate"), sim.call_count("cuMemRelease")
    three = newer.alloc(3 * PAGE)
    first = fault_unpin(newer, three)
    # The same residency either way, and the same accounting.
    assert (residency(older), residency(newer)) == ("RRRRR...", "RRR.....")
    assert manager.resident_bytes(0) == manager.usage_bytes(0) == 8 * PAGE
    assert manager.stats(0)["pages_recycled"] == (3 if recycle else 0)
    assert manager.stats(0)["evicted_bytes"] == 3 * PAGE
    if sim is not None:
        assert sim.physical_bytes(0) == 8 * PAGE
        made = 0 if recycle else 3  # create and release calls the churn made
        assert sim.call_count("cuMemCreate") - creates == made
        assert sim.call_count("cuMemRelease") - releases == made
    assert fault_unpin(newer, three) == first  # resident now: a hit
