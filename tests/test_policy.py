"""design.md §3, rule by rule, with the exact residency each scripted sequence must leave.

Budgets are in pages of PAGE bytes (see make_manager); residency strings read '.'
absent, 'R' resident, 'P' resident and pinned, one character per page.
"""

from __future__ import annotations

import aimdo
import pytest
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
    # Page 8 needs room, and only pages of lower priority than its own may give it: the
    # VBAR's pages above it, all absent. Nothing is evicted; the watermark falls to page 8.
    assert vbar.fault(pages[8]) is None
    assert residency(vbar) == "RRRRRRRR...."
    assert watermark_pages(vbar) == 8
    assert manager.stats(0)["evicted_bytes"] == 0
    # Steady state: the whole budget keeps hitting, the rest is offloaded.
    hits_before = manager.stats(0)["hits"]
    for allocation in pages[:8]:
        fault_unpin(vbar, allocation)
    for allocation in pages[8:]:
        assert vbar.fault(allocation) is None
    assert manager.stats(0)["hits"] == hits_before + 8
    assert residency(vbar) == "RRRRRRRR...."
    assert manager.resident_bytes(0) == 8 * PAGE


# --- rule 2: a fault evicts only what is less important than its own pages ---------------


def test_a_full_budget_stays_full_pass_after_pass(make_manager):
    """8 one-page allocations, a budget of 4, three passes in order: the 5th fault finds
    nothing of lower priority than itself and is offloaded without evicting anything, so
    4 pages stay resident and 4 allocations hit every pass."""
    manager = make_manager(pages=4)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    pages = paged(vbar, 8)
    for pass_ in range(3):
        hits, offloaded = manager.stats(0)["hits"], manager.stats(0)["offloaded"]
        answers = []
        for allocation in pages:
            signature = vbar.fault(allocation)
            answers.append(signature is not None)
            if signature is not None:
                vbar.unpin(allocation)
        assert answers == [True] * 4 + [False] * 4, pass_
        assert residency(vbar) == "RRRR....", pass_
        assert manager.stats(0)["hits"] - hits == (0 if pass_ == 0 else 4)
        assert manager.stats(0)["offloaded"] - offloaded == 4
    assert watermark_pages(vbar) == 4
    assert manager.resident_bytes(0) == 4 * PAGE
    assert manager.stats(0)["evicted_bytes"] == 0
    assert manager.stats(0)["pages_mapped"] == 4


def test_multi_page_layers_fill_the_budget_and_leave_no_dead_page(make_manager):
    """3-page layers, a budget of 10 pages: 3 layers (9 pages) stay resident; the 4th
    layer maps none of its pages, since all 3 cannot fit."""
    manager = make_manager(pages=10)
    vbar = manager.create_vbar(18 * PAGE, device=0)
    layers = [vbar.alloc(3 * PAGE) for _ in range(6)]
    for _ in range(3):
        answers = []
        for layer in layers:
            signature = vbar.fault(layer)
            answers.append(signature is not None)
            if signature is not None:
                vbar.unpin(layer)
        assert answers == [True] * 3 + [False] * 3
        assert residency(vbar) == "R" * 9 + "." * 9
    assert watermark_pages(vbar) == 9
    assert manager.resident_bytes(0) == 9 * PAGE
    assert manager.stats(0)["evicted_bytes"] == 0
    assert manager.stats(0)["hits"] == 6


