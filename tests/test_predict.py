"""aimdo.predict: OffloadedModule's schedule on the simulator's two engines, with exact
virtual times worked out by hand."""

from __future__ import annotations

import aimdo
import pytest
from aimdo.predict import predict_group, predict_offload, rank_regimes
from conftest import PAGE

pytestmark = pytest.mark.sim_only  # it runs on the simulator by definition

MS = 1e-3


def page_copy_manager(make_manager, copy_ms: float, pages: int = 2):
    """A budget of `pages` pages on a device that copies one page in `copy_ms`."""
    sim = aimdo.SimBackend([{"capacity": "1GiB", "bandwidth": PAGE / (copy_ms * MS)}, "1GiB"])
    return make_manager(pages=pages, sim=sim)


@pytest.mark.parametrize(
    "copy_ms, spread, step_ms, steady_ms, hits, schedule",
    [
        # Four one-page blocks of 1 ms compute, two pages of budget. Spread placement 0 2 1 3
        # keeps blocks 0 and 2; copies of 1 and 3 overlap the compute before them.
        (1, True, 4.0, 4.0, 2, "copy1 run0 copy3 run1 run2 run3"),
        # 2 ms a copy: copy1 0-2, run0 0-1, copy3 2-4, run1 2-3, run2 3-4, run3 4-5. The
        # staging buffers stay for the next step, which starts at 5: block 1's buffer is
        # free since run1 ended at 3, so copy1 runs 4-6, as soon as the copy engine is
        # idle, before the step starts; run0 5-6, run1 6-7, copy3 6-8 (its buffer is free
        # since 5), run2 7-8, run3 8-9: 4 ms.
        (2, True, 5.0, 4.0, 2, "copy1 run0 copy3 run1 run2 run3"),
        # In order, blocks 0 and 1 fill the budget (block 2's first fault evicts nothing of
        # higher priority, so it is offloaded). copy2 0-2, run0 0-1, run1 1-2, copy3 2-4,
        # run2 2-3, run3 4-5. Next step (from 5): copy2 4-6 (its buffer free since 3), run0
        # 5-6, run1 6-7, copy3 6-8, run2 7-8, run3 8-9: 4 ms.
        (2, False, 5.0, 4.0, 2, "copy2 run0 run1 copy3 run2 run3"),
    ],
)
def test_predicted_steps_are_the_stream_schedule_worked_by_hand(
    make_manager, copy_ms, spread, step_ms, steady_ms, hits, schedule
):
    manager = page_copy_manager(make_manager, copy_ms)
    steps = predict_offload(
        manager, 0, [PAGE] * 4, [1 * MS] * 4, steps=4, prefetch=1, spread=spread
    )
    first = steps[0]
    # The first forward learns the order: every copy in line with the compute.
    assert first.schedule == ("copy0", "run0", "copy1", "run1", "copy2", "run2", "copy3", "run3")
    assert first.bytes_copied == 4 * PAGE
    assert steps[1].seconds == pytest.approx(step_ms * MS, abs=1e-9)
    for step in steps[2:]:
        assert step.seconds == pytest.approx(steady_ms * MS, abs=1e-9)
    for step in steps[1:]:
        assert " ".join(step.schedule) == schedule
        assert (step.hits, step.offloaded_layers, step.copied_layers) == (hits, 4 - hits, 0)
        assert step.bytes_copied == (4 - hits) * PAGE
    assert manager.vbar_count(0) == 0  # the prediction's VBAR is closed
    assert manager.resident_bytes(0) == 0


