"""Which heads matter: how the answer loss (and accuracy) changes when one attention head is scaled.

A head's output is multiplied by a factor f before o_proj, exactly where SEAL's scales act (0: the
head removed; 0.9 / 1.1: SEAL-like nudges), and the generated cases are scored. Metrics per case,
both from one teacher-forced forward pass:
  - answer loss: mean cross-entropy of the answer tokens given the prompt (as train.answer_loss), in
    nats;
  - correct: every answer token is the argmax at its position, which is the same as greedy decoding
    reproducing the answer tokens exactly.
A head's effect is the scaled mean minus the baseline mean over the same cases (delta loss > 0 and
delta accuracy < 0: the model needs the head; the reverse: the head hurts this task).

Two ways to measure it:
  - Attribution (first order, the default). One forward and one backward pass per case give
    g = d(answer loss)/d(scale) for every head (or every head channel) at once, at scales 1.0 where
    SEAL starts; the estimated delta loss of scaling a head by f is (f - 1) * g, averaged over the
    cases. Accuracy, a step function, has no first-order estimate. The estimate is close for
    SEAL-sized nudges (0.9, 1.1); for removal (f = 0) it extends the slope at 1 all the way to 0,
    which ranks the heads only as well as tools/bench_heads.py finds against exact ablation.
  - Exact ablation, of every head (L * H * len(factors) forward passes per case) or of the K heads
    with the largest |g| (the same heads for every factor). Two things keep it practical:
      - Prefix reuse. Scaling a head of layer l leaves layers < l untouched, so the hidden state that
        enters layer l is computed once per case (one layer at a time, as the sweep moves down the
        layers) and the ablated passes run only layers l..L-1: the decoder layers before l are
        bypassed and hand over the stored state. That halves the work on average.
      - Batching. All ablations of one layer go through those layers together, one batch row per
        ablation (the case repeated), with a pre-hook on that layer's o_proj that multiplies each
        row by its own per-head factors. On a GPU this is what makes the sweep fast; on a CPU the
        time per row stays about the same.
    The output layer runs only on the answer positions (`logits_to_keep`). Results equal one hooked
    forward per ablation up to float rounding (tests/test_heads.py checks it, and the gradient
    against finite differences).
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from seal_gguf.cases import Case, encode_case
from seal_gguf.constants import GRANULARITIES, GRANULARITY_HEAD
from seal_gguf.errors import ArchitectureError, InputError
from seal_gguf.fileio import atomic_file
from seal_gguf.measure.plots import HeadGrid, plot_head_grids
from seal_gguf.model.architectures import ModelLayout, model_layout
from seal_gguf.model.gradient_checkpointing import checkpointed_layers, enable_checkpointing
from seal_gguf.model.hooks import attach_scales, o_proj_modules
from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
from seal_gguf.scales import identity_scales
from seal_gguf.tasks import make_cases

DEFAULT_FACTORS = (0.0,)
DEFAULT_BATCH_SIZE = 8
MODE_ATTRIBUTION, MODE_EXACT = "attribution", "exact"
MODES = (MODE_ATTRIBUTION, MODE_EXACT)
HEAD_CSV_COLUMNS = ("layer", "head", "factor", "estimated_delta_loss", "delta_loss", "delta_accuracy", "loss",
                    "accuracy", "base_loss", "base_accuracy", "cases")
CHANNEL_CSV_COLUMNS = ("layer", "head", "channel", "factor", "estimated_delta_loss", "base_loss", "base_accuracy",
                       "cases")
GRID_METRICS = ("estimated_delta_loss", "delta_loss", "delta_accuracy", "loss", "accuracy")


@dataclass
class HeadsReport:
    """What `heads` measured, as means over the same cases. Losses are in nats (mean cross-entropy
    of an answer token), accuracies are fractions of the cases answered exactly."""

    task: str
    length: int
    seed: int
    cases: int
    granularity: str  # head or channel: what `gradient` is taken with respect to
    factors: tuple[float, ...]
    base_loss: float  # the unchanged model's answer loss
    base_accuracy: float  # the unchanged model's accuracy
    # d(answer loss)/d(scale) at every scale 1.0, nats per unit of scale: [layers, heads] for head
    # granularity, [layers, heads, head_dim] for channel
    gradient: torch.Tensor
    # [factors, layers, heads]: answer loss and accuracy with that one head scaled by the factor,
    # measured by exact ablation; NaN for the heads not ablated
    loss: torch.Tensor
    accuracy: torch.Tensor
    attribution_seconds: float  # wall time of the forward and backward passes
    ablation_seconds: float  # wall time of the exact ablations (0 when there were none)

    @property
    def num_layers(self) -> int:
        return self.gradient.shape[0]

    @property
    def num_heads(self) -> int:
        return self.gradient.shape[1]

    @property
    def ablated(self) -> torch.Tensor:
        """[layers, heads] bool: the heads ablated exactly."""
        return ~self.loss[0].isnan()

    def estimated_delta_loss(self, factor: float) -> torch.Tensor:
        """The first-order change in answer loss (nats) when one scale is set to `factor`, each alone:
        (factor - 1) * gradient, the gradient's shape."""
        return (factor - 1.0) * self.gradient

    def grid(self, factor: float, metric: str = "delta_loss") -> torch.Tensor:
        """[layers, heads] of one metric (GRID_METRICS) for one factor; NaN where a head was not ablated
        (the exact metrics). For channel granularity the estimate is summed over each head's channels,
        which is the estimate for scaling the whole head."""
        if factor not in self.factors:
            raise InputError(f"factor {factor:g} was not measured (measured: {format_factors(self.factors)})")
        if metric not in GRID_METRICS:
            raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(GRID_METRICS)}")
        if metric == "estimated_delta_loss":
            estimate = self.estimated_delta_loss(factor)
            return estimate if self.granularity == GRANULARITY_HEAD else estimate.sum(dim=-1)
        f = self.factors.index(factor)
        if metric == "delta_loss":
            return self.loss[f] - self.base_loss
        if metric == "delta_accuracy":
            return self.accuracy[f] - self.base_accuracy
        return getattr(self, metric)[f]


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


