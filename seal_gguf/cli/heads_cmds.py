"""`seal-gguf heads`: which attention heads matter for a retrieval task."""

from __future__ import annotations

import math
from pathlib import Path

import click
import torch

from seal_gguf.cases import TASKS
from seal_gguf.constants import GRANULARITIES, GRANULARITY_HEAD
from seal_gguf.errors import InputError
from seal_gguf.fileio import check_output_path
from seal_gguf.measure.heads import (
    DEFAULT_BATCH_SIZE,
    MODE_ATTRIBUTION,
    MODES,
    HeadsReport,
    head_effects,
    parse_factors,
    plot_heads,
    write_heads_csv,
)
from seal_gguf.measure.plots import check_plot_path
from seal_gguf.model.loading import DEVICES, DTYPES

from .app import PATH, cli, handle_errors, quiet_option


@cli.command()
@click.argument("model_dir", type=PATH)
@click.option("-o", "--output", type=PATH, required=True,
              help="CSV to write: one row per factor, layer and head (and channel, for --granularity channel).")
@click.option("--plot", "plot_out", type=PATH, default=None,
              help="Also draw layers x heads heat maps of the changes (.png, .pdf or .svg).")
@click.option("--mode", type=click.Choice(MODES), default=MODE_ATTRIBUTION, show_default=True,
              help="attribution: one forward and backward pass per case estimates every head's effect (first "
                   "order); exact: every head ablated in turn.")
@click.option("--exact", "exact_top", type=click.IntRange(min=0), default=None, metavar="TOP_K",
              help="After attribution, also ablate exactly the TOP_K heads with the largest estimated effect.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=GRANULARITY_HEAD, show_default=True,
              help="Estimate per head, or per channel of each head (SEAL-C's scales; attribution only).")
