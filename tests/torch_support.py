"""What the aimdo.torch tests share: managers over a real-bytes simulator (or the GPUs),
small models, and their plain outputs."""

from __future__ import annotations

import copy

import aimdo
import pytest
import torch
from conftest import BACKEND, PAGE


def new_manager(make_manager, pages, devices=(0,), **options):
    if BACKEND == "sim":
        return make_manager(
            pages=pages, devices=devices, sim=aimdo.SimBackend("2x1GiB", real_bytes=True), **options
        )
    return make_manager(pages=pages, devices=devices, **options)


def where(device: int) -> torch.device:
    """Where device `device`'s tensors live (skipping a test on a machine without it)."""
    if BACKEND == "sim":
        return torch.device("cpu")
    if device >= torch.cuda.device_count():
        pytest.skip(f"needs {device + 1} GPUs; this machine has {torch.cuda.device_count()}")
    return torch.device("cuda", device)


def stack(blocks: int = 12, width: int = 256, seed: int = 0) -> torch.nn.Module:
    """A small transformer-like stack: per block, LayerNorm -> Linear -> GELU -> Linear."""
    torch.manual_seed(seed)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(width)
            self.up = torch.nn.Linear(width, 4 * width)
            self.down = torch.nn.Linear(4 * width, width)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    return torch.nn.Sequential(*[Block() for _ in range(blocks)]).eval()


def reference(model, x, device):
    """The plain model's output on the device (call it before offloading the model)."""
    with torch.no_grad():
        return copy.deepcopy(model).to(where(device))(x.to(where(device)))


def weight_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
    )


def one_page_layers(count: int, log: list) -> torch.nn.Module:
    """`count` bias-free float32 Linear layers of exactly one page each, logging "runN"."""

    class Layer(torch.nn.Linear):
        def __init__(self, index):
            fan_in, fan_out = (
                (PAGE // 4 // 1024, 1024) if index % 2 == 0 else (1024, PAGE // 4 // 1024)
            )
            super().__init__(fan_in, fan_out, bias=False)
            self.index = index

        def forward(self, x):
            log.append(f"run{self.index}")
            return super().forward(x)

    torch.manual_seed(0)
    return torch.nn.Sequential(*[Layer(i) for i in range(count)]).eval()


def mixed_pages(repeats: int = 2) -> torch.nn.Module:
    """Linear layers of 1, 1, 3 and 3 pages (no bias), `repeats` times over: blocks of
    mixed sizes, so that the small ones ride in the room a staging buffer grown to three
    pages has left (aimdo._schedule.Schedule.take_slot)."""
    width = PAGE // 4 // 256  # a Linear(256, width) without bias is one page
    layers = []
    for _ in range(repeats):
        layers += [
            torch.nn.Linear(256, width, bias=False),
            torch.nn.Linear(width, 256, bias=False),
            torch.nn.Linear(256, 3 * width, bias=False),
            torch.nn.Linear(3 * width, 256, bias=False),
        ]
    return torch.nn.Sequential(*layers).eval()


def count_copies(monkeypatch) -> dict:
    """Patch aimdo.torch's executor to count its copies by (source, whether the block
    rides in another's staging buffer): source "peer", "file" or "host"."""
    from aimdo import _torch_offload

    counted: dict = {}
    original = _torch_offload._TorchExecutor.copy

    def counting(self, block, storage, after):
        source = "peer" if block.peers else "file" if block.file_runs else "host"
        counted[(source, block.rides)] = counted.get((source, block.rides), 0) + 1
        return original(self, block, storage, after)

    monkeypatch.setattr(_torch_offload._TorchExecutor, "copy", counting)
    return counted