def exact_head_count(layout: ModelLayout, granularity: str, mode: str, exact_top: int | None) -> int:
    """How many heads to ablate exactly, from the command line's choices: mode exact: every head;
    mode attribution: none, or the `exact_top` with the largest estimated effect. Raises InputError
    for a choice that does not fit (checked before any model is loaded)."""
    total = layout.num_layers * layout.num_heads
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == MODE_EXACT and exact_top is not None:
        raise InputError("--exact TOP_K ablates the heads that attribution ranks first, --mode exact every head: "
                         "give one of them")
    if granularity != GRANULARITY_HEAD and (mode == MODE_EXACT or exact_top is not None):
        raise InputError(f"--granularity {granularity} is measured by attribution only; exact ablation "
                         "(--mode exact, --exact) is per head: drop --granularity channel")
    if mode == MODE_EXACT:
        return total
    if exact_top is not None and not 1 <= exact_top <= total:
        raise InputError(f"--exact {exact_top}: give 1 to {total} heads (the model has {layout.num_layers} "
                         f"layers x {layout.num_heads} heads)")
    return exact_top or 0


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


def _teacher_forced(prompt_ids: Sequence[int], answer_ids: Sequence[int],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The input (prompt + answer[:-1]) and the answer tokens it should predict, batch 1."""
    return (torch.tensor([[*prompt_ids, *answer_ids[:-1]]], device=device),
            torch.tensor([list(answer_ids)], device=device))


def _scores(model: nn.Module, ids: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, correct) per batch row: mean answer cross-entropy, and every answer token the argmax."""
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer.numel()).logits
    # at least float32; a float64 model (the finite-difference test) keeps its precision
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
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
    ids, answer = _teacher_forced(prompt_ids, answer_ids, device)
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


def single_head_rows(layout: ModelLayout, factors: Sequence[float], heads: Sequence[int] | None = None) -> torch.Tensor:
    """[len(factors) * len(heads), num_heads]: row f * len(heads) + i scales heads[i] by factors[f], the
    other heads by 1. heads: every head of the layer unless given."""
    heads = range(layout.num_heads) if heads is None else heads
    one_hot = torch.eye(layout.num_heads, dtype=torch.bool)[list(heads)]
    return torch.cat([torch.where(one_hot, torch.tensor(f), torch.tensor(1.0)) for f in factors])


# -- attribution: every head at once, to first order --

def answer_gradient(model: nn.Module, layout: ModelLayout, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                    granularity: str = GRANULARITY_HEAD) -> tuple[float, bool, torch.Tensor]:
    """One case, one forward and one backward pass: the answer loss (nats) and whether the case is
    correct, both of the unchanged model, and d(answer loss)/d(scale) at every scale 1.0 (nats per unit
    of scale; float32, on the CPU): [layers, heads] for head granularity, [layers, heads, head_dim] for
    channel. Setting one scale to f changes the loss by about (f - 1) * its gradient.

    The scales are SEAL's own hooks (attach_scales) on a tensor of ones; only they are differentiated,
    so the model should be frozen, as load_model leaves it (frozen weights keep no gradients)."""
    device = next(model.parameters()).device
    ids, answer = _teacher_forced(prompt_ids, answer_ids, device)
    scales = identity_scales(layout, granularity).to(device).requires_grad_()
    with torch.enable_grad(), attach_scales(model, layout, scales):
        loss, correct = _scores(model, ids, answer)
        (gradient,) = torch.autograd.grad(loss[0], scales)
    return loss.item(), bool(correct[0]), gradient.cpu()