def test_a_first_page_shared_with_a_more_important_allocation_is_kept(make_manager):
    """Allocations of 1.5 pages: the second shares page 1 with the first. With a budget of
    2 pages the second cannot have page 2; offloading it lowers the watermark to page 2,
    not 1, so the first allocation keeps its page 1 and still hits."""
    manager = make_manager(pages=2)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    first, second = vbar.alloc(3 * PAGE // 2), vbar.alloc(3 * PAGE // 2)
    signature = fault_unpin(vbar, first)
    assert vbar.fault(second) is None
    assert residency(vbar) == "RR......"
    assert watermark_pages(vbar) == 2
    assert fault_unpin(vbar, first) == signature
    assert manager.stats(0)["evicted_bytes"] == 0


def test_a_fault_takes_its_own_vbars_pages_above_the_allocation(make_manager):
    """Pages above the allocation's end are of lower priority than it: a fault low in the
    VBAR evicts them, from the top down, and the watermark follows."""
    manager = make_manager(pages=4)
    vbar = manager.create_vbar(8 * PAGE, device=0)
    pages = paged(vbar, 8)
    load(vbar, pages[4:])
    assert residency(vbar) == "....RRRR"
    load(vbar, pages[:2])
    assert residency(vbar) == "RR..RR.."
    assert watermark_pages(vbar) == 6
    assert manager.stats(0)["evicted_bytes"] == 2 * PAGE


def test_a_lower_priority_vbar_cannot_evict_a_higher_one(make_manager):
    manager = make_manager(pages=8)
    older = manager.create_vbar(8 * PAGE, device=0)
    newer = manager.create_vbar(8 * PAGE, device=0)  # the top of the priority list
    old_pages, new_pages = paged(older, 8), paged(newer, 8)
    load(older, old_pages[:4])
    load(newer, new_pages[:4])
    # The budget is full. `older`'s next page may take only `older`'s pages above it
    # (none resident): offloaded, and `newer` keeps all of its pages.
    assert older.fault(old_pages[4]) is None
    assert (residency(older), residency(newer)) == ("RRRR....", "RRRR....")
    assert watermark_pages(older) == 4
    assert manager.stats(0)["evicted_bytes"] == 0
    # `newer`'s next pages evict `older`'s, lowest priority first: its top pages.
    load(newer, new_pages[4:6])
    assert (residency(older), residency(newer)) == ("RR......", "RRRRRR..")
    assert manager.stats(0)["evicted_bytes"] == 2 * PAGE


def test_a_deprioritized_vbar_faulting_under_a_full_budget_evicts_nothing_of_another(make_manager):
    manager = make_manager(pages=8)
    important = manager.create_vbar(8 * PAGE, device=0)
    load(important, paged(important, 8))
    background = manager.create_vbar(8 * PAGE, device=0)
    background.deprioritize()
    weights = paged(background, 4)
    for weight in weights:
        assert background.fault(weight) is None
    assert (residency(important), residency(background)) == ("RRRRRRRR", "........")
    assert watermark_pages(important) == 8
    assert watermark_pages(background) == 0
    assert manager.stats(0)["evicted_bytes"] == 0
    assert manager.resident_bytes(0) == 8 * PAGE


def test_pinned_pages_of_a_lower_vbar_cannot_make_room(make_manager):
    """The room a fault may take is counted before anything is evicted: one unpinned page
    below it cannot hold two missing pages, so nothing is evicted and it is offloaded."""
    manager = make_manager(pages=8)
    lower = manager.create_vbar(8 * PAGE, device=0)
    lower_pages = paged(lower, 8)
    for allocation in lower_pages[:7]:
        assert lower.fault(allocation) is not None  # stays pinned
    fault_unpin(lower, lower_pages[7])
    upper = manager.create_vbar(8 * PAGE, device=0)
    two = upper.alloc(2 * PAGE)
    assert upper.fault(two) is None
    assert (residency(lower), residency(upper)) == ("PPPPPPPR", "........")
    assert (watermark_pages(lower), watermark_pages(upper)) == (8, 0)
    upper.prioritize()  # the watermark back up: page 2 may be faulted again
    one = upper.alloc(PAGE)  # page 2: one page fits in what `lower` may give
    fault_unpin(upper, one)
    assert (residency(lower), residency(upper)) == ("PPPPPPP.", "..R.....")
    for allocation in lower_pages[:7]:
        lower.unpin(allocation)


def test_an_allocation_under_its_own_floor_with_no_room_raises_and_changes_nothing(make_manager):
    manager = make_manager(pages=4)
    important = manager.create_vbar(8 * PAGE, device=0)
    load(important, paged(important, 4))
    floored = manager.create_vbar(8 * PAGE, device=0)
    floored.deprioritize()
    floored.floor_bytes = 2 * PAGE
    weight = floored.alloc(PAGE)
    with pytest.raises(aimdo.OutOfMemoryError, match="floor"):
        floored.fault(weight)
    assert (residency(important), residency(floored)) == ("RRRR....", "........")
    assert (watermark_pages(important), watermark_pages(floored)) == (8, 8)
    assert manager.resident_bytes(0) == 4 * PAGE


def test_outside_pressure_still_evicts_lowest_priority_first_from_any_vbar(make_manager):
    """Eviction for a deficit (rule 3) is not the fault's rule: it takes the lower VBAR's
    pages first and then the higher one's."""
    manager = make_manager(pages=8)
    lower = manager.create_vbar(8 * PAGE, device=0)
    upper = manager.create_vbar(8 * PAGE, device=0)
    load(lower, paged(lower, 2))
    load(upper, paged(upper, 6))
    assert manager.reclaim(0, 4 * PAGE) == 4 * PAGE
    assert (residency(lower), residency(upper)) == ("........", "RRRR....")
    assert (watermark_pages(lower), watermark_pages(upper)) == (0, 4)


@pytest.mark.sim_only
def test_external_usage_evicts_a_higher_vbar_at_the_next_fault(make_manager):
    manager = make_manager(pages=8, poll_interval=0)
    lower = manager.create_vbar(8 * PAGE, device=0)
    upper = manager.create_vbar(8 * PAGE, device=0)
    lower_pages = paged(lower, 8)
    load(lower, lower_pages[:2])
    load(upper, paged(upper, 6))
    manager.sim.add_external_usage(0, 3 * PAGE)
    # The standing deficit of 3 pages is evicted first, by rule 3 (lower's 2, then one of
    # upper's); then lower's own fault finds no room it may take: offloaded.
    assert lower.fault(lower_pages[0]) is None
    assert (residency(lower), residency(upper)) == ("........", "RRRRR...")
    assert manager.usage_bytes(0) == 5 * PAGE
    manager.sim.remove_external_usage(0, 3 * PAGE)


@pytest.mark.sim_only
def test_the_readme_scale_keeps_forty_of_sixty_four_layers(make_manager):
    """The README's example: 64 layers of 600 MiB, a 24 GiB limit, 32 MiB pages and the
    default 256 MiB headroom: a budget of 760 pages holds 40 layers (750 pages), and the
    41st layer maps nothing."""
    MiB, GiB = 1 << 20, 1 << 30
    sim = aimdo.SimBackend([80 * GiB])
    with aimdo.Manager(sim, [0], vram_limit=24 * GiB, poll_interval=0) as manager:
        vbar = manager.create_vbar(64 * 600 * MiB, device=0)
        layers = [vbar.alloc(600 * MiB) for _ in range(64)]
        for _ in range(3):
            resident = []
            for index, layer in enumerate(layers):
                if vbar.fault(layer) is not None:
                    resident.append(index)
                    vbar.unpin(layer)
            assert resident == list(range(40))
        assert manager.resident_bytes(0) == vbar.loaded_bytes == 24000 * MiB
        assert manager.stats(0)["evicted_bytes"] == 0
        assert manager.stats(0)["hits"] == 80


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
    assert (residency(older), residency(newer), residency(third)) == (
        "RRRR....",
        "RR......",
        "RR......",
    )


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
    # `older` could give only 2 pages (down to its floor) of the 4 needed: nothing of it
    # is evicted, and `newer` lowers its own watermark to the allocation: offloaded.
    assert newer.fault(four) is None
    assert (residency(older), watermark_pages(older)) == ("RRRRRRRR", 8)
    assert (residency(newer), watermark_pages(newer)) == ("........", 0)
    assert manager.stats(0)["evicted_bytes"] == 0
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
    with aimdo.Manager(
        sim,
        [0],
        vram_limit=limit,
        headroom=head,
        extra_headroom=extra,
        page_size=2 * MiB,
        poll_interval=2.0,
    ) as manager:

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
def test_a_fresh_poll_sees_memory_given_back_before_the_interval_has_passed():
    sim = aimdo.SimBackend("1x1GiB")
    with aimdo.Manager(sim, [0], vram_limit=64 * MiB, headroom=0, poll_interval=2.0) as m:
        sim.add_external_usage(0, 30 * MiB)
        sim.advance(2.0)
        assert m.deficit_bytes(0, 0) == -34 * MiB  # the 30 MiB seen at the due poll
        sim.remove_external_usage(0, 30 * MiB)
        assert m.poll(0)["free_bytes"] == 1024 * MiB - 30 * MiB  # not due: the cached one
        assert m.deficit_bytes(0, 0) == -34 * MiB
        assert m.poll(0, fresh=True)["free_bytes"] == 1024 * MiB
        assert m.deficit_bytes(0, 0) == -64 * MiB
        assert m.stats(0)["polls"] == 2  # the due one and the fresh one


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
