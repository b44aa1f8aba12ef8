"""Benchmark several types in one run: `seal-gguf fold-and-convert --outtype A,B,C,D` (one conversion to
the lossless intermediate, each type quantized from it) against four separate `fold-and-convert` runs
of the same types, as whole commands in fresh processes, alternated (set, separate, set, ...).
Reports wall time (the separate runs summed) and peak RSS (the largest single process, converter and
quantizer subprocesses included; for the separate runs the largest of the four), median (min–max),
and appends the table to BENCHMARKS.md.

\b
Usage:
  OMP_NUM_THREADS=1 python tools/bench_outtypes.py --model /tmp/smol --repeats 1 --output /tmp/b.md
  python tools/bench_outtypes.py --types q4_k_m,q5_k_m,q8_0,q6_k --repeats 3
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
    machine,
    model_option,
    random_scales,
    run_process,
    smollm2_folder,
    spread,
)


def bench(model_dir: Path, scales: Path, outtypes: list[str], work: Path,
          repeats: int) -> dict[str, list[list[ProcessRun]]]:
    """Per variant, per repeat: the runs of its commands (one for the set, one per type for separate)."""
    seal = [sys.executable, "-m", "seal_gguf", "fold-and-convert", str(model_dir), str(scales), "--quiet"]
    folder = work / "out"
    folder.mkdir()
    commands = {
        "set": [[*seal, "-o", str(folder), "--outtype", ",".join(outtypes)]],
        "separate": [[*seal, "-o", str(folder / f"{t}.gguf"), "--outtype", t] for t in outtypes],
    }

    def runner(cmds: list[list[str]]):
        def run() -> list[ProcessRun]:
            try:
                return [run_process(cmd) for cmd in cmds]
            finally:
                for path in folder.iterdir():
                    path.unlink()
        return run

    runner(commands["separate"][:1])()  # warm-up: converter provisioned, page cache filled
    with tqdm(total=2 * repeats, desc=f"{model_dir.name} {len(outtypes)} types", unit="run") as bar:
        return alternate({name: runner(cmds) for name, cmds in commands.items()}, repeats,
                         on_run=lambda name, r: bar.update(1))


def table(model: str, size_mib: float, outtypes: list[str], runs: dict[str, list[list[ProcessRun]]],
          repeats: int, command: str) -> str:
    seconds = {name: spread([sum(r.seconds for r in rep) for rep in reps]) for name, reps in runs.items()}
    rss = {name: spread([max(r.peak_rss_mib for r in rep) for rep in reps]) for name, reps in runs.items()}
    return "\n".join([
        "",
        f"## Several types in one run: `--outtype {','.join(outtypes)}` vs one run per type "
        f"({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- model: {model} ({size_mib:.0f} MiB checkpoint), random SEAL-C scales, `fold-and-convert`; "
        f"{repeats} run(s) of each variant, alternated, each command a fresh `python -m seal_gguf` process; "
        "median (min–max); peak RSS is the largest single process (converter and quantizer included)",
        "",
        "| variant | wall s | peak RSS MiB |",
        "|---|---:|---:|",
        f"| one run, {len(outtypes)} types | {seconds['set']} | {rss['set'].format('.0f')} |",
        f"| {len(outtypes)} runs, one type each (summed) | {seconds['separate']} | {rss['separate'].format('.0f')} |",
        f"| ratio | {seconds['set'].median / seconds['separate'].median:.3f} | "
        f"{rss['set'].median / rss['separate'].median:.3f} |",
    ]) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@model_option
@click.option("--types", default="q4_k_m,q5_k_m,q8_0,q6_k", show_default=True, help="Comma-separated output types.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs of each variant.")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Scratch folder [default: a temporary folder].")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True,
              help="Markdown file the table is appended to.")
def main(model: Path | None, types: str, repeats: int, work: Path | None, output: Path) -> None:
    outtypes = [t.strip() for t in types.split(",") if t.strip()]
    command = shlex.join(["python", "tools/bench_outtypes.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        scratch_dir = Path(scratch)
        model_dir = model or smollm2_folder(scratch_dir)
        scales = random_scales(model_dir, scratch_dir / "scales.safetensors")
        runs = bench(model_dir, scales, outtypes, scratch_dir, repeats)
        name = "SmolLM2-135M-Instruct" if model is None else model_dir.name
        append_section(table(name, checkpoint_mib(model_dir), outtypes, runs, repeats, command), output)


if __name__ == "__main__":
    main()