def largest_heads(gradient: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The `count` (layer, head) of a [layers, heads] gradient with the largest |gradient|, largest
    first: the heads with the largest estimated effect, either sign, for every factor."""
    heads = gradient.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in gradient.abs().flatten().topk(count).indices]


# -- exact ablation --

def ablate_heads(
    model: nn.Module,
    layout: ModelLayout,
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    heads: Sequence[tuple[int, int]],
    factors: Sequence[float],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (layer, head) of `heads` scaled by each factor in turn, the others left at 1, on every case
    ((prompt ids, answer ids) pairs): the mean answer loss (nats) and the fraction of cases correct,
    both [factors, layers, heads], NaN for the heads not in `heads`."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(set(heads)):
        by_layer.setdefault(layer, []).append(head)
    rows = {layer: single_head_rows(layout, factors, layer_heads) for layer, layer_heads in by_layer.items()}
    shape = (len(encoded), len(factors), layout.num_layers, layout.num_heads)
    losses, corrects = torch.full(shape, math.nan), torch.full(shape, math.nan)
    total = len(encoded) * sum(len(r) for r in rows.values())
    with tqdm(total=total, desc="exact", unit="ablation", disable=not progress) as bar:
        for i, (prompt_ids, answer_ids) in enumerate(encoded):
            bar.set_postfix(case=f"{i + 1}/{len(encoded)}")
            _, per_layer = score_head_factors(model, layout, prompt_ids, answer_ids, rows, batch_size, bar.update)
            for layer, (loss, correct) in per_layer.items():
                layer_heads = by_layer[layer]
                # row f * len(layer_heads) + j scaled layer_heads[j] by factors[f]
                losses[i, :, layer, layer_heads] = loss.view(len(factors), len(layer_heads))
                corrects[i, :, layer, layer_heads] = correct.float().view(len(factors), len(layer_heads))
    return losses.mean(dim=0), corrects.mean(dim=0)


# -- both, over the cases --

def measure_heads(
    model: nn.Module,
    layout: ModelLayout,
    tokenizer: Any,
    cases: Sequence[Case],
    factors: Sequence[float] = DEFAULT_FACTORS,
    granularity: str = GRANULARITY_HEAD,
    exact_heads: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    gradient_checkpointing: bool = True,
) -> HeadsReport:
    """Attribution on every case (the gradient, its mean over the cases), then the `exact_heads` heads
    with the largest |gradient| ablated exactly by each factor (0: none; layers x heads: every head,
    the full sweep). Exact ablation is per head: exact_heads must be 0 for channel granularity.
    gradient_checkpointing: recompute each layer's activations in the backward pass (the gradients are
    the same; memory as train's), so long cases fit where a forward pass does."""
    if not cases:
        raise InputError("no cases to score")
    factors = tuple(float(f) for f in factors)
    if not factors:
        raise InputError("give at least one factor")
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    total = layout.num_layers * layout.num_heads
    if not 0 <= exact_heads <= total or (exact_heads and granularity != GRANULARITY_HEAD):
        raise InputError(f"heads to ablate exactly: 0 to {total} for head granularity, 0 for channel; "
                         f"not {exact_heads} ({granularity})")
    encoded = [encode_case(tokenizer, case) for case in cases]
    start = time.perf_counter()
    base_losses, base_corrects, gradients = [], [], []
    if gradient_checkpointing:
        enable_checkpointing(model)
    with checkpointed_layers(model) if gradient_checkpointing else nullcontext():
        for prompt_ids, answer_ids in tqdm(encoded, desc="attribution", unit="case", disable=not progress):
            case_loss, case_correct, case_gradient = answer_gradient(model, layout, prompt_ids, answer_ids,
                                                                     granularity)
            base_losses.append(case_loss)
            base_corrects.append(case_correct)
            gradients.append(case_gradient)
    attribution_seconds = time.perf_counter() - start
    mean_gradient = torch.stack(gradients).mean(dim=0)
    start = time.perf_counter()
    if exact_heads:
        loss, accuracy = ablate_heads(model, layout, encoded, largest_heads(mean_gradient, exact_heads), factors,
                                      batch_size, progress)
    else:
        loss = accuracy = torch.full((len(factors), layout.num_layers, layout.num_heads), math.nan)
    ablation_seconds = time.perf_counter() - start if exact_heads else 0.0
    return HeadsReport(cases[0].task, max(c.length for c in cases), cases[0].seed, len(cases), granularity, factors,
                       sum(base_losses) / len(cases), sum(base_corrects) / len(cases), mean_gradient, loss,
                       accuracy, attribution_seconds, ablation_seconds)


def head_effects(
    model_dir: Path,
    task: str = "lines",
    length: int = 1024,
    samples: int = 8,
    seed: int = 0,
    factors: Sequence[float] = DEFAULT_FACTORS,
    granularity: str = GRANULARITY_HEAD,
    mode: str = MODE_ATTRIBUTION,
    exact_top: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
    gradient_checkpointing: bool = True,
) -> HeadsReport:
    """measure_heads on an HF model folder, over `samples` generated "eval" cases of `task` and
    `length`; mode and exact_top as exact_head_count takes them."""
    model_dir = Path(model_dir)
    if samples < 1:
        raise InputError(f"samples must be >= 1, not {samples}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, not {batch_size}")
    exact_heads = exact_head_count(model_layout(model_dir), granularity, mode, exact_top)
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    cases = make_cases(tokenizer, task, length, samples, seed, split="eval")
    model, layout = load_model(model_dir, torch_device, dtype, progress)
    return measure_heads(model, layout, tokenizer, cases, factors, granularity, exact_heads, batch_size, progress,
                         gradient_checkpointing)


# -- output --

def _number(value: float) -> str:
    """A CSV cell: empty for NaN (not measured)."""
    return "" if math.isnan(value) else f"{value:.8g}"


def write_heads_csv(report: HeadsReport, path: Path, force: bool = False) -> None:
    """Head granularity: one row per (factor, layer, head), HEAD_CSV_COLUMNS, the exact columns empty
    for heads not ablated. Channel: one row per (factor, layer, head, channel), CHANNEL_CSV_COLUMNS.
    The baseline is repeated on every row so that any CSV reader gets it without special cases;
    written atomically."""
    base = [_number(report.base_loss), _number(report.base_accuracy), report.cases]
    with atomic_file(Path(path), force=force) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if report.granularity == GRANULARITY_HEAD:
                writer.writerow(HEAD_CSV_COLUMNS)
                for factor in report.factors:
                    grids = [report.grid(factor, metric) for metric in GRID_METRICS]
                    for layer in range(report.num_layers):
                        for head in range(report.num_heads):
                            writer.writerow([layer, head, f"{factor:g}",
                                             *(_number(g[layer, head].item()) for g in grids), *base])
            else:
                writer.writerow(CHANNEL_CSV_COLUMNS)
                for factor in report.factors:
                    estimate = report.estimated_delta_loss(factor)
                    for (layer, head, channel), value in zip(itertools.product(*map(range, estimate.shape)),
                                                             estimate.flatten().tolist(), strict=True):
                        writer.writerow([layer, head, channel, f"{factor:g}", _number(value), *base])


def plot_heads(report: HeadsReport, path: Path, force: bool = False) -> None:
    """Layers x heads heat maps, one row per factor: the estimated delta loss (SEAL-C: summed over
    each head's channels) and, where heads were ablated exactly, delta loss and delta accuracy
    (blank: not ablated). Red marks the heads the model needs (removing them raises the loss, lowers
    the accuracy), the same colours as `seal-gguf inspect SCALES --plot` gives amplified heads."""
    exact = bool(report.ablated.any())
    partial = exact and not bool(report.ablated.all())
    channels = " (sum over its channels)" if report.granularity != GRANULARITY_HEAD else ""
    grids = []
    for factor in report.factors:
        what = "zeroed" if factor == 0 else f"scaled by {factor:g}"
        grids.append(HeadGrid(f"estimated delta loss, head {what}{channels}",
                              report.grid(factor, "estimated_delta_loss"), 0.0, "first-order estimate"))
        if exact:
            blank = ", blank: not ablated" if partial else ""
            grids.append(HeadGrid(f"delta answer loss, head {what}{blank}", report.grid(factor, "delta_loss"), 0.0,
                                  "loss minus baseline"))
            grids.append(HeadGrid(f"delta accuracy, head {what}{blank}", report.grid(factor, "delta_accuracy"), 0.0,
                                  "accuracy minus baseline", cmap="RdBu"))
    title = (f"{report.task}, {report.length} tokens, {report.cases} cases: baseline loss {report.base_loss:.3f}, "
             f"accuracy {report.base_accuracy:.2f}")
    plot_head_grids(grids, path, title, columns=3 if exact else None, force=force)
