"""`seal-gguf train`: learn SEAL scales on generated retrieval cases; `seal-gguf plan`: the memory it needs."""

from __future__ import annotations

import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import click

from seal_gguf.cases import TASKS, load_cases, save_cases
from seal_gguf.constants import GRANULARITIES, GRANULARITY_CHANNEL
from seal_gguf.fileio import atomic_file, check_output_path
from seal_gguf.learn.measure_step import measure_step
from seal_gguf.learn.objective import DEFAULT_ANCHOR_WEIGHT, DEFAULT_ANCHOR_WINDOW
from seal_gguf.learn.plan import (
    DISK,
    Placement,
    StepMemory,
    available_memory,
    estimate_step,
    model_shape,
    parse_max_memory,
    place_layers,
)
from seal_gguf.learn.train import DEFAULT_LR, DEFAULT_LR_SCHEDULE, DEFAULT_SAMPLES, LR_SCHEDULES, train_scales
from seal_gguf.measure.general import GENERAL_TOKENS
from seal_gguf.model.loading import DEVICES, DTYPES, load_tokenizer
from seal_gguf.model.rope import rope_for_model
from seal_gguf.scales import save_scales
from seal_gguf.tasks import make_mixture, parse_tasks

from .app import PATH, cli, echo_warnings, force_option, handle_errors, quiet_option, rope_options


def _accuracy(result: tuple[int, int] | None) -> str:
    return "n/a" if result is None else f"{result[0]}/{result[1]} ({100 * result[0] / result[1]:.0f}%)"


@cli.command()
@click.argument("model_dir", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="Scales file to write (.safetensors).")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=GRANULARITY_CHANNEL, show_default=True,
              help="head: one scale per head (SEAL-H); channel: one per head channel (SEAL-C).")
@click.option("--task", default="lines", show_default=True, metavar="TASK[,TASK...]",
              help=f"Generated training task, or several interleaved ({', '.join(TASKS)}).")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Training cases (one epoch, batch 1).")
