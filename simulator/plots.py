"""PNG plots of a fleet run: delivery latency over time with outages shaded, spool depth over time.

Rendered with matplotlib's Agg backend (no screen needed).  Latency points are thinned to
at most ``MAX_POINTS`` (evenly, keeping the slowest of each slice) so a long run does not
make a huge figure; the p99 line is computed from every point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first
from matplotlib.axes import Axes

MAX_POINTS = 20_000
BUCKET_S = 5.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One progress sample of the fleet, ``t`` seconds after the start."""

    t: float
    spool_depth: int
    accepted: int
    delivered: int
    online: int


def _thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most MAX_POINTS points: the slowest of each consecutive slice (peaks stay visible)."""
    if len(points) <= MAX_POINTS:
        return list(points)
    step = len(points) / MAX_POINTS
    out = []
    for i in range(MAX_POINTS):
        chunk = points[int(i * step) : int((i + 1) * step)] or [points[int(i * step)]]
        out.append(max(chunk, key=lambda p: p[1]))
    return out


def _p99_by_bucket(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    buckets: dict[int, list[float]] = {}
    for t, ms in points:
        buckets.setdefault(int(t // BUCKET_S), []).append(ms)
    xs, ys = [], []
    for b in sorted(buckets):
        values = sorted(buckets[b])
        xs.append((b + 0.5) * BUCKET_S)
        ys.append(values[min(len(values) - 1, int(0.99 * len(values)))])
    return xs, ys


def _shade(ax: Axes, outages: Sequence[tuple[float, float]]) -> None:
    for i, (start, end) in enumerate(outages):
        ax.axvspan(start, end, color="tab:red", alpha=0.15, label="outage" if i == 0 else None)


def plot_latency(
    path: Path,
    points: Sequence[tuple[float, float]],
    outages: Sequence[tuple[float, float]],
    title: str,
) -> Path:
    """Accept-to-hub latency (ms, log scale) of each record against its accept time."""
    pts = sorted(points)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    shown = _thin(pts)
    if shown:
        ax.scatter([p[0] for p in shown], [p[1] for p in shown], s=2, alpha=0.35, label="record")
        xs, ys = _p99_by_bucket(pts)
        ax.plot(xs, ys, color="black", linewidth=1.2, label=f"p99 per {BUCKET_S:.0f} s")
        ax.set_yscale("log")
    _shade(ax, outages)
    ax.set_xlabel("accepted at (s since start)")
    ax.set_ylabel("accept -> hub commit latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_spool(
    path: Path, samples: Sequence[Sample], outages: Sequence[tuple[float, float]], title: str
) -> Path:
    """Records waiting in the edges' spools, and devices online, over time."""
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    ts = [s.t for s in samples]
    ax.plot(ts, [s.spool_depth for s in samples], color="tab:blue", label="in spools (records)")
    ax.set_xlabel("time (s since start)")
    ax.set_ylabel("records in edge spools")
    _shade(ax, outages)
    right = ax.twinx()
    right.plot(ts, [s.online for s in samples], color="tab:green", linestyle="--", label="online")
    right.set_ylabel("devices online")
    right.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
