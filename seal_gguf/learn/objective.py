"""The training objective's terms: answer cross-entropy, and the anchor that keeps the model itself.

SEAL scales every head's output, so scales learned on retrieval alone move the model everywhere
(DESIGN.md section 5b). The anchor term holds the SEAL model close to the model without scales on
general text: λ · KL(base ‖ SEAL), averaged over the positions of one anchor window per step
(windows cycled in order). The frozen model without scales is its own teacher: its log-probabilities
come from the same weights run with the hooks detached under no_grad, so no second copy of the
weights exists. They are either computed afresh at every step (the default) or kept per window in
host memory after their first use (`cache=True`); see AnchorTeacher.

Why recomputing is the default (measured on SmolLM2-135M, CPU, 2 busy cores): the teacher's pass
over a 256-token window took 2.9 s against 40 s for the 1K-token answer step with its backward pass
(same conditions), so a cache saves at most ~7% of a step, while it holds 256 x 49,152 float16
log-probabilities (25 MB) per window: 0.5 GB for the built-in text's 20 windows, more for a user's
long text. Caching pays where the teacher pass is a larger share (short cases, long windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seal_gguf.errors import InputError

DEFAULT_ANCHOR_WEIGHT = 40.0  # tools/exp_frontier.py on SmolLM2 (cosine schedule, 150 cases): see BENCHMARKS.md
DEFAULT_ANCHOR_WINDOW = 256
BUILTIN_ANCHOR = "built-in"
# A teacher cache larger than this (bytes, float16 log-probabilities of every window) is refused.
MAX_TEACHER_CACHE = 2 * 2**30


def answer_loss(model: nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the prompt; the prompt itself is not scored.

    The input is prompt + answer[:-1]; the last len(answer) positions predict the answer tokens,
    and only those positions go through the output layer.
    """
    ids = torch.tensor([[*prompt_ids, *answer_ids[:-1]]], device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer_ids)).logits[0]
    # with a device map the logits come from the last layer's device
    return F.cross_entropy(logits.float(), torch.tensor(list(answer_ids), device=logits.device))


def window_log_probs(model: nn.Module, ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] float32 log-probabilities of the next token at every position."""
    logits = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def kl_base_seal(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ SEAL) in nats, averaged over positions: sum_v p_base (log p_base - log p_seal)."""
    teacher_logp = teacher_logp.to(student_logp.device, torch.float32)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") / student_logp.shape[0]


@dataclass
class Anchor:
    """The anchor term's settings: weight λ, the token windows, and where the text came from."""

    weight: float
    windows: list[list[int]]
    source: str  # "built-in" or the file's name
    window: int  # tokens per window (the last window of a short text may be shorter)
    cache: bool = False  # keep the teacher's log-probabilities per window (host memory)

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise InputError(f"the anchor weight must be >= 0, not {self.weight}")
        if self.weight > 0 and not self.windows:
            raise InputError("the anchor text gives no window")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def window_for(self, step: int) -> list[int]:
        """The window of training step `step` (0-based): cycled in order."""
        return self.windows[step % len(self.windows)]


def make_anchor(tokenizer: Any, weight: float = DEFAULT_ANCHOR_WEIGHT, text: Path | None = None,
                window: int = DEFAULT_ANCHOR_WINDOW, cache: bool = False) -> Anchor:
    """The anchor for `tokenizer`: the built-in anchor text (seal_gguf.learn.anchortext) or the
    UTF-8 file `text`, in windows of `window` tokens. Weight 0 turns the term off (the paper's recipe)
    and reads no text."""
    from seal_gguf.learn.anchor import anchor_documents, anchor_windows

    if not weight >= 0:
        raise InputError(f"the anchor weight must be >= 0, not {weight}")
    source = BUILTIN_ANCHOR if text is None else Path(text).name
    if weight == 0:
        return Anchor(0.0, [], source, window, cache)
    windows = anchor_windows(tokenizer, window, anchor_documents(text))
    return Anchor(float(weight), windows, source, window, cache)


@dataclass
class AnchorTeacher:
    """The base model's log-probabilities on the anchor windows. The caller runs `log_probs` with
    the scale hooks detached. With `cache`, each window's are kept (float16, host memory) after
    their first use, so a window costs one teacher pass however often it is cycled."""

    anchor: Anchor
    device: torch.device
    _cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._positions = sum(len(w) for w in self.anchor.windows)

    def log_probs(self, model: nn.Module, step: int) -> torch.Tensor:
        index = step % len(self.anchor.windows)
        if index in self._cache:
            return self._cache[index]
        with torch.no_grad():
            logp = window_log_probs(model, self.anchor.windows[index], self.device)
        if self.anchor.cache:
            need = 2 * logp.shape[-1] * self._positions
            if need > MAX_TEACHER_CACHE:
                raise InputError(f"caching the teacher on this anchor text needs {need / 2**30:.1f} GiB; "
                                 "use a shorter anchor text or no cache")
            self._cache[index] = logp = logp.to("cpu", torch.float16)
        return logp
