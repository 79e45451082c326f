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
