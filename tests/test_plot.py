"""Pictures (issue 15, item 4): the residency map's data and both figures, saved."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")  # the test extra installs it: a skip here is a setup error
torch = pytest.importorskip("torch")

import aimdo.plot as aplot  # noqa: E402
import aimdo.torch as atorch  # noqa: E402
from conftest import PAGE  # noqa: E402
from torch_support import new_manager, one_page_layers, where  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_runs_give_each_page_its_state(make_manager):
    manager = make_manager(pages=4)
    low = manager.create_vbar(6 * PAGE, device=0)
    high = manager.create_vbar(2 * PAGE, device=0)
    first = low.alloc(2 * PAGE)
    low.fault(first)  # pages 0-1 pinned
    second = low.alloc(PAGE)
    low.fault(second)
    low.unpin(second)  # page 2 resident
    low.set_watermark(4 * PAGE)  # pages 4-5 offloaded, page 3 not resident
    runs = aplot.residency_runs(manager, 0)
    assert [entry["vbar"] for entry in runs] == [high, low]
    assert runs[0]["runs"] == [("not resident", 0, 2)]
    assert runs[1]["runs"] == [
        ("pinned", 0, 2),
        ("resident", 2, 1),
        ("not resident", 3, 1),
        ("offloaded", 4, 2),
    ]


def test_the_residency_map_draws_every_run_and_saves_a_png(make_manager, tmp_path):
    manager = make_manager(pages=4)
    vbar = manager.create_vbar(6 * PAGE, device=0)
    vbar.fault(vbar.alloc(3 * PAGE))
    vbar.set_watermark(4 * PAGE)
    path = tmp_path / "map.png"
    figure = aplot.residency_map(manager, path, labels={vbar: "model"})
    (ax,) = figure.axes
    assert len(ax.collections) == 3  # pinned, not resident, offloaded
    assert [t.get_text() for t in ax.get_yticklabels()] == ["model\n12.00 MiB"]
    assert path.read_bytes()[:8] == PNG


def test_the_timeline_draws_each_span_of_a_timed_forward(make_manager, tmp_path):
    log = []
    model = one_page_layers(6, log)
    x = torch.randn(2, model[0].in_features).to(where(0))
    manager = new_manager(make_manager, pages=4)
    with atorch.offload(model, 0, manager=manager, timings=True) as handle:
        model(x)
        model(x)
        timings = handle.last_timings
        path = tmp_path / "timeline.png"
        figure = aplot.timeline({"device 0": timings}, path)
    (ax,) = figure.axes
    assert len(ax.collections) == len(timings.spans)
    lanes = {span.lane for span in timings.spans}
    assert lanes == {"compute", "stall", "copy"}
    copies = [span for span in timings.spans if span.lane == "copy"]
    assert len(copies) == 2 and all(span.source == "host" for span in copies)
    # The compute engine's spans follow each other from 0 to the forward's end.
    engine = [span for span in timings.spans if span.lane != "copy"]
    assert engine[0].start == 0.0 and engine[-1].end == pytest.approx(timings.seconds)
    assert all(a.end == pytest.approx(b.start) for a, b in zip(engine, engine[1:], strict=False))
    assert path.read_bytes()[:8] == PNG


def test_bad_input_gets_a_typed_error(make_manager):
    manager = make_manager(pages=2)
    with pytest.raises(TypeError, match="ForwardTimings"):
        aplot.timeline(None)  # what last_timings is when nothing was timed
    with pytest.raises(TypeError, match="ForwardTimings"):
        aplot.overview(manager, {"device 0": "not timings"})
    with pytest.raises(ValueError, match="no timed forward"):
        aplot.timeline({})
    with pytest.raises(ValueError, match="no device"):
        aplot.residency_map(manager, devices=[])
