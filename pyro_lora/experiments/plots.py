"""PNG figures for evaluation: reliability diagrams and metric-vs-accuracy scatters.

matplotlib is imported inside the functions (importing ``pyro_lora`` stays fast) and figures are
drawn on an Agg canvas directly, never through pyplot, so no global backend or figure state is
touched. Every PNG is written atomically: a temp file in the target directory, then ``os.replace``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import metrics
from ..io import atomic_file

__all__ = ["difference_heatmaps", "metric_scatter", "new_figure", "reliability_diagram", "reliability_grid", "save_png"]


def new_figure(figsize: tuple[float, float], layout: str | None = "constrained"):
    """A matplotlib ``Figure`` of ``figsize`` inches (width, height), bound to an Agg canvas: no pyplot and no GUI
    backend, so no global figure state is touched. ``layout`` is matplotlib's layout engine (``None``: the axes stay
    where they are placed). Draw on it with its own methods (``fig.subplots(...)``, ``fig.colorbar(...)``) and write
    it with :func:`save_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> Path:
    """Write the figure ``fig`` (e.g. from :func:`new_figure`) to ``path`` as a 120 dpi PNG, atomically: readers never
    see a half-written file, and a failure leaves no temp file. Returns ``Path(path)``."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return Path(path)



# a reliability panel's margins in inches (left, right, bottom, top): fixed, because the panels' labels never change
# and a layout engine measuring them costs as much as drawing the figure (the figures are drawn once per method)
_PANEL = (4.0, 4.6)
_MARGINS = (0.62, 0.15, 0.5, 0.5)  # the top one holds a two-line title: the name, then the ECE


def _panel_spec(fig, row: int, col: int):
    """The grid spec of the reliability panel in cell (``row``, ``col``) of a figure of such cells: the
    accuracy axes over the histogram's (3 : 1), inside the cell's margins."""
    width, height = fig.get_size_inches()
    (w, h), (left, right, bottom, top) = _PANEL, _MARGINS
    return fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.05,
                            left=(col * w + left) / width, right=((col + 1) * w - right) / width,
                            bottom=1 - ((row + 1) * h - bottom) / height, top=1 - (row * h + top) / height)


def _draw_reliability(fig, sub, probs, labels, num_bins: int, title: str | None) -> None:
    """Draw one reliability panel into ``sub`` (:func:`_panel_spec`): accuracy bars vs the diagonal, confidence
    histogram below."""
    bins = metrics.reliability_bins(probs, labels, num_bins)
    ece100 = 100.0 * metrics.ece(probs, labels, num_bins)
    acc, conf = bins.accuracy.numpy(), bins.confidence.numpy()
    counts = bins.counts.numpy()
    frac = counts / counts.sum()
    width = 1.0 / num_bins
    left = [k * width for k in range(num_bins)]

    ax = fig.add_subplot(sub[0])
    hist = fig.add_subplot(sub[1], sharex=ax)

    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    ax.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="white",
           lw=0.5, label="accuracy")
    # Gap bars span accuracy -> mean confidence: red above a bar is over-confidence.
    ax.bar(left, conf - acc, bottom=acc, width=width, align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", lw=0.5, label="gap")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(labelbottom=False)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    name = f"{title}\n" if title else ""  # a line of its own: "laplace_val+ts on openbookqa" fills the width
    ax.set_title(f"{name}ECE {ece100:.2f}  (N={int(counts.sum())}, {num_bins} bins)", fontsize=9)

    hist.bar(left, frac, width=width, align="edge", color="0.55", edgecolor="white", lw=0.5)
    hist.axvline(metrics.accuracy(probs, labels), color="tab:blue", lw=1.2, label="accuracy")
    hist.axvline(float((bins.confidence * bins.counts).sum() / bins.counts.sum()), color="tab:red",
                 lw=1.2, ls="--", label="mean conf.")
    hist.set_xlabel("confidence (top-label probability)")
    hist.set_ylabel("fraction")
    hist.set_ylim(0, max(float(frac.max()) * 1.15, 0.05))
    hist.legend(loc="upper left", fontsize=6, frameon=False)


def reliability_diagram(probs, labels, path, num_bins: int = 15, title: str | None = None) -> Path:
    """Save one reliability diagram (probs [N, C], labels [N]) as a PNG at ``path``; returns the path."""
    fig = new_figure(_PANEL, layout=None)
    _draw_reliability(fig, _panel_spec(fig, 0, 0), probs, labels, num_bins, title)
    return save_png(fig, path)


def reliability_grid(results: Mapping[str, tuple], path, num_bins: int = 15) -> Path:
    """Save a grid of reliability diagrams, one panel per guide: results = {name: (probs [N, C], labels [N])}."""
    if not results:
        raise ValueError("empty input: results has no guides")
    ncols = min(len(results), 3)
    nrows = math.ceil(len(results) / ncols)
    fig = new_figure((_PANEL[0] * ncols, _PANEL[1] * nrows), layout=None)
    for i, (name, (probs, labels)) in enumerate(results.items()):
        _draw_reliability(fig, _panel_spec(fig, i // ncols, i % ncols), probs, labels, num_bins, name)
    return save_png(fig, path)


def metric_scatter(rows: Sequence[Mapping], path, x: str = "accuracy", ys: Sequence[str] = ("ece", "nll")) -> Path:
    """Save one scatter per metric in ``ys`` against ``x``, one labelled point per guide.

    rows: [{"guide", x, f"{x}_std", y, f"{y}_std", ...}]; a missing or None ``*_std`` draws no error bar.
    """
    if not rows:
        raise ValueError("empty input: rows is empty")
    if not ys:
        raise ValueError("empty input: ys names no metric")
    for row in rows:
        missing = [k for k in ("guide", x, *ys) if k not in row]
        if missing:
            raise ValueError(f"row {row.get('guide', row)!r} lacks keys {missing}")

    from matplotlib import colormaps

    colors = colormaps["tab10"]
    fig = new_figure((4.0 * len(ys), 3.6))
    axes = fig.subplots(1, len(ys), squeeze=False)[0]
    for ax, y in zip(axes, ys):
        for i, row in enumerate(rows):
            ax.errorbar(row[x], row[y], xerr=row.get(f"{x}_std"), yerr=row.get(f"{y}_std"),
                        fmt="o", color=colors(i % 10), capsize=3, ms=5)
            ax.annotate(str(row["guide"]), (row[x], row[y]), xytext=(5, 4),
                        textcoords="offset points", fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{y} vs {x}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    return save_png(fig, path)


def difference_heatmaps(panels: Sequence[tuple], rows: Sequence[str], cols: Sequence[str], path,
                        scale_rows: Sequence[int] | None = None) -> Path:
    """Save side-by-side heatmaps of signed differences (e.g. a guide's metric minus MAP's), one per panel.

    panels: ``[(title, values)]``, ``values`` an array ``[len(rows), len(cols)]``; NaN cells stay blank, the others
    are labelled with their value. Each panel's colour scale is symmetric around zero (blue below, red above),
    set by the rows ``scale_rows`` (row indices; default all), so that a far-off row does not wash out the others.
    """
    import numpy as np

    if not panels or not len(rows) or not len(cols):
        raise ValueError("empty input: no panel, row or column to draw")
    scaled = list(scale_rows) if scale_rows else list(range(len(rows)))
    fig = new_figure((1.2 + 0.95 * len(cols) * len(panels), 1.2 + 0.45 * len(rows)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels):
        values = np.asarray(values, dtype=float)
        finite = np.abs(values[scaled])[np.isfinite(values[scaled])]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(values[i, j]):
                    color = "white" if abs(values[i, j]) > 0.6 * vmax else "black"
                    ax.text(j, i, f"{values[i, j]:+.1f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return save_png(fig, path)
