"""Both backends answer the Driver interface's operations by the same rules.

These call the raw driver (no aimdo policy) so that the simulator is held to what the
real driver does: every case here runs on AIMDO_BACKEND=sim and =cuda alike.
"""

from __future__ import annotations

import threading

import aimdo
import pytest
from conftest import BACKEND

MiB = 1 << 20
SUCCESS, INVALID_VALUE, OUT_OF_MEMORY, INVALID_CONTEXT, NOT_MAPPED = 0, 1, 2, 201, 211


@pytest.fixture
def driver():
    backend = aimdo.SimBackend("2x1GiB") if BACKEND == "sim" else aimdo.CudaBackend()
    assert backend.driver.backend_name == BACKEND
    raw = backend.driver
    code, _ = raw.raw_make_current(0)
    assert code == SUCCESS
    yield raw


def granularity(driver) -> int:
    return 2 * MiB  # both backends: the minimum granularity of their devices


def ok(result):
    assert result[0] == SUCCESS, result
    return result[2] if len(result) > 2 else None


def test_a_page_goes_through_its_whole_life(driver):
    g = granularity(driver)
    va = ok(driver.raw_reserve(0, 4 * g, g))
    handle = ok(driver.raw_create(0, g))
    ok(driver.raw_map(va + g, g, handle))
    ok(driver.raw_set_access(va + g, g, 0))
    ok(driver.raw_synchronize(0))
    ok(driver.raw_unmap(va + g, g))
    ok(driver.raw_release(handle))
    ok(driver.raw_free_range(va, 4 * g))


def test_sizes_and_addresses_must_be_granularity_aligned(driver):
    g = granularity(driver)
    assert driver.raw_reserve(0, g + 4096, g)[0] == INVALID_VALUE
    assert driver.raw_create(0, g + 4096)[0] == INVALID_VALUE
    va = ok(driver.raw_reserve(0, 4 * g, g))
    handle = ok(driver.raw_create(0, g))
    assert driver.raw_map(va + 4096, g, handle)[0] == INVALID_VALUE
    ok(driver.raw_release(handle))
    ok(driver.raw_free_range(va, 4 * g))


def test_a_map_may_not_overlap_another(driver):
    g = granularity(driver)
    va = ok(driver.raw_reserve(0, 4 * g, g))
    first = ok(driver.raw_create(0, 2 * g))
    second = ok(driver.raw_create(0, 2 * g))
    ok(driver.raw_map(va, 2 * g, first))
    assert driver.raw_map(va + g, 2 * g, second)[0] == INVALID_VALUE
    assert driver.raw_map(va, 2 * g, second)[0] == INVALID_VALUE
    ok(driver.raw_unmap(va, 2 * g))
    ok(driver.raw_release(first))
    ok(driver.raw_release(second))
    ok(driver.raw_free_range(va, 4 * g))


@pytest.mark.sim_only
def test_the_simulator_refuses_a_map_past_its_reservation(driver):
    """Stricter than the real driver: 580.x on an H100 accepted this map (the address
    space after a reservation is reserved in larger chunks), but a map past a VBAR's end
    is always a bug in aimdo, so the simulator refuses it."""
    g = granularity(driver)
    va = ok(driver.raw_reserve(0, 2 * g, g))
    handle = ok(driver.raw_create(0, 2 * g))
    assert driver.raw_map(va + g, 2 * g, handle)[0] == INVALID_VALUE
    ok(driver.raw_release(handle))
    ok(driver.raw_free_range(va, 2 * g))


@pytest.mark.sim_only
def test_the_simulator_refuses_a_second_unmap(driver):
    """Stricter than the real driver, which answered success to a second cuMemUnmap of
    the same range: a double unmap is a bookkeeping bug in aimdo."""
    g = granularity(driver)
    va = ok(driver.raw_reserve(0, g, g))
    handle = ok(driver.raw_create(0, g))
    ok(driver.raw_map(va, g, handle))
    ok(driver.raw_unmap(va, g))
    assert driver.raw_unmap(va, g)[0] == NOT_MAPPED
    ok(driver.raw_release(handle))
    ok(driver.raw_free_range(va, g))


def test_a_second_release_is_refused(driver):
    g = granularity(driver)
    handle = ok(driver.raw_create(0, g))
    ok(driver.raw_release(handle))
    assert driver.raw_release(handle)[0] != SUCCESS


def test_memory_released_while_mapped_lives_until_unmapped(driver):
    g = granularity(driver)
    va = ok(driver.raw_reserve(0, g, g))
    handle = ok(driver.raw_create(0, g))
    ok(driver.raw_map(va, g, handle))
    ok(driver.raw_release(handle))  # allowed: freed at the unmap
    ok(driver.raw_set_access(va, g, 0))
    ok(driver.raw_unmap(va, g))
    ok(driver.raw_free_range(va, g))


def test_more_memory_than_the_device_has_is_out_of_memory(driver):
    code, name, _ = driver.raw_create(0, 1 << 50)
    assert (code, name) == (OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY")


def test_context_dependent_calls_need_a_current_context(driver):
    results = {}

    def on_fresh_thread():
        results["current"] = driver.current_device()
        results["info"] = driver.raw_memory_info(0)[:2]
        results["sync"] = driver.raw_synchronize(0)
        guarded = driver.raw_memory_info_on(0)
        results["guarded"] = guarded
        results["after"] = driver.current_device()

    thread = threading.Thread(target=on_fresh_thread)
    thread.start()
    thread.join()
    assert results["current"] == -1
    assert results["info"] == (INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT")
    assert results["sync"] == (INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT")
    code, _, free, total = results["guarded"]
    assert code == SUCCESS and 0 < free <= total
    assert results["after"] == -1  # the guard restored "no context"


def test_the_guard_restores_the_previous_device(driver):
    if driver.device_count() < 2:
        pytest.skip("needs two devices")
    assert driver.current_device() == 0
    code, _, free, total = driver.raw_memory_info_on(1)
    assert code == SUCCESS and 0 < free <= total
    assert driver.current_device() == 0
