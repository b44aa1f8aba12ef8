"""`seal-gguf train`: learn SEAL scales on generated retrieval cases."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..constants import GRANULARITIES, GRANULARITY_HEAD
from ..data import TASKS, load_cases, make_cases, save_cases
from ..fileio import check_output_path
from ..rope import rope_for_model
from ..runners import load_tokenizer
from ..scales import save_scales
from ..train import DEFAULT_LR, DEVICES, DTYPES, train_scales
from .app import PATH, cli, force_option, handle_errors, quiet_option, rope_options


def _accuracy(result: tuple[int, int] | None) -> str:
    return "n/a" if result is None else f"{result[0]}/{result[1]} ({100 * result[0] / result[1]:.0f}%)"


@cli.command()
@click.argument("model_dir", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="Scales file to write (.safetensors).")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=GRANULARITY_HEAD, show_default=True,
              help="head: one scale per head (SEAL-H); channel: one per head channel (SEAL-C).")
@click.option("--task", type=click.Choice(TASKS), default="lines", show_default=True,
              help="Generated training task.")
@click.option("--samples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Training cases (one epoch, batch 1).")
@click.option("--length", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prompt length of each case, in tokens of the model's tokenizer.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"AdamW learning rate, constant [default: {DEFAULT_LR['head']} head, {DEFAULT_LR['channel']} channel].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the training cases; held-out cases use seed + 1.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto picks cuda, then mps, then cpu.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Dtype of the frozen model (the scales always train in float32).")
@click.option("--eval-samples", type=click.IntRange(min=0), default=20, show_default=True,
              help="Held-out cases scored before and after training (0: skip).")
@click.option("--cases", "cases_file", type=PATH, default=None,
              help="Train on these cases (JSONL) instead of generating them; their task and length apply.")
@click.option("--save-cases", "save_cases_file", type=PATH, default=None, help="Also write the training cases as JSONL.")
@click.option("--no-gradient-checkpointing", is_flag=True,
              help="Keep all activations: faster, much more memory at long lengths.")
@rope_options
@force_option
@quiet_option
@handle_errors
def train(model_dir: Path, output: Path, granularity: str, task: str, samples: int, length: int,
          lr: float | None, seed: int, device: str, dtype: str, eval_samples: int, cases_file: Path | None,
          save_cases_file: Path | None, no_gradient_checkpointing: bool, rope_scaling: str | None,
          rope_factor: float | None, rope_original_context: int | None, force: bool, quiet: bool) -> None:
    """Learn SEAL scales for an HF model on generated retrieval cases; the model stays frozen.

    Prints held-out accuracy before and after; the scales file records how it was made.

    \b
    Examples:
      seal-gguf train smol/ -o scales.safetensors
      seal-gguf train smol/ -o scales-c.safetensors --granularity channel --length 2048 --device cuda
      seal-gguf train smol/ -o scales-yarn.safetensors --granularity channel --rope-scaling yarn --rope-factor 2
    """
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    # refuse existing outputs before the long work, not after it
    check_output_path(output, force, inputs=[cases_file])
    if save_cases_file is not None:
        check_output_path(save_cases_file, force, inputs=[cases_file])
    if cases_file is not None:
        cases = load_cases(cases_file)
    else:
        cases = make_cases(load_tokenizer(model_dir), task, length, samples, seed, split="train")
    if save_cases_file is not None:
        save_cases(save_cases_file, cases, force=force)
    result = train_scales(
        model_dir, granularity=granularity, task=task, samples=samples, length=length, lr=lr, seed=seed,
        device=device, dtype=dtype, gradient_checkpointing=not no_gradient_checkpointing,
        eval_samples=eval_samples, progress=not quiet, cases=cases,
        command=shlex.join(["seal-gguf", *sys.argv[1:]]), rope=rope,
    )
    save_scales(output, result.scales, result.layout, granularity, result.provenance, force=force)
    meta = result.provenance
    window = max(1, min(10, len(result.losses) // 2))
    first, last = (sum(part) / len(part) for part in (result.losses[:window], result.losses[-window:]))
    under = f" under {rope} RoPE scaling" if rope else ""
    click.echo(f"Trained {granularity} scales on {meta['samples']} {meta['task']} cases of {meta['length']} tokens"
               f"{under} ({result.seconds_per_case:.1f} s per case); loss {first:.3f} -> {last:.3f} "
               f"(mean of the first / last {window})")
    click.echo(f"Held-out accuracy: before {_accuracy(result.heldout_before)}, "
               f"after {_accuracy(result.heldout_after)}")
    click.echo(f"Wrote {output}")