def test_small_blocks_ride_in_the_room_a_staging_buffer_has_left(make_manager):
    # Three one-page blocks of 0.1 ms, then one of four pages and 6 ms, twice; nothing
    # resident, prefetch 1, one page copied a millisecond. The staging buffers grow to
    # four pages; a small block staged in one leaves room in it, where the next small ones
    # ride: their copies are queued ahead beyond the one copy of prefetch, at no buffer's
    # cost. So the large block's copy is queued before the first small block runs, and the
    # small blocks after it are copied while it computes.
    sim = aimdo.SimBackend([{"capacity": "1GiB", "bandwidth": PAGE / MS}, "1GiB"])
    manager = make_manager(pages=0, sim=sim, headroom=PAGE)  # a budget of no page
    sizes, seconds = [PAGE, PAGE, PAGE, 4 * PAGE] * 2, [0.1 * MS] * 3 + [6 * MS]
    steps = predict_offload(manager, 0, sizes, seconds * 2, steps=4, prefetch=1, spread=False)
    for step in steps[2:]:
        assert step.offloaded_layers == 8
        assert " ".join(step.schedule) == (
            "copy0 copy1 copy2 copy3 run0 run1 run2 copy4 copy5 copy6 run3 copy7 "
            "run4 run5 run6 run7"
        )
        assert step.staging_bytes == 2 * 4 * PAGE  # prefetch + 1 buffers of the largest
        # Without the riders each small block waits for a buffer of its own, its copy
        # queued only after the compute before it: 24 ms a step (measured before them).
        assert step.seconds == pytest.approx(20 * MS, abs=1e-9)


def test_a_staging_buffer_is_reused_only_after_the_compute_that_read_it(make_manager):
    # A budget of one page: block 0 stays resident, blocks 1-3 are offloaded. prefetch 1
    # makes two buffers, A and B; a copy takes 2 ms.
    manager = page_copy_manager(make_manager, copy_ms=2, pages=1)
    steps = predict_offload(
        manager, 0, [PAGE] * 4, [1 * MS, 10 * MS, 1 * MS, 1 * MS], steps=2, prefetch=1, spread=False
    )
    # copy1 to A 0-2, run0 0-1, copy2 to B 2-4, run1 2-12 (A free at 12), copy3 to A waits
    # for 12: 12-14, run2 12-13, run3 14-15. Without the wait, copy3 would run 4-6 and the
    # step would end at 14.
    assert " ".join(steps[1].schedule) == "copy1 run0 copy2 run1 copy3 run2 run3"
    assert steps[1].seconds == pytest.approx(15 * MS, abs=1e-9)
    assert (steps[1].hits, steps[1].offloaded_layers) == (1, 3)


def test_the_blocks_listed_first_are_placed_first_and_stay_resident(make_manager):
    # A budget of two pages, in order: without `first` blocks 0 and 1 stay resident;
    # listing 3 and 2 first (offload's keep_first) keeps those, and 0 and 1 are copied.
    manager = page_copy_manager(make_manager, copy_ms=2)
    plain = predict_offload(manager, 0, [PAGE] * 4, [1 * MS] * 4, steps=2, spread=False)
    kept = predict_offload(
        manager, 0, [PAGE] * 4, [1 * MS] * 4, steps=2, spread=False, first=[3, 2]
    )
    copies = [{e for e in step[-1].schedule if e.startswith("copy")} for step in (plain, kept)]
    assert copies == [{"copy2", "copy3"}, {"copy0", "copy1"}]
    assert plain[-1].hits == kept[-1].hits == 2
    for bad in ([4], [1, 1], [-1], [True]):
        with pytest.raises(ValueError, match="distinct indices of the 4 blocks"):
            predict_offload(manager, 0, [PAGE] * 4, [MS] * 4, steps=1, first=bad)
    assert manager.vbar_count(0) == 0


def test_two_devices_predict_independently(make_manager):
    sim = aimdo.SimBackend([{"capacity": "1GiB", "bandwidth": PAGE / MS}] * 2)
    manager = make_manager(pages=2, devices=(0, 1), sim=sim)
    one = predict_offload(manager, 0, [PAGE] * 4, [1 * MS] * 4, steps=2, prefetch=1)
    two = predict_offload(manager, 1, [PAGE] * 4, [0.5 * MS] * 4, steps=2, prefetch=1)
    assert one[1].seconds == pytest.approx(4 * MS, abs=1e-9)
    # 0.5 ms blocks: copy1 0-1, run0 0-0.5, copy3 1-2, run1 1-1.5, run2 1.5-2, run3 2-2.5
    assert two[1].seconds == pytest.approx(2.5 * MS, abs=1e-9)


