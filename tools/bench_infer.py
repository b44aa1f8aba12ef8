"""Benchmark inference parity: a SEAL GGUF runs exactly as fast as its base GGUF, because folding
changes weight values, not the graph. Prompt processing and generation tokens/s through
llama-cpp-python for base and SEAL-C at f16, q8_0 and q4_k_m, plus a byte-for-byte copy of the base
file as an A/A control whose ratio to the base is the noise floor. All three stay loaded and take
turns (base, SEAL, copy, then SEAL, copy, base, ...: the order rotates every round); the table
(medians, min–max) is appended to BENCHMARKS.md.

\b
Usage:
  python tools/bench_infer.py                       # builds the six GGUFs from the bundled scales
  python tools/bench_infer.py --ggufs seal-demo/    # reuse `seal-gguf demo`'s base-*/seal-c-* files
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import click
from tqdm import tqdm

from benchlib import BENCHMARKS, append_section, gguf_speed, machine, open_gguf, smollm2_folder, spread

TYPES = ("f16", "q8_0", "q4_k_m")
VARIANTS = ("base", "seal", "copy")


def build_ggufs(folder: Path, work: Path) -> None:
    from seal_gguf.bundled import bundled_scales
    from seal_gguf.convert.to_gguf import convert_to_gguf

    model = smollm2_folder(work)
    for outtype in tqdm(TYPES, desc="building GGUFs", unit="type"):
        convert_to_gguf(model, folder / f"base-{outtype}.gguf", outtype, progress=False)
        convert_to_gguf(model, folder / f"seal-c-{outtype}.gguf", outtype, bundled_scales("channel"), progress=False)


def measure_type(folder: Path, outtype: str, work: Path, prompt_len: int, generate: int, repeats: int,
                 threads: int) -> dict[str, list]:
    from seal_gguf.model.loading import load_tokenizer

    base = folder / f"base-{outtype}.gguf"
    copy = work / f"base-copy-{outtype}.gguf"
    shutil.copyfile(base, copy)
    paths = {"base": base, "seal": folder / f"seal-c-{outtype}.gguf", "copy": copy}
    tokenizer = load_tokenizer(base)
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * (prompt_len // 8))
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_len]
    models = {name: open_gguf(path, prompt_len + generate + 8, threads) for name, path in paths.items()}
    try:
        for llm in models.values():  # warm-up
            gguf_speed(llm, prompt, 4)
        runs: dict[str, list] = {name: [] for name in VARIANTS}
        for round_ in tqdm(range(repeats), desc=outtype, unit="round"):
            # the order rotates every round, so that no variant always runs right after another
            for name in VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]:
                runs[name].append(gguf_speed(models[name], prompt, generate))
    finally:
        for llm in models.values():
            llm.close()
        copy.unlink()
    return runs


def ratios(runs: dict[str, list], versus: str, field: str) -> str:
    pairs = [getattr(a, field) / getattr(b, field) for a, b in zip(runs[versus], runs["base"], strict=True)]
    return f"{statistics.median(pairs):.3f} ({min(pairs):.3f}–{max(pairs):.3f})"


def table(results: dict[str, dict[str, list]], args: dict, command: str) -> str:
    lines = [
        "",
        f"## Inference parity: SEAL GGUF vs base GGUF in llama.cpp ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}; llama-cpp-python, {args['threads']} threads, flash attention as in `seal-gguf eval`",
        f"- SmolLM2-135M-Instruct, SEAL-C (bundled scales); prompt {args['prompt']} tokens in one batch, then "
        f"{args['generate']} single-token steps; {args['repeats']} rounds of base / SEAL / copy of base, "
        "the order rotating every round",
        "- ratio = SEAL ÷ base (or copy ÷ base) within a round: median (min–max); the copy is the noise floor",
        "",
        "| type | prompt tok/s base | prompt tok/s SEAL | SEAL/base | copy/base | gen tok/s base | gen tok/s SEAL "
        "| SEAL/base | copy/base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for outtype, runs in results.items():
        pp = {k: spread([r.prompt_tps for r in v]) for k, v in runs.items()}
        tg = {k: spread([r.generate_tps for r in v]) for k, v in runs.items()}
        lines.append(
            f"| {outtype} | {pp['base']} | {pp['seal']} | {ratios(runs, 'seal', 'prompt_tps')} | "
            f"{ratios(runs, 'copy', 'prompt_tps')} | {tg['base']} | {tg['seal']} | "
            f"{ratios(runs, 'seal', 'generate_tps')} | {ratios(runs, 'copy', 'generate_tps')} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--ggufs", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Folder with base-TYPE.gguf and seal-c-TYPE.gguf [default: build them].")
@click.option("--types", default=",".join(TYPES), show_default=True, help="Comma-separated types.")
@click.option("--prompt", "prompt_len", type=click.IntRange(min=16), default=512, show_default=True,
              help="Prompt tokens.")
@click.option("--generate", type=click.IntRange(min=1), default=64, show_default=True, help="Generated tokens.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Rounds.")
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True)
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True,
              help="Markdown file the table is appended to.")
def main(ggufs: Path | None, types: str, prompt_len: int, generate: int, repeats: int, threads: int,
         output: Path) -> None:
    command = shlex.join(["python", "tools/bench_infer.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folder = ggufs
        if folder is None:
            folder = work / "ggufs"
            folder.mkdir()
            build_ggufs(folder, work)
        results = {t.strip(): measure_type(folder, t.strip(), work, prompt_len, generate, repeats, threads)
                   for t in types.split(",") if t.strip()}
    text = table(results, {"threads": threads, "prompt": prompt_len, "generate": generate, "repeats": repeats},
                 command)
    append_section(text, output)


if __name__ == "__main__":
    main()
