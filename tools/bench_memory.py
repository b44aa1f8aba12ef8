"""Benchmark the peak memory of folding and conversion on generated Llama-shaped checkpoints, up to
Llama-2-7B's shape: does it stay near the size of one tensor, or grow with the checkpoint?

Each checkpoint is random bfloat16 in safetensors shards of about --shard-gib (SmolLM2's tokenizer
and vocabulary, untied embeddings) with random SEAL-C scales. Every command runs once, as a fresh
`python -m seal_gguf` process; its wall time and the peak RSS of its process tree (llama.cpp's
converter included) are recorded, and each output is deleted as soon as it is measured:
fold (HF -> HF), convert and fold-and-convert at f16 and q8_0, and fold-gguf of the q8_0 GGUF.
Before each step the free disk space must cover the output plus --min-free-gib.

\b
Usage:
  python tools/bench_memory.py --work /tmp/big                      # llama-7b: ~13 GiB + one output
  python tools/bench_memory.py --shapes llama-1b --output /tmp/b.md # quick check of the script
  python tools/bench_memory.py --checkpoint /tmp/big/llama-7b      # generate once, keep, reuse
"""

from __future__ import annotations

import datetime
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from benchlib import (
    BENCHMARKS,
    BF16_BYTES,
    LLAMA_SHAPES,
    ProcessRun,
    append_section,
    checkpoint_mib,
    llama_config,
    llama_tensor_shapes,
    machine,
    random_scales,
    run_process,
    smollm2_folder,
    write_random_llama,
)

SAMPLE_SECONDS = 0.1

# q8_0 stores 32 weights in 34 bytes: the GGUF is ~17/32 of the bfloat16 checkpoint
Q8_0_FRACTION = 34 / 32 / BF16_BYTES


@dataclass(frozen=True)
class Step:
    label: str  # the command as the table shows it
    args: tuple[str, ...]  # seal-gguf's arguments
    output: Path
    size_fraction: float  # expected output size / checkpoint size, for the disk check
    keep: bool = False  # read by a later step; removed after it


