"""Which heads matter: the change in answer loss and accuracy when one attention head is zeroed or scaled.

For every (layer, head) and every factor f (0 = the head removed; 0.9 / 1.1 = SEAL-like nudges) the
head's output is multiplied by f before o_proj, exactly where SEAL's scales act, and the generated
cases are scored again. Metrics per case, both from one teacher-forced forward pass:
  - answer loss: mean cross-entropy of the answer tokens given the prompt (as train.answer_loss);
  - correct: every answer token is the argmax at its position, which is the same as greedy decoding
    reproducing the answer tokens exactly.
A head's effect is the ablated mean minus the baseline mean over the same cases (delta loss > 0 and
delta accuracy < 0: the model needs the head; the reverse: the head hurts this task).

The work is L * H * len(factors) forward passes per case, so two things keep it practical:
  - Prefix reuse. Scaling a head of layer l leaves layers < l untouched, so the hidden state that
    enters layer l is computed once per case (one layer at a time, as the sweep moves down the
    layers) and the ablated passes run only layers l..L-1: the decoder layers before l are bypassed
    and hand over the stored state. That halves the work on average.
  - Batching. All ablations of one layer go through those layers together, one batch row per
    ablation (the case repeated), with a pre-hook on that layer's o_proj that multiplies each row
    by its own per-head factors. On a GPU this is what makes the sweep fast; on a CPU the time per
    row stays about the same.
The output layer runs only on the answer positions (`logits_to_keep`). Results equal one hooked
forward per ablation up to float rounding (tests/test_heads.py checks it).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from seal_gguf.cases import Case, encode_case
from seal_gguf.errors import ArchitectureError, InputError
from seal_gguf.fileio import atomic_file
from seal_gguf.measure.plots import HeadGrid, plot_head_grids
from seal_gguf.model.architectures import ModelLayout
from seal_gguf.model.hooks import o_proj_modules
from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
from seal_gguf.tasks import make_cases

DEFAULT_FACTORS = (0.0,)
DEFAULT_BATCH_SIZE = 8
CSV_COLUMNS = ("layer", "head", "factor", "delta_loss", "delta_accuracy", "loss", "accuracy",
               "base_loss", "base_accuracy", "cases")


@dataclass(frozen=True)
class HeadEffect:
    layer: int
    head: int
    factor: float  # the head's output multiplied by this (0: removed)
    loss: float  # mean answer loss over the cases, with the head scaled
    accuracy: float  # fraction of cases answered exactly, with the head scaled
    delta_loss: float  # loss minus the baseline loss
    delta_accuracy: float  # accuracy minus the baseline accuracy


@dataclass
class HeadsReport:
    task: str
    length: int
    seed: int
    cases: int
    num_layers: int
    num_heads: int
    factors: tuple[float, ...]
    base_loss: float
    base_accuracy: float
    effects: list[HeadEffect]  # ordered by factor, layer, head
    seconds: float  # wall time of the sweep (model loading and case generation excluded)

    def grid(self, factor: float, metric: str = "delta_loss") -> torch.Tensor:
        """[layers, heads] of one HeadEffect field (delta_loss, delta_accuracy, loss, accuracy) for one factor."""
        if factor not in self.factors:
            raise InputError(f"factor {factor:g} was not measured (measured: {format_factors(self.factors)})")
        if metric not in ("delta_loss", "delta_accuracy", "loss", "accuracy"):
            raise InputError(f"unknown metric {metric!r}")
        out = torch.empty(self.num_layers, self.num_heads)
        for e in self.effects:
            if e.factor == factor:
                out[e.layer, e.head] = getattr(e, metric)
        return out


# -- options --

def parse_factors(text: str) -> tuple[float, ...]:
    """Parse "0,0.9,1.1" into (0.0, 0.9, 1.1): distinct finite factors >= 0, none of them 1 (the baseline)."""
    factors: list[float] = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise InputError(f"factors: {item.strip()!r} is not a number (give e.g. 0,0.9,1.1)") from None
        if not math.isfinite(value) or value < 0:
            raise InputError(f"factors: {item.strip()} must be a finite number >= 0")
        if value == 1.0:
            raise InputError("factors: 1 leaves the head unchanged (the baseline is always measured)")
        if value not in factors:
            factors.append(value)
    return tuple(factors)


def format_factors(factors: Sequence[float]) -> str:
    return ",".join(f"{f:g}" for f in factors)


# -- the model, layer by layer --

class _LayerOutput(Exception):
    """Raised by a forward hook to stop the model right after the layer whose output it carries."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def decoder_layers(model: nn.Module, layout: ModelLayout) -> list[nn.Module]:
    """The decoder layer that holds each o_proj: the module path up to the layer index."""
    names = [layout.layer_module(layer) for layer in range(layout.num_layers)]
    try:
        return [model.get_submodule(name) for name in names]
    except AttributeError:
        raise ArchitectureError(f"model has no module {names[0]!r}; is it a {layout.model_type} model?") from None


