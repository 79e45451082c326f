"""One process per GPU (issue 13, item 8): under torchrun each process runs its own Manager
on its local device and offloads the model there; the processes exchange their outputs
through torch.distributed (NCCL on GPUs, gloo on the simulator) and each checks them
against the plain model. Nothing is shared between the processes but the collective."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

from conftest import BACKEND  # noqa: E402

WORKER = textwrap.dedent(
    """
    import os, torch, torch.distributed as dist, aimdo, aimdo.torch as atorch
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = os.environ["AIMDO_BACKEND"] == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        backend, device = "cuda", torch.device("cuda", local)
        ordinal, devices = local, [local]
    else:  # a simulator of its own per process; its device 0 stands for the local GPU
        backend = aimdo.SimBackend("1x1GiB", real_bytes=True)
        device, ordinal, devices = torch.device("cpu"), 0, [0]
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)  # the same model in every process
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                              torch.nn.Linear(1024, 256)) for _ in range(6)]
    ).eval()
    def inputs(r):
        return torch.randn(2, 256, generator=torch.Generator().manual_seed(r))

    import copy
    plain = copy.deepcopy(model).to(device)
    with torch.no_grad():
        expected = [plain(inputs(r).to(device)) for r in range(dist.get_world_size())]
    del plain
    limit, headroom = 6 << 20, 0
    if cuda:  # 6 MiB above what the process uses already
        free, total = torch.cuda.mem_get_info(local)
        limit += total - free
    with aimdo.Manager(backend, devices, vram_limit=limit, headroom=headroom,
                       page_size=2 << 20) as manager:
        with atorch.offload(model, ordinal, manager=manager):
            for _ in range(3):
                out = model(inputs(rank).to(device))
            assert torch.equal(out, expected[rank]), "offloaded output differs"
            stats = manager.stats(ordinal)
            assert stats["faults"] > 0 and stats["offloaded"] > 0, stats
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out)
    for r, theirs in enumerate(gathered):
        assert torch.equal(theirs, expected[r]), f"rank {r}'s output differs"
    dist.destroy_process_group()
    print(f"rank {rank} ok")
    """
)


def test_two_processes_each_offload_on_their_own_device(tmp_path):
    if BACKEND == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, AIMDO_BACKEND=BACKEND)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
