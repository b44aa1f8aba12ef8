"""Learning SEAL scales: the model frozen, only the scales train, on generated retrieval cases.

Recipe (the paper's): scales initialised at 1.0, applied by forward pre-hooks on o_proj
(seal_gguf.model.hooks); AdamW with a constant learning rate (`lr_schedule="constant"`; the default
anneals it to 0 over the epoch, see LR_SCHEDULES) and no weight decay (decay would pull the
scales toward 0, not toward the identity 1.0); one epoch, batch 1; cross-entropy on the answer
tokens only. The output layer runs only on the answer positions (`logits_to_keep`): with large
vocabularies it is most of a step's cost. After each step the scales are clamped to MIN_SCALE so
that they stay positive, as the scales file requires (a scale that small mutes its head anyway).

Beyond the paper (issue 19): by default each step adds the anchor term λ·KL(base ‖ SEAL) on one
window of general text (seal_gguf.learn.objective), so the scales keep the model's general ability;
cases may mix tasks and vary in length (seal_gguf.tasks.make_mixture); and after training the
cost on the built-in measurement text (never trained on) is measured and recorded beside the
held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from seal_gguf import __version__
from seal_gguf.cases import Case, encode_case, score_answer
from seal_gguf.constants import GRANULARITIES, GRANULARITY_CHANNEL, GRANULARITY_HEAD, ScalesMeta
from seal_gguf.errors import InputError, ScalesError
from seal_gguf.learn.anchor import generated_windows, interleave
from seal_gguf.learn.objective import (
    DEFAULT_ANCHOR_WEIGHT,
    DEFAULT_ANCHOR_WINDOW,
    Anchor,
    AnchorTeacher,
    answer_loss,
    kl_base_seal,
    make_anchor,
    window_log_probs,
)
from seal_gguf.learn.plan import (
    CPU,
    DISK,
    available_memory,
    estimate_step,
    model_shape,
    parse_max_memory,
    place_layers,
    read_device_map,
)
from seal_gguf.measure.general import GENERAL_TOKENS
from seal_gguf.model.architectures import ModelLayout, read_config
from seal_gguf.model.checkpoint import check_not_folded, model_fingerprint
from seal_gguf.model.generate import greedy_continuation, stop_token_ids
from seal_gguf.model.gradient_checkpointing import checkpointed_layers, enable_checkpointing
from seal_gguf.model.hooks import attach_scales
from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
from seal_gguf.model.rope import RopeScaling, extend_config
from seal_gguf.scales import identity_scales
from seal_gguf.tasks import make_mixture, parse_tasks

# Cases are generated and free: more of them let a larger anchor weight keep the gain (λ = 40 with 150 cases
# kept what λ = 20 with 100 did at three quarters of the cost; BENCHMARKS.md).
DEFAULT_SAMPLES = 150
DEFAULT_LR = {GRANULARITY_HEAD: 1e-2, GRANULARITY_CHANNEL: 2e-2}
# constant: the paper's. cosine: annealed to 0 over the epoch, so the last steps settle the scales instead
# of moving each of them by about lr (Adam's step size) on every window's noisy anchor gradient.
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LR_SCHEDULE = "cosine"  # tools/exp_frontier.py: see BENCHMARKS.md
MIN_SCALE = 1e-3
# Greedy decoding for held-out scoring stops this many tokens after the label's length.
EXTRA_ANSWER_TOKENS = 3
# Tokens of the built-in general (measurement) text on which the trained scales' cost is measured.
GENERAL_CTX = 512


@dataclass
class TrainResult:
    scales: torch.Tensor  # float32 on the CPU, [L, H] or [L, H, D]
    layout: ModelLayout
    granularity: str
    losses: list[float]  # one per training case, in order
    heldout_before: tuple[int, int] | None  # (correct, total); None when eval_samples is 0
    heldout_after: tuple[int, int] | None
    seconds_per_case: float
    provenance: dict[str, str] = field(default_factory=dict)
    device_map: dict[str, str] | None = None  # module -> device, when the model was dispatched
    anchor_kls: list[float] = field(default_factory=list)  # KL(base ‖ SEAL) per step; empty without anchor
    general_cost: Any = None  # seal_gguf.measure.general.CostSummary after training, or None

    @property
    def accuracy_before(self) -> float | None:
        return None if self.heldout_before is None else self.heldout_before[0] / self.heldout_before[1]

    @property
    def accuracy_after(self) -> float | None:
        return None if self.heldout_after is None else self.heldout_after[0] / self.heldout_after[1]


# -- model --

def device_map_for(model_dir: Path, spec: str, max_memory: str | None, length: int, dtype: str,
                   checkpointing: bool, granularity: str) -> tuple[dict[str, str], torch.device]:
    """(module -> device, where the inputs go) for `--device-map auto`, planned by seal_gguf.learn.plan
    within `max_memory` (default: what is free on each GPU, then in RAM, then disk), or for
    `--device-map FILE.json`."""
    if spec == "auto":
        shape = model_shape(model_dir)
        budgets = parse_max_memory(max_memory) if max_memory else available_memory()
        placement = place_layers(shape, estimate_step(shape, length, dtype, checkpointing, granularity), budgets)
        return placement.device_map, torch.device(placement.execution_device)
    if max_memory:
        raise InputError("--max-memory plans a device map: use it with --device-map auto, not with a map file")
    device_map = read_device_map(Path(spec))
    accelerators = [d for d in device_map.values() if d not in (CPU, DISK)]
    return device_map, torch.device(accelerators[0] if accelerators else CPU)


# -- loss and decoding --

def heldout_accuracy(model: nn.Module, tokenizer: Any, cases: Sequence[Case], device: torch.device,
                     progress: bool, desc: str) -> tuple[int, int]:
    """(correct, total) by greedy decoding a few tokens after each prompt."""
    stop = stop_token_ids(model, tokenizer)
    correct = 0
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False):
        prompt_ids, answer_ids = encode_case(tokenizer, case)
        tokens = greedy_continuation(model, prompt_ids, len(answer_ids) + EXTRA_ANSWER_TOKENS, stop, device)
        correct += score_answer(case, tokenizer.decode(tokens, skip_special_tokens=True))
    return correct, len(cases)


@dataclass
class Fit:
    scales: nn.Parameter  # on the training device
    losses: list[float]  # answer cross-entropy per case
    anchor_kls: list[float]  # KL(base ‖ SEAL) per case on its anchor window; empty without anchor


def fit_scales(model: nn.Module, layout: ModelLayout, tokenizer: Any, cases: Sequence[Case], granularity: str,
               lr: float, device: torch.device, gradient_checkpointing: bool, progress: bool,
               scales: nn.Parameter | None = None, anchor: Anchor | None = None,
               lr_schedule: str = DEFAULT_LR_SCHEDULE) -> Fit:
    """One epoch, batch 1, over `cases`. With an active anchor, step i minimises answer CE +
    λ·KL(base ‖ SEAL) on anchor window i (cycled); the base log-probabilities come from the same
    model with the hooks detached. The hooks are attached for the SEAL passes only."""
    if scales is None:
        scales = nn.Parameter(identity_scales(layout, granularity).to(device))
    optimizer = torch.optim.AdamW([scales], lr=lr, weight_decay=0.0)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(cases))
                 if lr_schedule == "cosine" else None)
    teacher = AnchorTeacher(anchor, device) if anchor is not None and anchor.active else None
    losses: list[float] = []
    kls: list[float] = []
    if gradient_checkpointing:
        enable_checkpointing(model)
    bar = tqdm(cases, desc="training", unit="case", disable=not progress)
    layers_mode = checkpointed_layers(model) if gradient_checkpointing else nullcontext()
    with layers_mode:
        for number, case in enumerate(bar, 1):
            prompt_ids, answer_ids = encode_case(tokenizer, case)
            base_logp = teacher.log_probs(model, number - 1) if teacher is not None else None
            # the backward pass recomputes checkpointed layers: the hooks stay attached through it
            with attach_scales(model, layout, scales):
                loss = answer_loss(model, prompt_ids, answer_ids, device)
                total = loss
                if base_logp is not None and anchor is not None:
                    kl = kl_base_seal(base_logp, window_log_probs(model, anchor.window_for(number - 1), device))
                    total = loss + anchor.weight * kl.to(loss.device)
                if not torch.isfinite(total):
                    raise ScalesError(
                        f"training diverged: the loss of case {number} is {total.item()}; "
                        "try a lower --lr or --dtype float32"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                scales.clamp_(min=MIN_SCALE)
            losses.append(loss.item())
            if base_logp is not None:
                kls.append(kl.item())
            recent = losses[-10:]
            postfix = {"loss": f"{sum(recent) / len(recent):.3f}"}
            if kls:
                postfix["kl"] = f"{sum(kls[-10:]) / len(kls[-10:]):.4f}"
            bar.set_postfix(postfix)
    return Fit(scales, losses, kls)


# -- the whole run --

def _cases_summary(cases: Sequence[Case]) -> tuple[str, int]:
    """Tasks (comma list, in order of first appearance) and length (the longest) of a loaded case set."""
    tasks = list(dict.fromkeys(c.task for c in cases))
    return ",".join(tasks), max(c.length for c in cases)


def _fraction(result: tuple[int, int] | None) -> str:
    return "n/a" if result is None else f"{result[0] / result[1]:.3f} ({result[0]}/{result[1]})"


def train_scales(
    model_dir: Path,
    granularity: str = GRANULARITY_CHANNEL,
    task: str = "lines",
    samples: int = DEFAULT_SAMPLES,
    length: int = 1024,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    gradient_checkpointing: bool = True,
    eval_samples: int = 20,
    progress: bool = True,
    cases: Sequence[Case] | None = None,
    command: str = "",
    rope: RopeScaling | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
    min_length: int | None = None,
    anchor_weight: float = DEFAULT_ANCHOR_WEIGHT,
    anchor_text: Path | None = None,
    anchor_window: int = DEFAULT_ANCHOR_WINDOW,
    cache_teacher: bool = False,
    general_tokens: int = GENERAL_TOKENS,
    lr_schedule: str = DEFAULT_LR_SCHEDULE,
    anchor_generated: int = 0,
) -> TrainResult:
    """Learn SEAL scales for the model in model_dir. Training cases are generated from the "train"
    split with `seed` unless `cases` are given; held-out cases are fresh "eval" cases of the same
    tasks at the full length with seed + 1, scored before and after training.

    task: one task or a comma list ("lines,kv"): cases interleaved (seal_gguf.tasks.make_mixture);
    min_length: lengths drawn uniformly from min_length..length (default: all at length).
    anchor_weight: λ of the anchor term λ·KL(base ‖ SEAL) on anchor_text (default: the built-in anchor
    text) in windows of anchor_window tokens; 0 trains on the answers alone (the paper's recipe).
    cache_teacher: keep the base model's log-probabilities per anchor window instead of recomputing them.
    anchor_generated: add this many anchor windows the model writes itself before training (its sampled
    replies to varied requests, seeded with `seed`: seal_gguf.learn.anchor.generated_windows),
    spread evenly among the anchor text's windows.
    general_tokens: after training, measure the cost on this many tokens of the built-in measurement
    text (seal_gguf.measure.general; 0 skips it) and record it in the provenance.
    rope: learn under this context extension; the scales file records it (ScalesMeta.ROPE_SCALING).
    device_map: "auto" (placed by seal_gguf.learn.plan within max_memory) or a JSON device-map file:
    the layers spread over GPUs, CPU RAM and disk (accelerate's dispatch; `device` is then unused).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    # before minutes of generating cases: a folded model, or prompts beyond the model's context
    check_not_folded(config, str(model_dir), force=False, remedy="use the original, unfolded model")
    if rope is not None:
        rope = rope.resolved(config, str(model_dir / "config.json"))
    context = (extend_config(config, rope, str(model_dir / "config.json")) if rope else config).get(
        "max_position_embeddings")
    if cases is None and isinstance(context, int) and length > context:
        raise InputError(f"{model_dir}: --length {length} is beyond the model's context of {context} tokens; "
                         "use a shorter --length, or extend the context with --rope-scaling")
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if eval_samples < 0:
        raise InputError(f"eval samples must be >= 0, not {eval_samples}")
    if general_tokens < 0:
        raise InputError(f"general tokens must be >= 0, not {general_tokens}")
    if anchor_generated < 0:
        raise InputError(f"generated anchor windows must be >= 0, not {anchor_generated}")
    lr = DEFAULT_LR[granularity] if lr is None else lr
    if not lr > 0:
        raise InputError(f"learning rate must be > 0, not {lr}")
    if lr_schedule not in LR_SCHEDULES:
        raise InputError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, not {lr_schedule!r}")
    if max_memory and device_map is None:
        raise InputError("--max-memory needs --device-map auto")
    tokenizer = load_tokenizer(model_dir)
    anchor = make_anchor(tokenizer, anchor_weight, anchor_text, anchor_window, cache_teacher)
    if cases is None:
        if samples < 1:
            raise InputError(f"samples must be >= 1, not {samples}")
        cases = make_mixture(tokenizer, task, length, samples, seed, split="train", min_length=min_length)
    else:
        task, length = _cases_summary(cases)
    heldout = make_mixture(tokenizer, task, length, eval_samples, seed + 1, split="eval")
    dispatch: dict[str, str] | None = None
    if device_map is None:
        torch_device = resolve_device(device)
    else:
        dispatch, torch_device = device_map_for(model_dir, device_map, max_memory, length, dtype,
                                                gradient_checkpointing, granularity)
    # layers placed on "disk" are read back from this folder (or straight from the safetensors files)
    with tempfile.TemporaryDirectory(prefix="seal-offload-") if dispatch else nullcontext() as offload:
        model, layout = load_model(model_dir, torch_device, dtype, progress, rope, dispatch,
                                   Path(offload) if offload else None)
        if anchor.active and anchor_generated:
            anchor = with_generated_windows(anchor, model, tokenizer, anchor_generated, seed, torch_device, progress)
        result = train_loaded(model, layout, tokenizer, cases, heldout, granularity, lr, torch_device,
                              gradient_checkpointing, progress, anchor, general_tokens,
                              lr_schedule=lr_schedule)
    provenance = {
        ScalesMeta.TASK: ",".join(parse_tasks(task)),
        ScalesMeta.SAMPLES: str(len(cases)),
        ScalesMeta.LENGTH: str(length),
        ScalesMeta.LR: repr(lr),
        ScalesMeta.LR_SCHEDULE: lr_schedule,
        ScalesMeta.SEED: str(seed),
        ScalesMeta.BASE_FINGERPRINT: model_fingerprint(model_dir, layout),
        ScalesMeta.SEAL_GGUF_VERSION: __version__,
        ScalesMeta.COMMAND: command,
        ScalesMeta.HELDOUT_BEFORE: _fraction(result.heldout_before),
        ScalesMeta.HELDOUT_AFTER: _fraction(result.heldout_after),
    }
    if min_length is not None:
        provenance[ScalesMeta.MIN_LENGTH] = str(min_length)
    provenance |= anchor_provenance(anchor) | cost_provenance(result.general_cost)
    if rope is not None:
        provenance[ScalesMeta.ROPE_SCALING] = rope.spec()
    result.provenance = provenance
    result.device_map = dispatch
    return result


def with_generated_windows(anchor: Anchor, model: nn.Module, tokenizer: Any, count: int, seed: int,
                           device: torch.device, progress: bool) -> Anchor:
    """The anchor with `count` windows the model (without scales) writes itself spread among its own;
    its source then says so ("built-in + 24 generated")."""
    generated = generated_windows(model, tokenizer, count, anchor.window, seed, device, progress)
    return dataclasses.replace(anchor, windows=interleave(anchor.windows, generated),
                               source=f"{anchor.source} + {count} generated")


def anchor_provenance(anchor: Anchor) -> dict[str, str]:
    if not anchor.active:
        return {ScalesMeta.ANCHOR_WEIGHT: "0"}
    return {ScalesMeta.ANCHOR_WEIGHT: repr(anchor.weight), ScalesMeta.ANCHOR_TEXT: anchor.source,
            ScalesMeta.ANCHOR_WINDOW: str(anchor.window)}


def cost_provenance(cost: Any) -> dict[str, str]:
    if cost is None:
        return {}
    return {ScalesMeta.GENERAL_PPL_RATIO: f"{cost.ppl_ratio:.4f}", ScalesMeta.GENERAL_MEAN_KLD: f"{cost.mean_kld:.5f}",
            ScalesMeta.GENERAL_P99_KLD: f"{cost.p99_kld:.4f}", ScalesMeta.GENERAL_SAME_TOP: f"{cost.same_top:.4f}",
            ScalesMeta.GENERAL_TOKENS: str(cost.tokens)}


def train_loaded(model: nn.Module, layout: ModelLayout, tokenizer: Any, cases: Sequence[Case],
                 heldout: Sequence[Case], granularity: str, lr: float, torch_device: torch.device,
                 gradient_checkpointing: bool, progress: bool, anchor: Anchor | None = None,
                 general_tokens: int = GENERAL_TOKENS, score_before: bool = True,
                 lr_schedule: str = DEFAULT_LR_SCHEDULE) -> TrainResult:
    """Held-out accuracy before (unless score_before is False), one epoch of training, held-out
    accuracy after, and the cost on `general_tokens` tokens of the measurement text (0: none)."""
    from seal_gguf.measure.general import cost_pytorch

    scales = nn.Parameter(identity_scales(layout, granularity).to(torch_device))
    before = after = cost = None
    if heldout and score_before:
        with attach_scales(model, layout, scales):
            before = heldout_accuracy(model, tokenizer, heldout, torch_device, progress, "held-out before")
    start = time.perf_counter()
    fit = fit_scales(model, layout, tokenizer, cases, granularity, lr, torch_device,
                     gradient_checkpointing, progress, scales, anchor, lr_schedule)
    seconds_per_case = (time.perf_counter() - start) / len(cases)
    if heldout:
        with attach_scales(model, layout, fit.scales):
            after = heldout_accuracy(model, tokenizer, heldout, torch_device, progress, "held-out after")
    if general_tokens:
        cost = cost_pytorch(model, layout, fit.scales, tokenizer, ctx=GENERAL_CTX, max_tokens=general_tokens,
                            progress=progress)
    return TrainResult(
        scales=fit.scales.detach().to("cpu", torch.float32).clone(),
        layout=layout,
        granularity=granularity,
        losses=fit.losses,
        heldout_before=before,
        heldout_after=after,
        seconds_per_case=seconds_per_case,
        anchor_kls=fit.anchor_kls,
        general_cost=cost,
    )
