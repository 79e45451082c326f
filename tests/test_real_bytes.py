"""Data written through an allocation reads back exactly when its signature says so.

The same test runs on both backends: on the simulator with real bytes (a memoryview of
host memory mapped at the VBAR's addresses), on CUDA through the allocation's device
address with cuda-python. A fault whose signature equals the last one must find the
bytes intact; any other answer means "reload" (on the simulator the old bytes are
certainly gone: new pages hold a poison pattern).
"""

from __future__ import annotations

import ctypes

import aimdo
import pytest
from conftest import BACKEND, PAGE


class SimBytes:
    def __init__(self, sim):
        self.sim = sim

    def write(self, allocation, data: bytes) -> None:
        self.sim.view(allocation)[:] = data

    def read(self, allocation) -> bytes:
        return bytes(self.sim.view(allocation))


class CudaBytes:
    """Copies to and from device addresses with the CUDA driver, through cuda-python."""

    def __init__(self):
        from cuda.bindings import driver

        self.cu = driver
        self.contexts = {}
        self.check(driver.cuInit(0))

    def check(self, result):
        error = result[0]
        if error != self.cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {error!r}")
        return result[1] if len(result) == 2 else result[1:]

    def current(self, device: int) -> None:
        if device not in self.contexts:
            handle = self.check(self.cu.cuDeviceGet(device))
            self.contexts[device] = self.check(self.cu.cuDevicePrimaryCtxRetain(handle))
        self.check(self.cu.cuCtxSetCurrent(self.contexts[device]))

    def write(self, allocation, data: bytes) -> None:
        self.current(allocation.device)
        host = ctypes.create_string_buffer(data, len(data))
        self.check(
            self.cu.cuMemcpyHtoD(
                self.cu.CUdeviceptr(allocation.address), ctypes.addressof(host), len(data)
            )
        )

    def read(self, allocation) -> bytes:
        self.current(allocation.device)
        host = ctypes.create_string_buffer(allocation.size)
        self.check(
            self.cu.cuMemcpyDtoH(
                ctypes.addressof(host), self.cu.CUdeviceptr(allocation.address), allocation.size
            )
        )
        return host.raw


def pattern(device: int, index: int, generation: int, size: int) -> bytes:
    unit = bytes([device + 1, index + 1, generation % 256, 0x3C]) * 8
    return (unit * (size // len(unit) + 1))[:size]


def test_bytes_read_back_exactly_when_the_signature_matched(make_manager):
    if BACKEND == "sim":
        sim = aimdo.SimBackend("2x1GiB", real_bytes=True)
        manager = make_manager(pages=4, devices=(0, 1), sim=sim)
        memory = SimBytes(sim)
    else:
        manager = make_manager(pages=4, devices=(0, 1))
        memory = CudaBytes()
    vbars = {d: manager.create_vbar(8 * PAGE, device=d) for d in (0, 1)}
    sizes = [PAGE, PAGE // 2, PAGE // 2, PAGE, PAGE - 512, PAGE, PAGE // 4, PAGE]
    allocations = {d: [vbars[d].alloc(size) for size in sizes] for d in (0, 1)}
    last = {(d, i): None for d in (0, 1) for i in range(len(sizes))}
    expected = {}
    generation = 0
    intact = reloaded = offloaded = 0
    for round_ in range(8):
        for d in (0, 1):
            vbar = vbars[d]
            # Evict a varying number of the top pages: the allocations on them come back
            # with new signatures (and new bytes) this round, the others are intact.
            vbar.free_memory((round_ % 3) * PAGE)
            vbar.prioritize()  # pages evicted earlier are mapped again this round
            order = list(range(len(sizes)))
            order = order[round_ % len(order) :] + order[: round_ % len(order)]
            for i in order:
                allocation = allocations[d][i]
                signature = vbar.fault(allocation)
                if signature is None:
                    offloaded += 1
                    continue
                if signature == last[(d, i)]:
                    assert memory.read(allocation) == expected[(d, i)], (d, i, round_)
                    intact += 1
                else:
                    if BACKEND == "sim" and (d, i) in expected:
                        assert memory.read(allocation) != expected[(d, i)], (d, i, round_)
                    generation += 1
                    expected[(d, i)] = pattern(d, i, generation, allocation.size)
                    memory.write(allocation, expected[(d, i)])
                    last[(d, i)] = signature
                    reloaded += 1
                vbar.unpin(allocation)
    # Both answers happened, on both devices, or the test proved nothing.
    assert intact > 10 and reloaded > 10 and offloaded > 0, (intact, reloaded, offloaded)
    if BACKEND == "sim":
        assert sim.violations() == []


@pytest.mark.sim_only
def test_memory_that_is_not_mapped_cannot_be_reached_from_python(make_manager):
    sim = aimdo.SimBackend("2x1GiB", real_bytes=True)
    manager = make_manager(pages=4, sim=sim)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    allocation = vbar.alloc(PAGE)
    with pytest.raises(aimdo.InvalidStateError, match="not mapped"):
        sim.view(allocation)  # never faulted
    assert vbar.fault(allocation) is not None
    view = sim.view(allocation)
    assert view[0] == 0xA5  # new memory holds poison, not zeros
    view[:3] = b"abc"
    vbar.unpin(allocation)
    vbar.free_memory(4 * PAGE)
    with pytest.raises(aimdo.InvalidStateError):
        sim.view(allocation)
    # A view kept past the unmap reads the trap pattern, never the data, never crashes;
    # a write through it is reported.
    assert bytes(view[:3]) == b"\x5a\x5a\x5a"
    view[0] = 1
    vbar.prioritize()
    assert vbar.fault(allocation) is not None
    assert len(sim.violations()) == 1 and "after it was unmapped" in sim.violations()[0]
    vbar.unpin(allocation)
    with pytest.raises(aimdo.InvalidStateError, match="real_bytes"):
        aimdo.SimBackend("1x1GiB").view(allocation)
