"""The fleet's PNG plots are written, readable, and thin huge inputs without losing peaks."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg

from simulator import plots
from simulator.plots import Sample, plot_latency, plot_spool


def test_latency_plot_is_a_png(tmp_path: Path) -> None:
    points = [(t / 10, 50.0 + (5000.0 if 200 <= t < 300 else 0.0)) for t in range(600)]
    out = plot_latency(tmp_path / "latency.png", points, [(20.0, 30.0)], "test")
    img = mpimg.imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spool_plot_is_a_png(tmp_path: Path) -> None:
    samples = [Sample(float(t), t * 10, t * 100, t * 90, 5) for t in range(30)]
    out = plot_spool(tmp_path / "spool.png", samples, [], "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thinning_keeps_the_slowest_of_each_slice() -> None:
    points = [(float(i), 1.0) for i in range(plots.MAX_POINTS * 3)]
    points[12_345] = (12_345.0, 999.0)
    thin = plots._thin(points)
    assert len(thin) == plots.MAX_POINTS
    assert (12_345.0, 999.0) in thin


def test_p99_by_bucket() -> None:
    points = [(1.0, float(v)) for v in range(1, 101)] + [(7.0, 3.0)]
    xs, ys = plots._p99_by_bucket(points)
    assert xs == [2.5, 7.5]
    assert ys == [100.0, 3.0]
