"""Figures of an evaluation: accuracy against length per model; niah depth x length heat maps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import InputError
from .evaluate import EvalReport
from .fileio import atomic_file, check_output_path

FORMATS = ("png", "pdf", "svg")


def plot_format(path: Path) -> str:
    """The image format named by path's suffix; refuse others before any work is done."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise InputError(f"{path}: plot file must end in {', '.join('.' + f for f in FORMATS)}")
    return fmt


def check_plot_path(path: Path, force: bool) -> None:
    plot_format(path)
    check_output_path(Path(path), force)


def _accuracy_axes(ax: Any, report: EvalReport) -> None:
    n = len(report.models)
    for i, m in enumerate(report.models):
        cells = [report.cell(m.name, x) for x in report.lengths]
        y = [c.accuracy for c in cells]
        err = [[c.accuracy - c.ci_low for c in cells], [c.ci_high - c.accuracy for c in cells]]
        # models side by side around each length, so that equal accuracies keep visible error bars
        shift = 2.0 ** ((i - (n - 1) / 2) * 0.03)
        ax.errorbar([x * shift for x in report.lengths], y, yerr=err, marker="o", capsize=4, label=m.name)
    if len(report.lengths) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(report.lengths)
    ax.set_xticklabels([str(x) for x in report.lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    per = f"{report.samples} per length" + (" and depth" if report.depths else "")
    ax.set_title(f"{report.task}: {per}, seed {report.seed}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _heat_maps(fig: Any, axes: list[Any], report: EvalReport) -> None:
    depths = report.depths or []
    image = None
    for ax, m in zip(axes, report.models, strict=False):
        grid = [[report.cell(m.name, x, d).accuracy for x in report.lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(report.lengths)), [str(x) for x in report.lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(m.name, fontsize="small")
        for i, d in enumerate(depths):
            for j, x in enumerate(report.lengths):
                cell = report.cell(m.name, x, d)
                dark = cell.accuracy < 0.25 or cell.accuracy > 0.85  # the colour map's dark ends
                ax.text(j, i, f"{cell.correct}/{cell.total}", ha="center", va="center", fontsize="small",
                        color="white" if dark else "black")
    for ax in axes[len(report.models):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)


def plot_report(report: EvalReport, path: Path, force: bool = False) -> None:
    """Write the figure to path (png, pdf or svg, by suffix), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = plot_format(path)
    heat = report.task == "niah" and bool(report.depths)
    n = len(report.models)
    cols = min(n, 3) if heat else 1
    rows = math.ceil(n / cols) if heat else 0
    fig = plt.figure(figsize=(max(7.0, 4.2 * cols), 4.5 + 3.6 * rows), layout="constrained")
    try:
        spec = fig.add_gridspec(1 + rows, max(cols, 1), height_ratios=[4.5] + [3.6] * rows)
        _accuracy_axes(fig.add_subplot(spec[0, :]), report)
        if heat:
            axes = [fig.add_subplot(spec[1 + i // cols, i % cols]) for i in range(rows * cols)]
            _heat_maps(fig, axes, report)
        with atomic_file(Path(path), force=force) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