@click.option("--task", type=click.Choice(TASKS), default="lines", show_default=True, help="Generated task.")
@click.option("--length", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prompt length of each case, in tokens.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Cases; every head is scored on the same ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated (eval split) cases.")
@click.option("--factors", default="0", show_default=True,
              help="Comma-separated factors each head is scaled by in turn: 0 removes it, e.g. 0,0.9,1.1.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Exact ablations per forward pass (raise it on a GPU; memory grows with it and --length).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto picks cuda, then mps, then cpu.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Dtype of the model.")
@click.option("--no-gradient-checkpointing", is_flag=True,
              help="Keep all activations in the attribution pass: faster, much more memory at long lengths.")
@click.option("--force", is_flag=True, help="Replace an existing CSV or plot.")
@quiet_option
@handle_errors
def heads(model_dir: Path, output: Path, plot_out: Path | None, mode: str, exact_top: int | None, granularity: str,
          task: str, length: int, samples: int, seed: int, factors: str, batch_size: int, device: str, dtype: str,
          no_gradient_checkpointing: bool, force: bool, quiet: bool) -> None:
    """Which heads matter: the change in answer loss (and accuracy) when each head is removed or scaled.

    Answer loss is the mean cross-entropy of the answer tokens; a case is correct when greedy
    decoding gives the answer exactly. Positive delta loss: the model needs the head; negative: the
    head hurts the task. By default one forward and one backward pass per case give the gradient of
    the answer loss with respect to every head's scale at 1.0, and estimated_delta_loss is
    (factor - 1) x gradient: a first-order estimate, with no estimate of accuracy (its columns stay
    empty). --exact K then removes the K heads with the largest estimate exactly; --mode exact
    removes every head (layers x heads x factors forward passes per case). SmolLM2-135M (30 x 9
    heads) on 2 shared CPU cores: attribution takes seconds per case; exact ablation of every head
    about 3 minutes per case at --length 512, up to 14 at 1024.

    \b
    Examples:
      seal-gguf heads smol/ -o heads.csv --plot heads.png --samples 16
      seal-gguf heads smol/ -o heads.csv --exact 20 --length 512
      seal-gguf heads smol/ -o heads.csv --mode exact --factors 0,0.9,1.1 --device cuda --batch-size 64
      seal-gguf heads smol/ -o channels.csv --granularity channel --plot channels.png
      seal-gguf inspect scales.safetensors --plot scales.png    # the learned scales, same layout
    """
    chosen = parse_factors(factors)
    check_output_path(output, force)
    if plot_out is not None:
        if plot_out.resolve() == output.resolve():
            raise InputError(f"{output}: the CSV and the --plot are the same file; give the plot another name")
        check_plot_path(plot_out, force)
    report = head_effects(model_dir, task=task, length=length, samples=samples, seed=seed, factors=chosen,
                          granularity=granularity, mode=mode, exact_top=exact_top, batch_size=batch_size,
                          device=device, dtype=dtype, progress=not quiet,
                          gradient_checkpointing=not no_gradient_checkpointing)
    write_heads_csv(report, output, force=force)
    if plot_out is not None:
        plot_heads(report, plot_out, force=force)
    for line in _summary(report):
        click.echo(line)
    click.echo(f"Wrote {output}")
    if plot_out is not None:
        click.echo(f"Wrote {plot_out}")


def _name(index: tuple[int, ...]) -> str:
    return ".".join(f"{kind}{i}" for kind, i in zip("LHC", index, strict=False))


def _extremes(values: torch.Tensor) -> str:
    """Where `values` (changes in loss, NaN: not measured) rise and fall most."""
    up, down = (tuple(int(i) for i in torch.unravel_index(pick(values.nan_to_num(nan=unmeasured)), values.shape))
                for pick, unmeasured in ((torch.argmax, -math.inf), (torch.argmin, math.inf)))
    rise, fall = values[up].item(), values[down].item()
    low = f"down most {_name(down)} ({fall:+.4f})" if fall < 0 else f"none down, least up {_name(down)} ({fall:+.4f})"
    return f"loss up most {_name(up)} ({rise:+.4f}), {low}"


def _summary(report: HeadsReport) -> list[str]:
    per_case = report.attribution_seconds / report.cases
    shape = " x ".join(f"{n} {what}" for n, what in zip(report.gradient.shape, ("layers", "heads", "channels"),
                                                           strict=False))
    lines = [f"Attribution: {shape} on {report.cases} {report.task} cases of {report.length} tokens in "
             f"{report.attribution_seconds:.1f} s ({per_case:.1f} s per case)",
             f"Baseline: answer loss {report.base_loss:.4f}, accuracy {report.base_accuracy:.3f}"]
    scored = "channels" if report.granularity != GRANULARITY_HEAD else "heads"
    ablated = report.ablated
    for factor in report.factors:
        what = "zeroed" if factor == 0 else f"x{factor:g}"
        estimate = report.estimated_delta_loss(factor)
        lines.append(f"  {what}, estimated: {_extremes(estimate)}; {int((estimate < 0).sum())} of {estimate.numel()} "
                     f"{scored} lower the loss")
        if ablated.any():
            exact = report.grid(factor, "delta_loss")
            changed = int((report.grid(factor, "delta_accuracy")[ablated] != 0).sum())
            same_sign = int((exact[ablated].sign() == estimate[ablated].sign()).sum())
            lines.append(f"  {what}, exact: {_extremes(exact)}; {int((exact < 0).sum())} of {int(ablated.sum())} "
                         f"heads lower the loss, {changed} change the accuracy; the estimate has the exact change's "
                         f"sign for {same_sign} of {int(ablated.sum())}")
    if ablated.any():
        lines.insert(2, f"Exact: {int(ablated.sum())} heads x {len(report.factors)} factor(s) in "
                        f"{report.ablation_seconds:.0f} s ({report.ablation_seconds / report.cases:.1f} s per case)")
    elif report.granularity == GRANULARITY_HEAD:
        lines.append("Accuracy has no first-order estimate (its CSV columns are empty); --exact TOP_K or --mode exact "
                     "measures it for ablated heads.")
    else:
        lines.append("Accuracy has no first-order estimate; exact ablation (--exact, --mode exact) is per head.")
    return lines