def test_bad_arguments_are_refused_and_leave_no_vbar(make_manager):
    manager = page_copy_manager(make_manager, copy_ms=1)
    with pytest.raises(ValueError, match="one entry per block"):
        predict_offload(manager, 0, [PAGE] * 2, [MS], steps=1)
    with pytest.raises(ValueError, match="positive ints"):
        predict_offload(manager, 0, [0], [MS], steps=1)
    with pytest.raises(ValueError, match="non-negative"):
        predict_offload(manager, 0, [PAGE], [float("nan")], steps=1)
    with pytest.raises(ValueError, match="prefetch"):
        predict_offload(manager, 0, [PAGE], [MS], steps=1, prefetch=True)
    with pytest.raises(ValueError, match="steps"):
        predict_offload(manager, 0, [PAGE], [MS], steps=0)
    assert manager.vbar_count(0) == 0


def test_a_manager_on_real_gpus_is_refused():
    class NotSim:  # stands for a Manager whose backend is the cuda one
        backend = object()

    with pytest.raises(TypeError, match="SimBackend"):
        predict_offload(NotSim(), 0, [PAGE], [MS], steps=1)


MiB = 1 << 20


def llama_8b_blocks() -> list[int]:
    """Llama-3-8B's blocks in the order they run, in bf16 bytes: the embedding, 32 layers
    (norm, q, k, v, o, norm, gate, up, down) and the final norm and the output head."""
    hidden, intermediate, kv, vocabulary = 4096, 14336, 1024, 128256
    layer = [2 * hidden, hidden * hidden * 2, kv * hidden * 2, kv * hidden * 2]
    layer += [hidden * hidden * 2, 2 * hidden] + [intermediate * hidden * 2] * 3
    return [vocabulary * hidden * 2, *layer * 32, 2 * hidden, vocabulary * hidden * 2]


@pytest.mark.parametrize("spread, hits", [(True, 137), (False, 154)])
def test_a_llama_8b_at_a_6_gib_budget_stages_through_224_mib(make_manager, spread, hits):
    # Issue 12: staging buffers grew to the largest block they staged, 1002 MiB each for
    # the embedding and the head. Now each is at most staging_bytes // (prefetch + 1)
    # (128 MiB by default): two of 112 MiB (the MLP's matrices); a larger offloaded block
    # takes a temporary buffer of its own, freed after its compute.
    blocks = llama_8b_blocks()
    manager = make_manager(pages=192, sim=aimdo.SimBackend("1x80GiB"), page_size=32 * MiB)
    steps = predict_offload(
        manager, 0, blocks, [0.1 * MS] * len(blocks), steps=3, prefetch=1, spread=spread
    )
    assert steps[0].staging_bytes == 0  # the first forward learns the order, in line
    for step in steps[1:]:
        assert step.staging_bytes == 2 * 112 * MiB
        assert step.hits == hits and step.offloaded_layers == len(blocks) - hits
        # The 65 norms (8 KiB each) are placed first: every one of them hits.
        norms = [i for i, nbytes in enumerate(blocks) if nbytes == 2 * 4096]
        assert len(norms) == 65
        assert not {f"copy{i}" for i in norms} & set(step.schedule)
        # Spread, both vocabulary matrices stay resident; in order, the head is offloaded
        # and goes through a temporary buffer of its 1002 MiB.
        assert step.peak_temporary_bytes == (0 if spread else blocks[-1])


def test_the_default_staging_fits_the_largest_block_within_its_share_of_the_budget():
    from aimdo._schedule import auto_staging_bytes

    MiB, GiB = 1 << 20, 1 << 30
    # Qwen-Image-like: 108 MiB blocks, prefetch 2, a 23.75 GiB budget: three whole buffers.
    assert auto_staging_bytes([18 * MiB, 108 * MiB, 72 * MiB], 2, 23 * GiB + 768 * MiB) == 324 * MiB
    # Llama-8B-like at a 5.75 GiB budget: the 1002 MiB head would need 3 GiB; 256 MiB it is.
    assert auto_staging_bytes([112 * MiB, 1002 * MiB], 2, 5 * GiB + 768 * MiB) == 256 * MiB
    # A large budget lets staging grow to 1/24 of it, no more.
    assert auto_staging_bytes([1002 * MiB], 2, 48 * GiB) == 2 * GiB
    # Small blocks take what they need; no block, nothing.
    assert auto_staging_bytes([PAGE], 1, 0) == 2 * PAGE
    assert auto_staging_bytes([], 2, 48 * GiB) == 0