class TreeSampler(threading.Thread):
    """The largest summed resident set of this process's descendants, sampled from /proc (Linux).

    wait4's ru_maxrss (run_process's peak) is the peak of the largest single process; a command
    whose converter subprocess runs beside it holds both at once, which only sampling sees.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rss_kib = self.anon_kib = 0
        self._done = threading.Event()

    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            rss = anon = 0
            for pid in descendants(os.getpid()):
                fields = proc_status(pid)
                rss += fields.get("VmRSS", 0)
                anon += fields.get("RssAnon", 0)
            self.rss_kib, self.anon_kib = max(self.rss_kib, rss), max(self.anon_kib, anon)


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command is after the last ")", then state, then the parent's pid
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (empty if the process has ended)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in lines)
            if value.strip().endswith("kB")}


@dataclass(frozen=True)
class Run:
    process: ProcessRun  # wall time, and the largest single process's peak RSS
    tree_rss_mib: float  # all processes together, sampled
    tree_anon_mib: float  # their anonymous memory (not file pages mapped in)
    output_mib: float


def steps(model: Path, scales: Path, work: Path) -> list[Step]:
    base_q8 = work / "base-q8_0.gguf"
    out = {name: work / name for name in ("folded", "base-f16.gguf", "seal-f16.gguf", "seal-q8_0.gguf",
                                          "folded-q8_0.gguf")}
    return [
        Step("fold MODEL SCALES -o FOLDED/", ("fold", str(model), str(scales), "-o", str(out["folded"])),
             out["folded"], 1.0),
        Step("convert MODEL --outtype f16", ("convert", str(model), "-o", str(out["base-f16.gguf"]),
                                             "--outtype", "f16"), out["base-f16.gguf"], 1.0),
        Step("fold-and-convert MODEL SCALES --outtype f16",
             ("fold-and-convert", str(model), str(scales), "-o", str(out["seal-f16.gguf"]), "--outtype", "f16"),
             out["seal-f16.gguf"], 1.0),
        Step("convert MODEL --outtype q8_0", ("convert", str(model), "-o", str(base_q8), "--outtype", "q8_0"),
             base_q8, Q8_0_FRACTION, keep=True),
        Step("fold-and-convert MODEL SCALES --outtype q8_0",
             ("fold-and-convert", str(model), str(scales), "-o", str(out["seal-q8_0.gguf"]), "--outtype", "q8_0"),
             out["seal-q8_0.gguf"], Q8_0_FRACTION),
        Step("fold-gguf base-q8_0.gguf SCALES", ("fold-gguf", str(base_q8), str(scales), "-o",
                                                 str(out["folded-q8_0.gguf"])),
             out["folded-q8_0.gguf"], Q8_0_FRACTION),
    ]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def path_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def require_room(where: Path, needed: float, min_free: int, what: str) -> None:
    free = shutil.disk_usage(where).free
    if free - needed < min_free:
        raise click.ClickException(f"{what} needs ~{needed / 2**30:.1f} GiB on {where}, which has "
                                   f"{free / 2**30:.1f} GiB free; {min_free / 2**30:.0f} GiB must stay free")


def checkpoint_bytes(shape: str) -> int:
    return sum(math.prod(s) for s in llama_tensor_shapes(llama_config(shape)).values()) * BF16_BYTES


def largest_tensor_mib(shape: str) -> float:
    return max(math.prod(s) for s in llama_tensor_shapes(llama_config(shape)).values()) * BF16_BYTES / 2**20


def measure(model: Path, work: Path, min_free: int) -> list[tuple[Step, Run]]:
    """Run every step once, deleting each output once it is measured."""
    scales = random_scales(model, work / f"{model.name}-scales.safetensors")
    size = checkpoint_mib(model) * 2**20
    kept: list[Path] = []
    rows = []
    try:
        for step in tqdm(steps(model, scales, work), desc=model.name, unit="command"):
            require_room(work, step.size_fraction * size, min_free, step.label)
            try:
                with TreeSampler() as sampler:
                    process = run_process([sys.executable, "-m", "seal_gguf", *step.args, "--quiet"])
                run = Run(process, sampler.rss_kib / 1024, sampler.anon_kib / 1024, path_bytes(step.output) / 2**20)
                rows.append((step, run))
            finally:
                if step.keep and step.output.exists():
                    kept.append(step.output)
                else:
                    remove(step.output)
            tqdm.write(f"{model.name}: {step.label}: {process.seconds:.0f} s, peak RSS {process.peak_rss_mib:.0f} MiB "
                       f"(all processes {run.tree_rss_mib:.0f} MiB, anonymous {run.tree_anon_mib:.0f} MiB)")
    finally:
        for path in kept:
            remove(path)
    return rows


@dataclass(frozen=True)
class Measured:
    shape: str
    size_mib: float  # the safetensors files
    shards: int
    rows: list[tuple[Step, Run]]


def table(results: list[Measured], command: str) -> str:
    lines = [
        "",
        f"## Peak memory of fold and conversion on generated checkpoints up to 7B ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        "- checkpoints: random bfloat16 Llama weights (SmolLM2's vocabulary of 49152, untied embeddings) in "
        "safetensors shards, random SEAL-C scales",
        "- one run of each command, a fresh `python -m seal_gguf ... --quiet` process; wall times are indicative "
        "(2 cores shared with other jobs)",
        "- peak RSS: the largest resident set of any one process of the command (wait4: seal-gguf, or llama.cpp's "
        f"converter that it runs); all processes: their resident sets summed, sampled every {SAMPLE_SECONDS:g} s "
        "(what the machine must hold), and of that the anonymous memory (the rest is file pages mapped in, "
        "which the kernel can drop); the page cache is not RSS",
        "",
        "| checkpoint | size MiB | largest tensor MiB | command | output MiB | wall s | peak RSS MiB "
        "| all processes MiB | anonymous MiB | all / checkpoint |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        config = LLAMA_SHAPES[result.shape]
        name = (f"{result.shape} ({checkpoint_bytes(result.shape) / BF16_BYTES / 1e9:.2f}B parameters, "
                f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
                f"{result.shards} shard{'s' if result.shards > 1 else ''})")
        for step, run in result.rows:
            lines.append(f"| {name} | {result.size_mib:.0f} | {largest_tensor_mib(result.shape):.0f} | "
                         f"`{step.label}` | {run.output_mib:.0f} | {run.process.seconds:.0f} | "
                         f"{run.process.peak_rss_mib:.0f} | {run.tree_rss_mib:.0f} | {run.tree_anon_mib:.0f} | "
                         f"{run.tree_rss_mib / result.size_mib:.3f} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--shapes", default="llama-7b", show_default=True,
              help=f"Comma-separated checkpoint shapes: {', '.join(LLAMA_SHAPES)}.")
@click.option("--shard-gib", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Largest safetensors shard of a generated checkpoint, GiB.")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Scratch folder, removed at the end (llama-7b: ~13 GiB checkpoint + ~13 GiB output) "
                   "[default: a temporary folder].")
@click.option("--checkpoint", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the (single) generated checkpoint here, or reuse the one already there.")
@click.option("--min-free-gib", type=click.FloatRange(min=0), default=6.0, show_default=True,
              help="Free disk space that must remain after each output is written.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True,
              help="Markdown file the table is appended to.")
def main(shapes: str, shard_gib: float, work: Path | None, checkpoint: Path | None, min_free_gib: float,
         output: Path) -> None:
    chosen = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = set(chosen) - set(LLAMA_SHAPES)
    if unknown or not chosen:
        raise click.BadParameter(f"unknown shape(s) {', '.join(sorted(unknown))}", param_hint="--shapes")
    if checkpoint is not None and len(chosen) != 1:
        raise click.BadParameter("--checkpoint keeps one checkpoint: pass one shape", param_hint="--checkpoint")
    min_free = int(min_free_gib * 2**30)
    command = shlex.join(["python", "tools/bench_memory.py", *sys.argv[1:]])
    results = []
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        scratch_dir = Path(scratch)
        for shape in chosen:
            model = checkpoint or scratch_dir / shape
            if not model.exists():
                require_room(model.parent, checkpoint_bytes(shape), min_free, f"the {shape} checkpoint")
                tokenizer = scratch_dir / "smollm2"
                if not tokenizer.exists():
                    smollm2_folder(scratch_dir)
                start = time.perf_counter()
                write_random_llama(model, llama_config(shape), tokenizer, int(shard_gib * 2**30))
                tqdm.write(f"{shape}: written in {time.perf_counter() - start:.0f} s")
            shards = len(list(model.glob("*.safetensors")))
            size = checkpoint_mib(model)
            results.append(Measured(shape, size, shards, measure(model, scratch_dir, min_free)))
            if checkpoint is None:
                remove(model)
    append_section(table(results, command), output)


if __name__ == "__main__":
    main()