@click.option("--length", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prompt length of each case, in tokens of the model's tokenizer.")
@click.option("--min-length", type=click.IntRange(min=1), default=None,
              help="Vary the lengths: each case's drawn uniformly from this to --length (seeded).")
@click.option("--anchor-weight", type=click.FloatRange(min=0), default=DEFAULT_ANCHOR_WEIGHT, show_default=True,
              help="λ of the anchor term λ·KL(base ‖ SEAL) on general text, which keeps the model's general "
                   "ability; 0 trains on the answers alone (the paper's recipe).")
@click.option("--anchor-text", type=PATH, default=None,
              help="UTF-8 text file for the anchor term [default: the built-in anchor text].")
@click.option("--anchor-generated", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also anchor on N windows the model writes itself before training: its own sampled replies "
                   "to varied (English) requests in its chat template, seeded by --seed; no data set needed.")
@click.option("--anchor-window", type=click.IntRange(min=2), default=DEFAULT_ANCHOR_WINDOW, show_default=True,
              help="Tokens of anchor text per training step (windows cycled).")
@click.option("--cache-teacher", is_flag=True,
              help="Keep the base model's log-probabilities of each anchor window in RAM (float16) instead of "
                   "recomputing them.")
@click.option("--general-tokens", type=click.IntRange(min=0), default=GENERAL_TOKENS, show_default=True,
              help="Tokens of the built-in measurement text on which the cost is measured after training (0: skip).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"AdamW learning rate [default: {DEFAULT_LR['head']} head, {DEFAULT_LR['channel']} channel].")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=DEFAULT_LR_SCHEDULE, show_default=True,
              help="constant: the paper's; cosine: annealed to 0 over the epoch, so the scales settle.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the training cases; held-out cases use seed + 1.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto picks cuda, then mps, then cpu.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Dtype of the frozen model (the scales always train in float32).")
@click.option("--eval-samples", type=click.IntRange(min=0), default=20, show_default=True,
              help="Held-out cases scored before and after training (0: skip).")
@click.option("--cases", "cases_file", type=PATH, default=None,
              help="Train on these cases (JSONL) instead of generating them; their task and length apply.")
@click.option("--save-cases", "save_cases_file", type=PATH, default=None, help="Also write the training cases as JSONL.")
@click.option("--no-gradient-checkpointing", is_flag=True,
              help="Keep all activations: faster, much more memory at long lengths.")
@click.option("--device-map", default=None, metavar="auto|FILE.json",
              help="Spread the layers over several GPUs, CPU RAM and disk (accelerate's dispatch): auto plans "
                   "the placement as `seal-gguf plan` does; a JSON file gives module -> device. Overrides --device.")
@click.option("--max-memory", default=None, metavar="SPEC",
              help="With --device-map auto: memory each device may use, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
                   "[default: what is free now, less 10%]; layers that fit nowhere go to disk.")
@rope_options
@force_option
@quiet_option
@handle_errors
def train(model_dir: Path, output: Path, granularity: str, task: str, samples: int, length: int,
          min_length: int | None, anchor_weight: float, anchor_text: Path | None, anchor_generated: int,
          anchor_window: int, cache_teacher: bool, general_tokens: int, lr: float | None, lr_schedule: str, seed: int, device: str, dtype: str, eval_samples: int, cases_file: Path | None,
          save_cases_file: Path | None, no_gradient_checkpointing: bool, device_map: str | None,
          max_memory: str | None, rope_scaling: str | None,
          rope_factor: float | None, rope_original_context: int | None, force: bool, quiet: bool) -> None:
    """Learn SEAL scales for an HF model on generated retrieval cases; the model stays frozen.

    By default each step also holds the model close to itself without scales on general text
    (--anchor-weight): the scales buy retrieval without costing the model its general ability.
    Prints held-out accuracy before and after, and what the scales cost on general text that
    training never saw; the scales file records both and how it was made.

    \b
    Examples:
      seal-gguf train smol/ -o seal-c.safetensors    # SEAL-C: one scale per head channel
      seal-gguf train smol/ -o seal-h.safetensors --granularity head --length 2048 --device cuda
      seal-gguf train smol/ -o scales.safetensors --task lines,kv --min-length 512 --anchor-weight 10
      seal-gguf train smol/ -o paper.safetensors --anchor-weight 0
      seal-gguf train my-model/ -o scales.safetensors --anchor-text my-domain.txt --anchor-generated 24
      seal-gguf train smol/ -o scales-yarn.safetensors --rope-scaling yarn --rope-factor 2
      seal-gguf train llama-7b/ -o scales.safetensors --length 32768 --dtype bfloat16 --device cuda
      seal-gguf train llama-70b/ -o scales.safetensors --length 16384 --dtype bfloat16 --device-map auto
    """
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    if anchor_weight == 0 and (anchor_text is not None or anchor_generated or cache_teacher):
        echo_warnings(["--anchor-weight 0 turns the anchor off: --anchor-text, --anchor-generated and --cache-teacher "
                       "have no effect"])
    # refuse existing outputs before the long work, not after it
    check_output_path(output, force, inputs=[cases_file, anchor_text])
    if save_cases_file is not None:
        check_output_path(save_cases_file, force, inputs=[cases_file])
    task = ",".join(parse_tasks(task))
    cases = None
    if cases_file is not None:
        cases = load_cases(cases_file)
    if save_cases_file is not None:
        # the cases train_scales generates (deterministic), written before the long work
        saved = cases if cases is not None else make_mixture(load_tokenizer(model_dir), task, length, samples, seed,
                                                             split="train", min_length=min_length)
        save_cases(save_cases_file, saved, force=force)
    result = train_scales(
        model_dir, granularity=granularity, task=task, samples=samples, length=length, lr=lr, seed=seed,
        device=device, dtype=dtype, gradient_checkpointing=not no_gradient_checkpointing,
        eval_samples=eval_samples, progress=not quiet, cases=cases,
        command=shlex.join(["seal-gguf", *sys.argv[1:]]), rope=rope, device_map=device_map, max_memory=max_memory,
        min_length=min_length, anchor_weight=anchor_weight, anchor_text=anchor_text, anchor_window=anchor_window,
        cache_teacher=cache_teacher, general_tokens=general_tokens, lr_schedule=lr_schedule,
        anchor_generated=anchor_generated,
    )
    save_scales(output, result.scales, result.layout, granularity, result.provenance, force=force)
    meta = result.provenance
    window = max(1, min(10, len(result.losses) // 2))
    first, last = (sum(part) / len(part) for part in (result.losses[:window], result.losses[-window:]))
    under = f" under {rope} RoPE scaling" if rope else ""
    lengths = f"{min_length}-{meta['length']}" if min_length and cases_file is None else meta["length"]
    click.echo(f"Trained {granularity} scales on {meta['samples']} {meta['task']} cases of {lengths} tokens"
               f"{under} ({result.seconds_per_case:.1f} s per case); loss {first:.3f} -> {last:.3f} "
               f"(mean of the first / last {window})")
    if result.anchor_kls:
        kls = result.anchor_kls
        click.echo(f"Anchor: λ = {anchor_weight:g} on {meta.get('anchor_text')} text, {anchor_window}-token windows; "
                   # KL >= 0; a float16 teacher cache can round it a hair below at the identity
                   f"KL(base ‖ SEAL) on them {max(0.0, sum(kls[:window]) / window):.4f} -> "
                   f"{max(0.0, sum(kls[-window:]) / window):.4f}")
    line = f"Held-out accuracy: before {_accuracy(result.heldout_before)}, after {_accuracy(result.heldout_after)}"
    cost = result.general_cost
    if cost is not None:
        line += (f"; general text: PPL ×{cost.ppl_ratio:.3f}, mean KLD {cost.mean_kld:.3g}, "
                 f"same top-1 {100 * cost.same_top:.0f}% ({cost.tokens:,} tokens)")
    click.echo(line)
    if result.device_map:
        click.echo(f"Device map: {_device_counts(result.device_map)}")
    click.echo(f"Wrote {output}")


def _device_counts(device_map: dict[str, str]) -> str:
    """'cuda:0: 20 layers, cuda:1: 12 layers + 3 other modules'-style summary of a device map."""
    layers = Counter(d for m, d in device_map.items() if m.rsplit(".", 1)[-1].isdigit())
    others = Counter(d for m, d in device_map.items() if not m.rsplit(".", 1)[-1].isdigit())
    parts = []
    for device in dict.fromkeys(device_map.values()):
        text = f"{device}: {layers[device]} layers" if layers[device] else f"{device}:"
        if others[device]:
            text += f" + {others[device]} other module{'s' * (others[device] > 1)}"
        parts.append(text)
    return ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _step_lines(step: StepMemory) -> list[str]:
    rows = [("weights", step.weights),
            ("layer inputs kept by checkpointing" if step.checkpointing else "", step.layer_inputs),
            ("one layer's activations (recomputed)" if step.checkpointing else "all layers' activations",
             step.activations),
            ("backward buffers of one layer", step.backward),
            ("answer logits, scales, optimizer", step.extras)]
    lines = [f"  {name:<38} {_size(value):>10}" for name, value in rows if name]
    lines.append(f"  {'total (estimated peak)':<38} {_size(step.total):>10}")
    return lines


@cli.command()
@click.argument("model_dir", type=PATH)
@click.option("--length", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prompt length of the training cases, in tokens.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Dtype of the frozen model.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=GRANULARITY_CHANNEL, show_default=True,
              help="Scales to learn (SEAL-C's are larger, still tiny next to the model).")
@click.option("--no-gradient-checkpointing", is_flag=True, help="Plan for training without checkpointing.")
@click.option("--max-memory", default=None, metavar="SPEC",
              help="Devices and what each may use, e.g. 0=80GiB or 0=40GiB,1=40GiB,cpu=100GiB "
                   "[default: what this machine has free, less 10%].")
@click.option("--write-device-map", type=PATH, default=None,
              help="Also write the planned device map as JSON (for train --device-map FILE).")
@click.option("--measure", is_flag=True,
              help="Then run one real training step at this length on --device and report its peak memory "
                   "(CUDA, or a Linux CPU).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Device of the --measure step.")
@force_option
@handle_errors
def plan(model_dir: Path, length: int, dtype: str, granularity: str, no_gradient_checkpointing: bool,
         max_memory: str | None, write_device_map: Path | None, measure: bool, device: str, force: bool) -> None:
    """Estimate the memory a training step needs, before anything loads, and say what fits where.

    Reads only config.json (the model is built on PyTorch's meta device), so it works for a
    folder holding nothing but the config of a model you have not downloaded yet.

    \b
    Examples:
      seal-gguf plan smol/ --length 4096
      seal-gguf plan llama-7b/ --length 32768 --dtype bfloat16 --max-memory 0=70GiB
      seal-gguf plan llama-70b/ --length 32768 --dtype bfloat16 --max-memory 0=70GiB,1=70GiB,2=70GiB,3=70GiB
      seal-gguf plan smol/ --length 2048 --measure
    """
    if write_device_map is not None:
        check_output_path(write_device_map, force)
    budgets = parse_max_memory(max_memory) if max_memory else None  # a bad spec fails before any output
    shape = model_shape(model_dir)
    checkpointing = not no_gradient_checkpointing
    step = estimate_step(shape, length, dtype, checkpointing, granularity)
    layout = shape.layout
    click.echo(f"{model_dir}: {layout.model_type}, {layout.num_layers} layers x {layout.num_heads} heads, "
               f"{shape.params / 1e9:.2f}B parameters; {dtype}, {length} tokens, gradient checkpointing "
               f"{'on' if checkpointing else 'off'}, {granularity} scales")
    for line in _step_lines(step):
        click.echo(line)
    other = estimate_step(shape, length, dtype, not checkpointing, granularity)
    click.echo(f"  ({'without' if checkpointing else 'with'} checkpointing: {_size(other.total)}; if attention "
               f"fell back to PyTorch's math kernel, add {_size(step.math_attention)})")
    budgets = budgets or available_memory()
    placement = place_layers(shape, step, budgets)
    _print_placement(placement, budgets, max_memory)
    if write_device_map is not None:
        with atomic_file(write_device_map, force=force) as tmp:
            tmp.write_text(json.dumps(placement.device_map, indent=2) + "\n")
        click.echo(f"Wrote {write_device_map}")
    if measure:
        measured = measure_step(model_dir, length, dtype, checkpointing, granularity, device)
        click.echo(f"Measured one step on {measured.device}: {_size(measured.peak_bytes)} "
                   f"(estimate / measured = {step.total / measured.peak_bytes:.2f})")


def _print_placement(placement: Placement, budgets: dict[str, int], max_memory: str | None) -> None:
    single = len(placement.loads) == 1
    for load in placement.loads:
        first, last = (load.layers[0], load.layers[-1]) if load.layers else (None, None)
        layers = "no layers" if first is None else f"layer {first}" if first == last else f"layers {first}-{last}"
        where = "" if load.device == DISK else f" of {_size(budgets[load.device])}"
        peak = f", peak ~{_size(load.peak)}{where}" if load.peak else ""
        click.echo(f"  {load.device:<7} {layers}, weights {_size(load.weights)}{peak}")
    if single:
        click.echo(f"Fits on {placement.loads[0].device}: seal-gguf train ... --device "
                   f"{placement.loads[0].device.split(':')[0]}")
    else:
        offload = " (offloaded layers run on the first device, slowly)" if placement.offloaded else ""
        spec = f" --max-memory {max_memory}" if max_memory else ""
        click.echo(f"Spread over {len(placement.loads)} devices{offload}: "
                   f"seal-gguf train ... --device-map auto{spec}")