@contextmanager
def _bypassed(layers: Sequence[nn.Module], state: torch.Tensor | None, rows: int) -> Iterator[None]:
    """Layers 0..len(layers)-1 skipped: each returns `state` (the output of the last of them, batch 1)
    repeated over `rows` batch rows. Nothing is bypassed when state is None."""
    if state is None or not layers:
        yield
        return
    repeated = state.expand(rows, *state.shape[1:]).contiguous()

    def skip(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return repeated

    for layer in layers:
        layer.forward = skip  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _advance(model: nn.Module, layers: Sequence[nn.Module], layer: int, state: torch.Tensor | None,
             ids: torch.Tensor) -> torch.Tensor:
    """The output of `layer` (batch 1), given `state`, the output of layer - 1 (None for layer 0)."""

    def stop(_module: nn.Module, _args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ArchitectureError(f"decoder layers return {type(output).__name__}, not a tensor; "
                                    "this transformers version is not supported by `heads`")
        raise _LayerOutput(output)

    handle = layers[layer].register_forward_hook(stop)
    try:
        with _bypassed(layers[:layer], state, 1):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _LayerOutput as done:
        return done.output
    finally:
        handle.remove()
    raise ArchitectureError(f"decoder layer {layer} did not run in the model's forward pass")


@contextmanager
def _row_factors(o_proj: nn.Module, factors: torch.Tensor, head_dim: int) -> Iterator[None]:
    """Batch row b of o_proj's input scaled by factors[b] ([rows, heads], each over its head's channels)."""
    columns = factors.repeat_interleave(head_dim, dim=1)[:, None, :]

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] * columns.to(args[0].dtype), *args[1:])

    handle = o_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _scores(model: nn.Module, ids: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, correct) per batch row: mean answer cross-entropy, and every answer token the argmax."""
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer.numel()).logits.float()
    target = answer.expand(ids.shape[0], -1)
    loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=1)
    return loss, (logits.argmax(dim=-1) == target).all(dim=1)


@torch.no_grad()
def score_head_factors(
    model: nn.Module,
    layout: ModelLayout,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    rows: dict[int, torch.Tensor],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[tuple[float, bool], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """One case: the baseline (loss, correct), and for each layer in `rows` ([R, heads] factors, each
    row one variant of that layer's heads, the other layers untouched) the loss and correct of every
    row ([R] each). on_batch(n) is called after each batch of n rows."""
    device = next(model.parameters()).device
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, not {batch_size}")
    for layer, factors in rows.items():
        if (not 0 <= layer < layout.num_layers or factors.dim() != 2 or factors.shape[1] != layout.num_heads
                or not len(factors)):
            raise InputError(f"rows of layer {layer}: expected a layer in 0..{layout.num_layers - 1} and "
                             f"factors of shape [rows >= 1, {layout.num_heads}], found {tuple(factors.shape)}")
    layers, o_projs = decoder_layers(model, layout), o_proj_modules(model, layout)
    ids = torch.tensor([[*prompt_ids, *answer_ids[:-1]]], device=device)
    answer = torch.tensor([list(answer_ids)], device=device)
    base_loss, base_correct = _scores(model, ids, answer)
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    state: torch.Tensor | None = None  # the output of layer - 1: what enters `layer`
    for layer in range(max(rows, default=-1) + 1):
        if layer in rows:
            factors = rows[layer].to(device, torch.float32)
            losses, corrects = [], []
            # near-equal chunks: 9 rows in batches of at most 8 run as 5 + 4, not 8 + 1
            for chunk in factors.tensor_split(math.ceil(len(factors) / batch_size)):
                with _bypassed(layers[:layer], state, len(chunk)), _row_factors(o_projs[layer], chunk,
                                                                                  layout.head_dim):
                    loss, correct = _scores(model, ids.expand(len(chunk), -1), answer)
                losses.append(loss.cpu())
                corrects.append(correct.cpu())
                if on_batch is not None:
                    on_batch(len(chunk))
            results[layer] = (torch.cat(losses), torch.cat(corrects))
        if any(later > layer for later in rows):
            state = _advance(model, layers, layer, state, ids)
    return (float(base_loss[0]), bool(base_correct[0])), results


def single_head_rows(layout: ModelLayout, factors: Sequence[float]) -> torch.Tensor:
    """[len(factors) * heads, heads]: row f * heads + h scales head h by factors[f], the others by 1."""
    eye = torch.eye(layout.num_heads, dtype=torch.bool)
    return torch.cat([torch.where(eye, torch.tensor(f), torch.tensor(1.0)) for f in factors])


# -- the whole sweep --

def sweep_heads(
    model: nn.Module,
    layout: ModelLayout,
    tokenizer: Any,
    cases: Sequence[Case],
    factors: Sequence[float] = DEFAULT_FACTORS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> HeadsReport:
    """Every head of every layer scaled by each factor, on every case."""
    if not cases:
        raise InputError("no cases to score")
    factors = tuple(float(f) for f in factors)
    if not factors:
        raise InputError("give at least one factor")
    heads = layout.num_heads
    rows = single_head_rows(layout, factors)
    all_layers = {layer: rows for layer in range(layout.num_layers)}
    losses = torch.empty(len(cases), layout.num_layers, len(rows))
    corrects = torch.empty(len(cases), layout.num_layers, len(rows), dtype=torch.bool)
    base = torch.empty(len(cases))
    base_correct = torch.empty(len(cases), dtype=torch.bool)
    total = len(cases) * layout.num_layers * len(rows)
    start = time.perf_counter()
    with tqdm(total=total, desc="heads", unit="ablation", disable=not progress) as bar:
        for i, case in enumerate(cases):
            prompt_ids, answer_ids = encode_case(tokenizer, case)
            bar.set_postfix(case=f"{i + 1}/{len(cases)}")
            (base[i], base_correct[i]), per_layer = score_head_factors(
                model, layout, prompt_ids, answer_ids, all_layers, batch_size, bar.update)
            for layer, (loss, correct) in per_layer.items():
                losses[i, layer], corrects[i, layer] = loss, correct
    seconds = time.perf_counter() - start
    base_loss, base_accuracy = base.mean().item(), base_correct.float().mean().item()
    mean_loss, accuracy = losses.mean(dim=0), corrects.float().mean(dim=0)  # [layers, rows]
    effects = [
        HeadEffect(layer, head, factor, mean_loss[layer, f * heads + head].item(),
                   accuracy[layer, f * heads + head].item(),
                   mean_loss[layer, f * heads + head].item() - base_loss,
                   accuracy[layer, f * heads + head].item() - base_accuracy)
        for f, factor in enumerate(factors) for layer in range(layout.num_layers) for head in range(heads)
    ]
    return HeadsReport(cases[0].task, max(c.length for c in cases), cases[0].seed, len(cases),
                       layout.num_layers, heads, factors, base_loss, base_accuracy, effects, seconds)


def head_effects(
    model_dir: Path,
    task: str = "lines",
    length: int = 1024,
    samples: int = 8,
    seed: int = 0,
    factors: Sequence[float] = DEFAULT_FACTORS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
) -> HeadsReport:
    """The sweep on an HF model folder, over `samples` generated "eval" cases of `task` and `length`."""
    model_dir = Path(model_dir)
    if samples < 1:
        raise InputError(f"samples must be >= 1, not {samples}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, not {batch_size}")
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    cases = make_cases(tokenizer, task, length, samples, seed, split="eval")
    model, layout = load_model(model_dir, torch_device, dtype, progress)
    return sweep_heads(model, layout, tokenizer, cases, factors, batch_size, progress)


# -- output --

def write_heads_csv(report: HeadsReport, path: Path, force: bool = False) -> None:
    """One row per (factor, layer, head), with the baseline repeated on every row so that any CSV
    reader gets it without special cases; written atomically."""
    with atomic_file(Path(path), force=force) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for e in report.effects:
                writer.writerow([e.layer, e.head, f"{e.factor:g}", f"{e.delta_loss:.8g}", f"{e.delta_accuracy:.8g}",
                                 f"{e.loss:.8g}", f"{e.accuracy:.8g}", f"{report.base_loss:.8g}",
                                 f"{report.base_accuracy:.8g}", report.cases])


def plot_heads(report: HeadsReport, path: Path, force: bool = False) -> None:
    """Layers x heads heat maps of delta loss and delta accuracy, one pair per factor; red marks the
    heads the model needs (removing them raises the loss, lowers the accuracy), the same colours as
    `seal-gguf inspect SCALES --plot` gives amplified heads."""
    grids = []
    for factor in report.factors:
        what = "zeroed" if factor == 0 else f"scaled by {factor:g}"
        grids.append(HeadGrid(f"delta answer loss, head {what}", report.grid(factor, "delta_loss"), 0.0,
                              "loss minus baseline"))
        grids.append(HeadGrid(f"delta accuracy, head {what}", report.grid(factor, "delta_accuracy"), 0.0,
                              "accuracy minus baseline", cmap="RdBu"))
    title = (f"{report.task}, {report.length} tokens, {report.cases} cases: baseline loss {report.base_loss:.3f}, "
             f"accuracy {report.base_accuracy:.2f}")
    plot_head_grids(grids, path, title, columns=2, force=force)
