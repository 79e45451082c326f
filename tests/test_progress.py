"""Progress of long work: a bar or lines on a terminal, nothing otherwise (issue 15, item 7)."""

from __future__ import annotations

import io
import re
import sys

import pytest

torch = pytest.importorskip("torch")  # the test extra installs it: a skip here is a setup error

import aimdo._progress as progress  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from torch_support import new_manager, stack, weight_bytes  # noqa: E402


class Terminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def offload_once(make_manager) -> int:
    model = stack(blocks=4)
    with atorch.offload(model, 0, manager=new_manager(make_manager, pages=4)):
        pass
    return weight_bytes(model)


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_moving_weights_shows_tenths_on_a_terminal_only(make_manager, monkeypatch, tty):
    monkeypatch.setattr(progress, "MIN_BYTES", 0)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    terminal = Terminal(tty)
    monkeypatch.setattr(sys, "stderr", terminal)
    offload_once(make_manager)
    lines = terminal.getvalue().splitlines()
    if not tty:
        assert lines == []
        return
    # One chunk (the model is small): every tenth is reported once, in order.
    assert [re.search(r": (\d+)% \(", line).group(1) for line in lines] == [
        str(10 * i) for i in range(1, 11)
    ]
    assert all(line.startswith("aimdo: moving weights to host chunks: ") for line in lines)


def test_small_work_shows_nothing(make_manager, monkeypatch):
    terminal = Terminal(True)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert offload_once(make_manager) < progress.MIN_BYTES
    assert terminal.getvalue() == ""


def test_a_bar_when_tqdm_is_installed(make_manager, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(progress, "MIN_BYTES", 0)
    terminal = Terminal(True)
    monkeypatch.setattr(sys, "stderr", terminal)
    offload_once(make_manager)
    assert "aimdo: moving weights to host chunks" in terminal.getvalue()
    assert "10%" not in terminal.getvalue()  # tqdm's bar, not the plain lines
