"""Figures: an evaluation's accuracy against length per model and niah depth x length heat maps;
layers x heads heat maps (head ablation effects, learned scales)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal_gguf.constants import GRANULARITY_HEAD, ScalesMeta
from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_file, check_output_path
from seal_gguf.measure.evaluate import EvalReport
from seal_gguf.scales import SealScales

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


@dataclass(frozen=True)
class HeadGrid:
    """One layers x heads heat map: values [layers, heads], coloured by their distance from center."""

    title: str
    values: Any  # torch.Tensor or nested lists, [layers, heads]; NaN (not measured) is drawn blank
    center: float
    label: str  # colour bar label
    cmap: str = "RdBu_r"  # diverging: red above center, blue below


def plot_head_grids(grids: Sequence[HeadGrid], path: Path, title: str, columns: int | None = None,
                    force: bool = False) -> None:
    """Heat maps, `columns` to a row (default: all in one row), each with layers as rows (0 at the top)
    and heads as columns and a colour scale symmetric around its center. Written atomically (png, pdf
    or svg, by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = plot_format(path)
    rows = [[float(v) for v in row] for row in grids[0].values]
    layers, heads = len(rows), len(rows[0])
    cols = columns or len(grids)
    nrows = math.ceil(len(grids) / cols)
    width, height = max(4.5, 1.6 + 0.42 * heads), max(3.5, 1.6 + 0.2 * layers)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), layout="constrained",
                             squeeze=False)
    try:
        for ax in axes.flat[len(grids):]:
            ax.set_visible(False)
        for ax, grid in zip(axes.flat, grids, strict=False):
            values = [[float(v) for v in row] for row in grid.values]
            # all values at the center (e.g. no ablation flips an answer): a plain unit scale, not a degenerate one;
            # NaN (not measured) is left blank
            spread = max((abs(v - grid.center) for row in values for v in row if not math.isnan(v)), default=0.0) or 1.0
            image = ax.imshow(values, cmap=grid.cmap, vmin=grid.center - spread, vmax=grid.center + spread,
                              aspect="auto", interpolation="nearest")
            ax.set_xticks(range(heads))
            step = max(1, math.ceil(layers / 32))
            ax.set_yticks(range(0, layers, step))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(grid.title, fontsize="medium")
            fig.colorbar(image, ax=ax, label=grid.label, shrink=0.9)
        fig.suptitle(title, fontsize="medium")
        with atomic_file(Path(path), force=force) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)


def plot_scales(scales: SealScales, path: Path, name: str = "", force: bool = False) -> None:
    """The learned scales as a layers x heads heat map centred at 1.0 (red: amplified, blue: suppressed),
    to put beside `seal-gguf heads --plot`. SEAL-C scales are averaged over each head's channels.
    name (e.g. the scales file's name) heads the title."""
    if scales.granularity == GRANULARITY_HEAD:
        title = "SEAL-H scale of each head"
    else:
        title = f"SEAL-C scales: mean over each head's {scales.values.shape[-1]} channels"
    grid = HeadGrid(title, scales.per_head(), center=1.0, label="scale (1.0: unchanged)")
    meta = scales.metadata
    trained = (f", trained on {meta[ScalesMeta.TASK]} at {meta[ScalesMeta.LENGTH]} tokens"
               if ScalesMeta.TASK in meta and ScalesMeta.LENGTH in meta else "")
    heading = "\n".join(line for line in (name, f"{scales.model_type}{trained}") if line)
    plot_head_grids([grid], path, heading, force=force)
