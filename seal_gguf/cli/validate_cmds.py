"""`seal-gguf validate`: the folded checkpoint and GGUFs against the unfolded model with hooks."""

from __future__ import annotations

from pathlib import Path

import click

from seal_gguf.cases import TASKS
from seal_gguf.fileio import check_output_path
from seal_gguf.measure.general import GENERAL_TOKENS
from seal_gguf.measure.validate import DEFAULT_CTX, raise_for_failures, validate, write_validation_json
from seal_gguf.measure.validate_report import format_report
from seal_gguf.model.rope import rope_for_model

from .app import PATH, cli, echo_warnings, handle_errors, quiet_option, rope_options


@cli.command("validate")
@click.argument("model_dir", type=PATH)
@click.argument("scales", type=PATH)
@click.argument("ggufs", nargs=-1, type=PATH)
@click.option("--base-gguf", "base_ggufs", type=PATH, multiple=True,
              help="A GGUF of the model without scales, compared with the unscaled model, side by side "
                   "(repeatable).")
@click.option("--folded", type=PATH, help="Folded HF checkpoint for Level 1 (default: fold into a temporary folder).")
@click.option("--text", type=PATH, help="UTF-8 text file to evaluate on (default: the built-in text).")
@click.option("--ctx", type=click.IntRange(min=1), default=DEFAULT_CTX, show_default=True,
              help="Largest chunk of the text, in tokens.")
@click.option("--max-kld", type=float,
              help="Mean-KLD limit for GGUF types without a default (below q8_0).")
@click.option("--task", type=click.Choice(TASKS), help="Level 3: retrieval task to score.")
@click.option("--length", type=click.IntRange(min=1), help="Level 3: prompt length in tokens.")
@click.option("--samples", type=click.IntRange(min=1), help="Level 3: number of cases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Level 3: case seed.")
@click.option("--general-text", type=PATH,
              help="UTF-8 text on which SEAL's cost is measured (default: the built-in general text, five genres).")
@click.option("--general-tokens", type=click.IntRange(min=0), default=GENERAL_TOKENS, show_default=True,
              help="Tokens of general text for the cost (SEAL vs base, in PyTorch and per GGUF type); 0: skip.")
@click.option("--allow-token-mismatch", is_flag=True,
              help="Warn instead of failing when llama.cpp tokenizes the text differently (the logits are "
                   "still compared on transformers' ids).")
@rope_options
@click.option("--json", "json_out", type=PATH, help="Write every figure to this JSON file.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@quiet_option
@handle_errors
def validate_cmd(model_dir: Path, scales: Path, ggufs: tuple[Path, ...], base_ggufs: tuple[Path, ...],
                 folded: Path | None, text: Path | None, ctx: int, max_kld: float | None, task: str | None,
                 length: int | None, samples: int | None, seed: int, general_text: Path | None,
                 general_tokens: int, allow_token_mismatch: bool,
                 rope_scaling: str | None, rope_factor: float | None, rope_original_context: int | None,
                 json_out: Path | None, force: bool, quiet: bool) -> None:
    """Check that folded weights and GGUFs compute what the model with hooked scales computes.

    Level 1: the folded HF checkpoint, max |Δlogit| relative to max |logit|, limit 1e-4 or, for a
    float16 / bfloat16 checkpoint, 4x what rounding the model to that type costs (measured).
    Level 2: each GGUF in llama.cpp on the same tokens: KL divergence, top-1 agreement, Δp. Level 3
    (--task): retrieval accuracy. Exits 1 when a limit is exceeded (mean KLD f32 1e-5 and the same
    top-1 wherever the reference leads by more than 1e-3 nats, f16/bf16 1e-3, q8_0 5e-3, others
    --max-kld; a --base-gguf of the same type raises the limit to 3x its own mean KLD).
    It also reports what SEAL costs on general text: the model with its scales against the model
    without (perplexity ratio, KL divergence, same top-1), in PyTorch and for each SEAL GGUF against
    the --base-gguf of its type.
    A GGUF converted with --rope-scaling is validated with the same options: every level then runs
    the extended model, and each GGUF must carry that extension.

    \b
    Examples:
      seal-gguf validate smol/ scales.safetensors smol-seal-f16.gguf smol-seal-q8_0.gguf
      seal-gguf validate smol/ scales.safetensors smol-seal-q4_k_m.gguf --base-gguf smol-q4_k_m.gguf \\
          --max-kld 0.05 --json report.json
      seal-gguf validate smol/ scales.safetensors smol-seal-q8_0.gguf --task lines --length 1024 --samples 20
      seal-gguf validate smol/ scales-yarn.safetensors smol-16k.gguf --rope-scaling yarn --rope-factor 2 \\
          --text long.txt --ctx 16384
    """
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    if json_out is not None:
        check_output_path(json_out, force, inputs=[model_dir, scales, *ggufs, *base_ggufs, folded, text, general_text])
    report = validate(model_dir, scales, ggufs, base_ggufs, folded=folded, text=text, ctx=ctx, max_kld=max_kld,
                      task=task, length=length, samples=samples, seed=seed,
                      allow_token_mismatch=allow_token_mismatch, progress=not quiet, rope=rope,
                      general_text=general_text, general_tokens=general_tokens)
    echo_warnings(report.warnings)
    click.echo(format_report(report))
    if json_out is not None:
        write_validation_json(json_out, report, force=force)
        click.echo(f"Wrote {json_out}")
    raise_for_failures(report)
