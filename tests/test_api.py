"""The API surface: Manager construction and options, the process-wide default Manager
(aimdo.init / get_manager / shutdown), backend selection, Vbar / Allocation / Signature
objects, size helpers, simulator specs and the ``python -m aimdo info`` command line.

Exact capacities and simulator specs are sim_only; everything else runs on both backends
through make_manager (budgets in pages of PAGE bytes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import aimdo
import pytest
from conftest import BACKEND, PAGE, residency

MiB = 1 << 20
GiB = 1 << 30
OTHER_BACKEND = "cuda" if BACKEND == "sim" else "sim"


@pytest.fixture
def no_default_manager():
    """The process-wide default Manager is shut down before and after the test."""
    aimdo.shutdown()
    yield
    aimdo.shutdown()


# --- Manager: devices, options, budgets ------------------------------------------------


@pytest.mark.sim_only
def test_manager_without_devices_initializes_every_backend_device():
    with aimdo.Manager("sim") as manager:  # the default simulator: "2x24GiB"
        assert manager.backend.device_count == 2
        assert manager.devices == [0, 1]
        assert manager.backend_name == "sim"


@pytest.mark.sim_only
def test_manager_devices_are_deduplicated_and_in_ordinal_order():
    with aimdo.Manager(aimdo.SimBackend("3x1GiB"), [2, 0, 2]) as manager:
        assert manager.devices == [0, 2]


def test_manager_default_options():
    with aimdo.Manager(BACKEND, [0]) as manager:
        info = manager.device_info(0)
        assert info["device"] == 0
        assert info["vram_limit"] is None
        assert info["headroom"] == 256 * MiB
        assert info["extra_headroom"] == 0
        assert info["page_size"] == 32 * MiB
        assert info["poll_interval"] == 2.0
        assert manager.limit_bytes(0) == info["total_bytes"]  # no vram_limit: the whole card


def test_device_info_reflects_options(make_manager):
    manager = make_manager(
        pages=8, headroom=3 * PAGE, extra_headroom=PAGE, page_size=2 * PAGE, poll_interval=5.0
    )
    info = manager.device_info(0)
    assert info["device"] == 0
    assert info["vram_limit"] == 8 * 2 * PAGE + 3 * PAGE + manager.baseline[0]
    assert info["headroom"] == 3 * PAGE
    assert info["extra_headroom"] == PAGE
    assert info["page_size"] == 2 * PAGE
    assert info["poll_interval"] == 5.0
    assert isinstance(info["name"], str) and info["name"]
    assert isinstance(info["integrated"], bool)
    assert info["page_size"] % info["granularity_bytes"] == 0


def test_add_devices_updates_options_of_an_initialized_device(make_manager):
    manager = make_manager(pages=8)
    manager.add_devices(
        0,
        vram_limit=64 * PAGE,
        headroom=PAGE,
        extra_headroom=2 * PAGE,
        page_size=4 * PAGE,
        poll_interval=0,
    )
    info = manager.device_info(0)
    expected = (64 * PAGE, PAGE, 2 * PAGE, 4 * PAGE, 0.0)
    names = ("vram_limit", "headroom", "extra_headroom", "page_size", "poll_interval")
    assert tuple(info[name] for name in names) == expected
    assert manager.devices == [0]


def test_vbars_keep_their_page_size_when_the_option_changes(make_manager):
    manager = make_manager(pages=8)
    before = manager.create_vbar(4 * PAGE, device=0)
    manager.add_devices(
        [0], vram_limit=manager.limit_bytes(0), headroom=0, page_size=2 * PAGE, poll_interval=1e9
    )
    after = manager.create_vbar(4 * PAGE, device=0)
    assert (before.page_size, before.page_count) == (PAGE, 4)
    assert (after.page_size, after.page_count) == (2 * PAGE, 2)


@pytest.mark.sim_only
def test_per_device_options_as_a_dict():
    sim = aimdo.SimBackend("2x1GiB")
    with aimdo.Manager(
        sim,
        [0, 1],
        vram_limit={0: 512 * MiB},
        headroom={0: 0, 1: 64 * MiB},
        page_size={1: 4 * MiB},
        poll_interval={0: 0.5},
    ) as manager:
        zero, one = manager.device_info(0), manager.device_info(1)
        assert (zero["vram_limit"], zero["headroom"], zero["page_size"], zero["poll_interval"]) == (
            512 * MiB,
            0,
            32 * MiB,
            0.5,
        )
        # A device the dict leaves out gets the default.
        assert (one["vram_limit"], one["headroom"], one["page_size"], one["poll_interval"]) == (
            None,
            64 * MiB,
            4 * MiB,
            2.0,
        )
        assert manager.create_vbar(8 * MiB, device=1).page_size == 4 * MiB


def test_per_device_options_as_a_dict_on_one_device(make_manager):
    manager = make_manager(pages=8)
    manager.add_devices(
        [0],
        vram_limit={0: 32 * PAGE},
        headroom={0: PAGE},
        poll_interval={0: 0},
        page_size={0: 2 * PAGE},
    )
    info = manager.device_info(0)
    assert (info["vram_limit"], info["headroom"], info["page_size"], info["poll_interval"]) == (
        32 * PAGE,
        PAGE,
        2 * PAGE,
        0.0,
    )


def test_budget_is_limit_minus_headroom_minus_extra_headroom(make_manager):
    manager = make_manager(pages=8, headroom=2 * PAGE, extra_headroom=PAGE)
    limit = 8 * PAGE + 2 * PAGE + manager.baseline[0]
    assert manager.limit_bytes(0) == limit
    assert manager.budget_bytes(0) == limit - 2 * PAGE - PAGE


@pytest.mark.sim_only
@pytest.mark.parametrize(
    "options, limit, budget",
    [
        ({}, 1 * GiB, 1 * GiB - 256 * MiB),  # no limit: the capacity, minus default headroom
        ({"vram_limit": 2 * GiB, "headroom": 0}, 1 * GiB, 1 * GiB),  # a limit above capacity
        (
            {"vram_limit": 512 * MiB, "headroom": 64 * MiB, "extra_headroom": 32 * MiB},
            512 * MiB,
            512 * MiB - 96 * MiB,
        ),
        ({"headroom": 1 * GiB, "extra_headroom": 1}, 1 * GiB, 0),  # never negative
    ],
    ids=["defaults", "limit-above-capacity", "limit-and-headrooms", "headrooms-exceed-limit"],
)
def test_budget_with_exact_capacities(options, limit, budget):
    with aimdo.Manager(aimdo.SimBackend("1GiB"), [0], **options) as manager:
        assert manager.limit_bytes(0) == limit
        assert manager.budget_bytes(0) == budget


# --- lifetime --------------------------------------------------------------------------


def test_manager_as_a_context_manager_closes_it_and_its_vbars(make_manager):
    with make_manager(pages=8) as manager:
        vbar = manager.create_vbar(2 * PAGE, device=0)
        assert vbar.fault(vbar.alloc(PAGE)) is not None
        assert not manager.closed
        assert repr(manager) == f"<aimdo.Manager backend={BACKEND} devices=[0] open>"
    assert manager.closed
    assert vbar.closed
    assert (manager.vbar_count(0), manager.resident_bytes(0)) == (0, 0)
    assert repr(manager) == f"<aimdo.Manager backend={BACKEND} devices=[0] closed>"


def test_manager_context_closes_it_when_the_block_raises(make_manager):
    with pytest.raises(KeyError):
        with make_manager(pages=8) as manager:
            manager.create_vbar(PAGE, device=0)
            raise KeyError("boom")
    assert manager.closed
    assert manager.vbar_count(0) == 0


def test_closing_a_manager_twice_is_harmless(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(2 * PAGE, device=0)
    assert vbar.fault(vbar.alloc(PAGE)) is not None
    manager.close()
    manager.close()
    assert manager.closed
    assert vbar.closed
    assert manager.resident_bytes(0) == 0


# --- the default Manager: init / get_manager / shutdown --------------------------------


def test_get_manager_before_init_raises_aimdo_error(no_default_manager):
    with pytest.raises(aimdo.AimdoError, match=r"aimdo\.init"):
        aimdo.get_manager()


def test_init_twice_with_the_same_devices_returns_the_same_manager(no_default_manager):
    first = aimdo.init(BACKEND, [0])
    second = aimdo.init(BACKEND, [0])
    assert second is first
    assert aimdo.get_manager() is first
    assert first.devices == [0]
    assert first.backend_name == BACKEND


@pytest.mark.sim_only
def test_init_adds_a_device_later(no_default_manager):
    manager = aimdo.init("sim", [0])
    assert manager.devices == [0]
    assert aimdo.init("sim", [1]) is manager
    assert manager.devices == [0, 1]


def test_init_again_updates_options(no_default_manager):
    manager = aimdo.init(BACKEND, [0], headroom=PAGE, page_size=2 * PAGE)
    assert aimdo.init(BACKEND, [0], headroom=3 * PAGE, page_size=4 * PAGE) is manager
    info = manager.device_info(0)
    assert (info["headroom"], info["page_size"]) == (3 * PAGE, 4 * PAGE)


def test_init_again_without_options_keeps_the_options_given_before(no_default_manager):
    manager = aimdo.init(BACKEND, [0], headroom=PAGE, page_size=2 * PAGE)
    assert aimdo.init(BACKEND, [0]) is manager  # "calling it again is harmless"
    info = manager.device_info(0)
    assert (info["headroom"], info["page_size"]) == (PAGE, 2 * PAGE)


def test_init_with_a_different_backend_name_is_a_value_error(no_default_manager):
    manager = aimdo.init(BACKEND, [0])
    with pytest.raises(ValueError, match=r"aimdo\.shutdown\(\)"):
        aimdo.init(OTHER_BACKEND, [0])
    assert aimdo.get_manager() is manager
    assert not manager.closed
    assert manager.backend_name == BACKEND


@pytest.mark.sim_only
def test_init_with_a_different_simulator_object_is_a_value_error(no_default_manager):
    sim = aimdo.SimBackend("1GiB")
    manager = aimdo.init(sim, [0])
    assert aimdo.init(sim, [0]) is manager
    with pytest.raises(ValueError, match=r"aimdo\.shutdown\(\)"):
        aimdo.init(aimdo.SimBackend("1GiB"), [0])
    assert aimdo.get_manager() is manager


def test_shutdown_then_init_again_gives_a_new_manager(no_default_manager):
    first = aimdo.init(BACKEND, [0])
    aimdo.shutdown()
    assert first.closed
    with pytest.raises(aimdo.AimdoError):
        aimdo.get_manager()
    second = aimdo.init(BACKEND, [0])
    assert second is not first
    assert not second.closed
    assert aimdo.get_manager() is second


def test_shutdown_without_init_is_harmless(no_default_manager):
    aimdo.shutdown()
    aimdo.shutdown()
    with pytest.raises(aimdo.AimdoError):
        aimdo.get_manager()


def test_init_after_the_default_manager_was_closed_gives_a_new_one(no_default_manager):
    first = aimdo.init(BACKEND, [0])
    first.close()
    with pytest.raises(aimdo.AimdoError):
        aimdo.get_manager()
    second = aimdo.init(BACKEND, [0])
    assert second is not first
    assert aimdo.get_manager() is second


# --- backend selection -----------------------------------------------------------------


def test_aimdo_backend_env_selects_the_backend_when_none_is_given(monkeypatch):
    monkeypatch.setenv("AIMDO_BACKEND", "sim")
    with aimdo.Manager(None, [0]) as manager:
        assert manager.backend_name == "sim"
        assert isinstance(manager.backend, aimdo.SimBackend)


def test_aimdo_backend_env_is_read_by_init(monkeypatch, no_default_manager):
    monkeypatch.setenv("AIMDO_BACKEND", "sim")
    assert aimdo.init(devices=[0]).backend_name == "sim"


@pytest.mark.parametrize("value", ["tpu", "cuda0", "sim,cuda"])
def test_invalid_aimdo_backend_env_is_a_value_error(monkeypatch, value):
    monkeypatch.setenv("AIMDO_BACKEND", value)
    with pytest.raises(ValueError, match=f"AIMDO_BACKEND='{value}'"):
        aimdo.Manager(None, [0])


def test_explicit_backend_ignores_aimdo_backend_env(monkeypatch):
    monkeypatch.setenv("AIMDO_BACKEND", "tpu")
    with aimdo.Manager(BACKEND, [0]) as manager:
        assert manager.backend_name == BACKEND


@pytest.mark.parametrize("how", ["unset", "empty"])
def test_without_aimdo_backend_env_the_backend_is_sim(monkeypatch, how):
    if how == "unset":
        monkeypatch.delenv("AIMDO_BACKEND", raising=False)
    else:
        monkeypatch.setenv("AIMDO_BACKEND", "")
    with aimdo.Manager(devices=[0]) as manager:
        assert manager.backend_name == "sim"


def test_backend_name_is_case_and_space_insensitive():
    with aimdo.Manager(f"  {BACKEND.upper()} ", [0]) as manager:
        assert manager.backend_name == BACKEND


# --- Vbar ------------------------------------------------------------------------------


def test_vbar_properties(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(3 * PAGE + 1, device=0)
    assert vbar.device == 0
    assert vbar.size_bytes == vbar.size == 3 * PAGE + 1  # the old name is an alias
    assert vbar.page_size_bytes == vbar.page_size == PAGE
    assert vbar.page_count == 4
    assert vbar.watermark_bytes == 4 * PAGE
    assert vbar.floor_bytes == 0
    assert vbar.loaded_bytes == 0
    assert vbar.allocated_bytes == 0
    assert residency(vbar) == "...."
    assert vbar.closed is False
    assert vbar.address != 0
    assert vbar.address % manager.device_info(0)["granularity_bytes"] == 0
    assert manager.vbar_count(0) == 1
    vbar.alloc(3)
    second = vbar.alloc(5)
    assert (second.offset_bytes, second.size_bytes) == (second.offset, second.size) == (512, 5)


@pytest.mark.parametrize(
    "size, pages", [(1, 1), (PAGE - 1, 1), (PAGE, 1), (PAGE + 1, 2), (5 * PAGE, 5)]
)
def test_vbar_page_count_is_size_over_page_size_rounded_up(make_manager, size, pages):
    vbar = make_manager(pages=8).create_vbar(size, device=0)
    assert vbar.page_count == pages
    assert residency(vbar) == "." * pages


def test_vbar_ten_times_the_budget_is_not_clamped(make_manager):
    manager = make_manager(pages=4)
    vbar = manager.create_vbar(40 * PAGE, device=0)
    assert vbar.page_count == 40
    assert vbar.watermark_bytes == 40 * PAGE
    assert residency(vbar) == "." * 40
    assert manager.usage_bytes(0) == 0  # reserving addresses costs no memory
    first = vbar.alloc(4 * PAGE)
    assert vbar.fault(first) is not None
    assert residency(vbar) == "PPPP" + "." * 36


def test_vbars_of_one_device_do_not_overlap(make_manager):
    manager = make_manager(pages=8)
    first = manager.create_vbar(3 * PAGE, device=0)
    second = manager.create_vbar(3 * PAGE, device=0)
    low, high = sorted([first, second], key=lambda v: v.address)
    assert low.address + low.page_count * low.page_size <= high.address
    assert manager.vbar_count(0) == 2


# --- Allocation ------------------------------------------------------------------------


def test_allocation_offsets_are_512_byte_aligned_in_call_order(make_manager):
    vbar = make_manager(pages=8).create_vbar(4 * PAGE, device=0)
    sizes = [1000, 1, 512, 513, 3 * PAGE]
    allocations = [vbar.alloc(size) for size in sizes]
    assert [a.offset for a in allocations] == [0, 1024, 1536, 2048, 3072]
    assert [a.size for a in allocations] == sizes
    assert vbar.allocated_bytes == 3072 + 3 * PAGE


def test_allocation_address_is_vbar_address_plus_offset(make_manager):
    vbar = make_manager(pages=8).create_vbar(4 * PAGE, device=0)
    vbar.alloc(100)
    allocation = vbar.alloc(PAGE)
    assert allocation.offset == 512
    assert allocation.address == vbar.address + 512
    assert allocation.vbar is vbar
    assert allocation.device == 0
    assert repr(allocation) == f"Allocation(device=0, offset=512, size={PAGE})"


# --- Signature -------------------------------------------------------------------------


def test_signature_equality_hash_and_repr(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(2 * PAGE)
    first = vbar.fault(weight)
    vbar.unpin(weight)
    second = vbar.fault(weight)
    vbar.unpin(weight)
    assert isinstance(first, aimdo.Signature)
    assert first.serials == (1, 2)  # a new serial per page mapped, per device, from 1
    assert len(first) == 2
    assert repr(first) == "Signature(1, 2)"
    assert first == second
    assert not (first != second)
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    assert first != (1, 2)
    assert not (first == (1, 2))


def test_signature_changes_when_a_page_is_mapped_again(make_manager):
    manager = make_manager(pages=8)
    vbar = manager.create_vbar(4 * PAGE, device=0)
    weight = vbar.alloc(2 * PAGE)
    before = vbar.fault(weight)
    vbar.unpin(weight)
    vbar.set_watermark(PAGE)  # releases page 1 only
    vbar.set_watermark(4 * PAGE)
    assert residency(vbar) == "R..."
    after = vbar.fault(weight)
    vbar.unpin(weight)
    assert after.serials == (1, 3)
    assert after != before
    assert repr(after) == "Signature(1, 3)"


# --- sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("24GiB", 24 * GiB),
        ("512 MiB", 512 * MiB),
        ("1.5GB", 1_500_000_000),
        ("80GB", 80_000_000_000),
        ("4kib", 4096),
        ("2 KB", 2000),
        ("1TiB", 1 << 40),
        ("1024", 1024),
        ("7B", 7),
        (" 3 MiB ", 3 * MiB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text, nbytes):
    assert aimdo.parse_size(text) == nbytes


@pytest.mark.parametrize(
    "text, error",
    [
        ("", ValueError),
        ("lots", ValueError),
        ("1 GiBs", ValueError),
        ("-1GiB", ValueError),
        (-1, ValueError),
        ("1e9", ValueError),
        (True, TypeError),
        (1.5, TypeError),
        (None, TypeError),
    ],
)
def test_parse_size_rejects(text, error):
    with pytest.raises(error):
        aimdo.parse_size(text)


@pytest.mark.parametrize(
    "nbytes, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (32 * MiB, "32.00 MiB"),
        (24 * GiB, "24.00 GiB"),
        (1 << 40, "1.00 TiB"),
        (3 << 40, "3.00 TiB"),
    ],
)
def test_format_size(nbytes, text):
    assert aimdo.format_size(nbytes) == text


def test_format_size_reads_back_with_parse_size():
    for nbytes in (1024, 32 * MiB, 24 * GiB):
        assert aimdo.parse_size(aimdo.format_size(nbytes).replace(" ", "")) == nbytes


# --- simulator specs -------------------------------------------------------------------


@pytest.mark.sim_only
def test_sim_backend_count_times_capacity():
    sim = aimdo.SimBackend("2x24GiB")
    assert (sim.name, sim.device_count, sim.seed) == ("sim", 2, 0)
    assert repr(sim) == "SimBackend(devices=[24GiB, 24GiB], seed=0)"
    keys = ("name", "total_bytes", "granularity_bytes", "integrated")
    with aimdo.Manager(sim) as manager:
        for device in (0, 1):
            info = manager.device_info(device)
            assert tuple(info[k] for k in keys) == (
                f"aimdo simulated GPU {device}",
                24 * GiB,
                2 * MiB,
                False,
            )
            assert manager.memory_info(device) == (24 * GiB, 24 * GiB)


@pytest.mark.sim_only
def test_sim_backend_default_is_two_24_gib_devices():
    sim = aimdo.SimBackend()
    assert sim.device_count == 2
    assert repr(sim) == "SimBackend(devices=[24GiB, 24GiB], seed=0)"


@pytest.mark.sim_only
def test_sim_backend_comma_separated_capacities():
    sim = aimdo.SimBackend("24GiB,12GiB", seed=7)
    assert (sim.device_count, sim.seed) == (2, 7)
    assert repr(sim) == "SimBackend(devices=[24GiB, 12GiB], seed=7)"
    with aimdo.Manager(sim) as manager:
        totals = [manager.device_info(d)["total_bytes"] for d in manager.devices]
        assert totals == [24 * GiB, 12 * GiB]


@pytest.mark.sim_only
def test_sim_backend_list_of_dict_specs():
    sim = aimdo.SimBackend(
        [
            {"capacity": "8GiB", "name": "big", "granularity": "4MiB", "integrated": True},
            {"capacity": 1 * GiB},
            "2GiB",
        ]
    )
    assert sim.device_count == 3
    with aimdo.Manager(sim) as manager:
        keys = ("name", "total_bytes", "granularity_bytes", "integrated")
        got = [tuple(manager.device_info(d)[k] for k in keys) for d in manager.devices]
        assert got == [
            ("big", 8 * GiB, 4 * MiB, True),
            ("aimdo simulated GPU 1", 1 * GiB, 2 * MiB, False),
            ("aimdo simulated GPU 2", 2 * GiB, 2 * MiB, False),
        ]


@pytest.mark.sim_only
def test_sim_backend_operations_are_the_cuda_names():
    operations = aimdo.SimBackend.operations()
    for name in (
        "cuMemCreate",
        "cuMemMap",
        "cuMemSetAccess",
        "cuMemUnmap",
        "cuMemRelease",
        "cuMemAddressReserve",
        "cuMemAddressFree",
        "cuMemGetInfo",
        "cuCtxSynchronize",
        "cuMemcpyDtoDAsync",
        "cuMemcpyHtoDAsync",
        "cuEventCreate",
        "cuEventDestroy",
        "cuEventRecord",
        "cuEventSynchronize",
        "cuStreamWaitEvent",
    ):
        assert name in operations


# --- exports ---------------------------------------------------------------------------


def test_package_exports():
    assert sorted(aimdo.__all__) == sorted(
        [
            "ALLOCATION_ALIGNMENT_BYTES",
            "AimdoError",
            "Allocation",
            "CheckpointError",
            "CudaBackend",
            "DeviceNotInitializedError",
            "DriverError",
            "InvalidStateError",
            "Manager",
            "OutOfMemoryError",
            "PeerLink",
            "Signature",
            "SimBackend",
            "Vbar",
            "format_size",
            "get_manager",
            "init",
            "parse_size",
            "shutdown",
        ]
    )
    for name in aimdo.__all__:
        assert hasattr(aimdo, name), name


# --- command line ----------------------------------------------------------------------


def test_cli_info_prints_the_backend_and_every_device(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aimdo", "info", "--backend", BACKEND],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"backend: {BACKEND}" in lines
    expected = (aimdo.CudaBackend() if BACKEND == "cuda" else aimdo.SimBackend()).device_count
    listed = [int(m.group(1)) for line in lines if (m := re.search(r"\bdevice (\d+)\b", line))]
    assert listed == list(range(expected))
    assert "why: chosen with --backend" in lines


def gpus_here() -> int:
    try:
        return aimdo.CudaBackend().device_count
    except aimdo.AimdoError:
        return 0


@pytest.mark.parametrize("environment", [None, "sim"], ids=["no-variable", "variable"])
def test_cli_info_chooses_the_backend_and_says_why(tmp_path, environment):
    env = {k: v for k, v in os.environ.items() if k != "AIMDO_BACKEND"}
    if environment is not None:
        env["AIMDO_BACKEND"] = environment
    result = subprocess.run(
        [sys.executable, "-m", "aimdo", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    why = next(line for line in lines if line.startswith("why: "))
    if environment is not None:
        assert "backend: sim" in lines and why == "why: chosen with AIMDO_BACKEND=sim"
    elif gpus_here():
        assert "backend: cuda" in lines and f"reports {gpus_here()} GPU" in why
    else:
        assert "backend: sim" in lines and why.startswith("why: the simulator: the CUDA driver")
