"""Benchmark what folding buys over applying SEAL at run time: the same prompt through the PyTorch
model with scale hooks (float32, transformers, KV cache) and through the folded GGUF in llama.cpp
(f16, q8_0, q4_k_m). Prompt processing and generation tokens/s and peak RSS, each run in a fresh
process (so its peak memory is its own), alternated across variants; medians (min–max) appended
to BENCHMARKS.md.

\b
Usage:
  python tools/bench_runtime.py                       # imports SmolLM2, folds the bundled SEAL-C scales
  python tools/bench_runtime.py --repeats 3 --prompt 2048 --output /tmp/b.md
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click
from tqdm import tqdm

from benchlib import (
    BENCHMARKS,
    alternate,
    append_section,
    gguf_speed,
    machine,
    open_gguf,
    run_process,
    smollm2_folder,
    spread,
)

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
TEXT = "The quick brown fox jumps over the lazy dog near the river bank. "


def prompt_ids(tokenize, length: int) -> list[int]:
    return list(tokenize(TEXT * (length // 8)))[:length]


def pytorch_speed(model_dir: Path, scales: Path, length: int, generate: int, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from seal_gguf.model.architectures import model_layout
    from seal_gguf.model.hooks import attach_scales
    from seal_gguf.model.loading import load_tokenizer
    from seal_gguf.scales import load_scales

    torch.set_num_threads(threads)
    layout = model_layout(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    attach_scales(model, layout, load_scales(scales, layout).values)
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor([prompt_ids(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], length)])
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prompt_seconds = time.perf_counter() - start
        cache, token = out.past_key_values, ids[:, -1:]
        start = time.perf_counter()
        for _ in range(generate):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
        generate_seconds = time.perf_counter() - start
    return {"prompt_tps": length / prompt_seconds, "generate_tps": generate / generate_seconds}


def llama_speed(gguf: Path, length: int, generate: int, threads: int) -> dict[str, float]:
    # llama.cpp's own tokenizer: this process never imports torch, so its peak RSS is llama.cpp's
    llm = open_gguf(gguf, length + generate + 8, threads)
    prompt = prompt_ids(lambda text: llm.tokenize(text.encode(), add_bos=False, special=False), length)
    gguf_speed(llm, prompt[:8], 1)  # warm-up
    speed = gguf_speed(llm, prompt, generate)
    llm.close()
    return {"prompt_tps": speed.prompt_tps, "generate_tps": speed.generate_tps}


def table(results: dict[str, list[dict]], args: dict, command: str) -> str:
    lines = [
        "",
        f"## Folded GGUF in llama.cpp vs hooks in PyTorch ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}; {args['threads']} threads everywhere",
        f"- SmolLM2-135M-Instruct with the bundled SEAL-C scales; prompt {args['prompt']} tokens, then "
        f"{args['generate']} single-token steps with the KV cache; {args['repeats']} fresh processes per variant, "
        "alternated; median (min–max)",
        "",
        "| runtime | prompt tok/s | generation tok/s | peak RSS MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in results.items():
        lines.append(f"| {name} | {spread([r['prompt_tps'] for r in runs])} | "
                     f"{spread([r['generate_tps'] for r in runs])} | {spread([r['peak_rss_mib'] for r in runs]).format('.0f')} |")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--prompt", "prompt_len", type=click.IntRange(min=16), default=512, show_default=True)
@click.option("--generate", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True)
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=BENCHMARKS, show_default=True,
              help="Markdown file the table is appended to.")
@click.option("--worker", hidden=True, default=None)
def main(prompt_len: int, generate: int, repeats: int, threads: int, output: Path, worker: str | None) -> None:
    if worker is not None:  # one measurement, in its own process
        spec = json.loads(worker)
        if spec["gguf"]:
            result = llama_speed(Path(spec["gguf"]), prompt_len, generate, threads)
        else:
            result = pytorch_speed(Path(spec["model"]), Path(spec["scales"]), prompt_len, generate, threads)
        print(json.dumps(result))
        return

    from seal_gguf.bundled import bundled_scales
    from seal_gguf.convert.to_gguf import convert_to_gguf

    command = shlex.join(["python", "tools/bench_runtime.py", *sys.argv[1:]])
    scales = bundled_scales("channel")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = smollm2_folder(work)
        specs = {"PyTorch float32 + hooks": {"gguf": None, "model": str(model), "scales": str(scales)}}
        for outtype in tqdm(GGUF_TYPES, desc="folding", unit="GGUF"):
            path = convert_to_gguf(model, work / f"seal-c-{outtype}.gguf", outtype, scales, progress=False)
            specs[f"llama.cpp, folded {outtype} GGUF"] = {"gguf": str(path)}

        def variant(spec: dict):
            def run():
                cmd = [sys.executable, __file__, "--prompt", str(prompt_len), "--generate", str(generate),
                       "--threads", str(threads), "--worker", json.dumps(spec)]
                measured = run_process(cmd)  # peak RSS from wait4: the whole worker process
                return {**json.loads(measured.stdout.strip().splitlines()[-1]), "peak_rss_mib": measured.peak_rss_mib}
            return run

        with tqdm(total=repeats * len(specs), desc="runs", unit="run") as bar:
            results = alternate({name: variant(spec) for name, spec in specs.items()}, repeats,
                                on_run=lambda name, r: bar.update(1))
    text = table(results, {"threads": threads, "prompt": prompt_len, "generate": generate, "repeats": repeats},
                 command)
    append_section(text, output)


if __name__ == "__main__":
    main()