# --- several devices (issue 13) -------------------------------------------------------------


def group_case(topology: str):
    """Eight blocks of 64 MiB, 0.25 ms of compute each at one device's part of the batch
    and 0.5 ms at the whole, on two devices of 5 blocks' budget each: together they hold
    all. The 3 blocks a device lacks take 3.6 ms from a 55.3 GB/s host link, 0.5 ms over
    NVLink: copy-bound from the host, compute-bound (2 ms) from a peer."""
    sim = aimdo.SimBackend("2x80GiB", topology=topology)
    manager = aimdo.Manager(sim, [0, 1], vram_limit=10 * 32 * MiB, headroom=0, page_size=32 * MiB)
    return manager, [64 * MiB] * 8, [0.5 * MS] * 8, [0.25 * MS] * 8


@pytest.mark.sim_only
def test_a_group_over_nvlink_copies_only_from_peers_and_is_compute_bound():
    manager, sizes, _, half = group_case("h200-nvlink")
    with manager:
        steps = predict_group(manager, [0, 1], sizes, half, steps=3)
        peer_copy = 64 * MiB / 390e9 + 2e-6
        for step in steps[1:]:
            for device in step:
                assert device.bytes_copied == 3 * 64 * MiB  # the 3 blocks it lacks
                assert device.bytes_from_peers == device.bytes_copied
                # The compute (2 ms) and at most the first block's copy before it.
                assert 2 * MS - 1e-12 <= device.seconds <= 2 * MS + peer_copy + 1e-12
        assert manager.vbar_count(0) == manager.vbar_count(1) == 0  # closed afterwards


@pytest.mark.sim_only
def test_without_peer_links_a_group_copies_from_the_host():
    manager, sizes, _, half = group_case("rtx4090-pcie")
    with manager:
        for step in predict_group(manager, [0, 1], sizes, half, steps=3)[1:]:
            for device in step:
                assert device.bytes_copied == 3 * 64 * MiB and device.bytes_from_peers == 0
                # Copy-bound: 3 blocks over a 12.5 GB/s link take 16 ms, more than 2 ms.
                assert device.seconds >= 3 * 64 * MiB / 12.5e9 - 1e-9  # whole ns


@pytest.mark.sim_only
def test_a_donor_serves_what_the_computing_device_lacks():
    manager, sizes, full, _ = group_case("h200-nvlink")
    with manager:
        steps = predict_group(manager, [0, 1], sizes, full, steps=3, donors=[1])
        for (device,) in steps[1:]:
            assert device.bytes_copied == 3 * 64 * MiB
            assert device.bytes_from_peers == device.bytes_copied


@pytest.mark.sim_only
@pytest.mark.parametrize(
    "topology, fastest", [("h200-nvlink", "split with peers"), ("rtx4090-pcie", None)]
)
def test_regimes_are_ranked_from_the_topology(topology, fastest):
    manager, sizes, full, half = group_case(topology)
    with manager:
        regimes = rank_regimes(manager, [0, 1], sizes, full, half)
    names = [regime.name for regime in regimes]
    assert sorted(names) == sorted(
        ["one device", "split with peers", "split from the host", "donor", "layer split"]
    )
    assert [r.seconds for r in regimes] == sorted(r.seconds for r in regimes)
    seconds = {regime.name: regime.seconds for regime in regimes}
    if fastest is not None:
        assert names[0] == fastest
        assert seconds["split with peers"] < seconds["split from the host"]
    else:  # no peer access: the peer tier changes nothing
        assert seconds["split with peers"] == pytest.approx(seconds["split from the host"])


@pytest.mark.sim_only
def test_bad_groups_are_refused_before_anything_is_made():
    manager, sizes, full, _ = group_case("h200-nvlink")
    with manager:
        with pytest.raises(ValueError, match="distinct devices"):
            predict_group(manager, [0, 0], sizes, full, steps=1)
        with pytest.raises(ValueError, match="donors"):
            predict_group(manager, [0, 1], sizes, full, steps=1, donors=[0, 1])
        with pytest.raises(ValueError, match="one entry per block"):
            predict_group(manager, [0, 1], sizes, full[:3], steps=1)
        assert manager.vbar_count(0) == manager.vbar_count(1) == 0
