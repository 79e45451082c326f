"""Cost per page of evicting and faulting again, next to the sum of the driver
operations that needs (create + map + set access to map, unmap + release to evict),
measured through the same bindings in the same run.

Two measurements of aimdo: separate phases (fault pages with room to spare, then evict
them with free_memory), and churn, where two VBARs take turns on a budget that holds one:
each fault of one evicts a page of the other, with page recycling off and on (the
evicted page's memory mapped again instead of released and created).

    python -m benchmarks.page_churn [--backend cuda|sim] [--pages 64] [--rounds 10]

On the simulator the driver costs are virtual; the numbers only check the script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import aimdo

from ._common import environment, save

MiB = 1 << 20


def raw_driver_costs(driver, device: int, page: int, count: int) -> dict[str, float]:
    """Median microseconds of each operation, timed one call at a time."""
    driver.raw_make_current(device)
    code, _, va = driver.raw_reserve(device, count * page, page)
    assert code == 0
    times = {name: [] for name in ("create", "map", "set_access", "unmap", "release")}
    clock = time.perf_counter
    for _ in range(3):
        handles = []
        for i in range(count):
            t = clock()
            code, _, handle = driver.raw_create(device, page)
            times["create"].append(clock() - t)
            assert code == 0
            t = clock()
            assert driver.raw_map(va + i * page, page, handle)[0] == 0
            times["map"].append(clock() - t)
            t = clock()
            assert driver.raw_set_access(va + i * page, page, device)[0] == 0
            times["set_access"].append(clock() - t)
            handles.append(handle)
        driver.raw_synchronize(device)
        for i, handle in enumerate(handles):
            t = clock()
            assert driver.raw_unmap(va + i * page, page)[0] == 0
            times["unmap"].append(clock() - t)
            t = clock()
            assert driver.raw_release(handle)[0] == 0
            times["release"].append(clock() - t)
    assert driver.raw_free_range(va, count * page)[0] == 0
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def churn_us_per_page(backend, page: int, pages: int, rounds: int, recycle: bool) -> float:
    """Two VBARs of `pages` pages take turns on a budget of `pages` pages: every page one
    faults evicts a page of the other. Median microseconds per faulted page."""
    with aimdo.Manager(
        backend, [0], page_size=page, headroom=0, poll_interval=1e9, recycle_pages=recycle
    ) as manager:
        _, total = manager.memory_info(0)
        others = total - manager.poll(0)["free_bytes"]
        manager.add_devices([0], vram_limit=others + pages * page)
        vbars = [manager.create_vbar(pages * page, 0) for _ in range(2)]
        allocations = [[v.alloc(page) for _ in range(pages)] for v in vbars]
        per_page = []
        for turn in range(2 * rounds + 1):
            vbar, mine = vbars[turn % 2], allocations[turn % 2]
            vbar.prioritize()
            start = time.perf_counter()
            for allocation in mine:
                assert vbar.fault(allocation) is not None
                vbar.unpin(allocation)
            if turn:  # the first turn only fills the budget
                per_page.append((time.perf_counter() - start) / pages * 1e6)
        recycled = manager.stats(0)["pages_recycled"]
        assert (recycled > 0) == recycle, recycled
        return statistics.median(per_page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sim", "cuda"], default="cuda")
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--page-size", type=aimdo.parse_size, default=32 * MiB)
    args = parser.parse_args()
    page = args.page_size
    backend = aimdo.SimBackend("1x80GB") if args.backend == "sim" else aimdo.CudaBackend()
    raw = raw_driver_costs(backend.driver, 0, page, args.pages)
    with aimdo.Manager(backend, [0], page_size=page, poll_interval=1e9) as manager:
        vbar = manager.create_vbar(args.pages * page, 0)
        allocations = [vbar.alloc(page) for _ in range(args.pages)]
        fault_us, evict_us = [], []
        for _ in range(args.rounds):
            vbar.prioritize()
            start = time.perf_counter()
            for allocation in allocations:
                assert vbar.fault(allocation) is not None
                vbar.unpin(allocation)
            fault_us.append((time.perf_counter() - start) / args.pages * 1e6)
            start = time.perf_counter()
            assert vbar.free_memory(args.pages * page) == args.pages * page
            evict_us.append((time.perf_counter() - start) / args.pages * 1e6)
        stats = manager.stats(0)
    churn = {
        recycle: churn_us_per_page(backend, page, args.pages, args.rounds, recycle)
        for recycle in (False, True)
    }
    fault, evict = statistics.median(fault_us), statistics.median(evict_us)
    map_sum = raw["create"] + raw["map"] + raw["set_access"]
    unmap_sum = raw["unmap"] + raw["release"]
    print(
        f"backend {args.backend}, {args.pages} pages of {page // MiB} MiB, {args.rounds} rounds; "
        "microseconds per page (medians)"
    )
    print(f"{'':<28} {'aimdo':>9} {'driver ops':>11} {'overhead':>9}")
    print(f"{'fault of a missing page':<28} {fault:>9.1f} {map_sum:>11.1f} {fault - map_sum:>9.1f}")
    print(f"{'eviction of a page':<28} {evict:>9.1f} {unmap_sum:>11.1f} {evict - unmap_sum:>9.1f}")
    print(
        f"{'evict + fault again':<28} {fault + evict:>9.1f} {map_sum + unmap_sum:>11.1f} "
        f"{fault + evict - map_sum - unmap_sum:>9.1f}"
    )
    print(
        f"{'churn, recycling off':<28} {churn[False]:>9.1f} {map_sum + unmap_sum:>11.1f} "
        f"{churn[False] - map_sum - unmap_sum:>9.1f}"
    )
    reuse_sum = raw["map"] + raw["set_access"] + raw["unmap"]
    print(
        f"{'churn, recycling on':<28} {churn[True]:>9.1f} {reuse_sum:>11.1f} "
        f"{churn[True] - reuse_sum:>9.1f}   ({churn[False] / churn[True]:.2f}x faster)"
    )
    print("driver operations (median us): " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items()))
    print(f"synchronizes: {stats['synchronizes']} for {stats['evictions']} eviction passes")
    result = {
        "benchmark": "page_churn",
        "backend": args.backend,
        "environment": environment(),
        "page_bytes": page,
        "pages": args.pages,
        "rounds": args.rounds,
        "aimdo_us_per_page": {
            "fault": fault,
            "evict": evict,
            "churn_recycling_off": churn[False],
            "churn_recycling_on": churn[True],
        },
        "driver_us": raw,
        "stats": stats,
    }
    print(f"written to {save('page_churn-' + args.backend, result)}")


if __name__ == "__main__":
    main()
