"""Comparing two models' logits position by position: KL divergence, top-1 agreement and the
probability of the next token, summarised as llama-perplexity's KL-divergence report does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seal_gguf.errors import InputError
from seal_gguf.texts import Chunk

# Mean-KLD limits by GGUF type; other (lower-bit) types are gated only by --max-kld.
DEFAULT_MAX_MEAN_KLD: dict[str, float] = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-3, "q8_0": 5e-3}
# Types whose top-1 token must agree with the reference at every position where the reference decides:
# where its top token leads the GGUF's by more than TOP1_TIE_NATS of log-probability. Two engines that
# sum in another order (float32 noise ~1e-5 in a logit) can swap a near tie on a correct model.
EXACT_TOP1_TYPES = ("f32",)
TOP1_TIE_NATS = 1e-3
# A SEAL GGUF may cost up to this many times the mean KLD that a base GGUF of the same type (given with
# --base-gguf) costs the model without scales: amplified heads amplify their quantization error too.
BASE_KLD_FACTOR = 3.0
# Rows of the vocabulary-wide float64 comparison done at once (memory, not results).
COMPARE_BLOCK = 32
def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class PositionStats:
    """Per scored position (every position that has a next token in its chunk)."""

    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    logp_ref: list[np.ndarray] = field(default_factory=list)  # log p(next token)
    logp_test: list[np.ndarray] = field(default_factory=list)
    top_gap: list[np.ndarray] = field(default_factory=list)  # ref log p(its top) - ref log p(GGUF's top)

    def add(self, ref_logits: np.ndarray, test_logits: np.ndarray, next_ids: np.ndarray) -> None:
        """Compare rows of reference and candidate logits; next_ids[i] is the token after row i."""
        for start in range(0, len(next_ids), COMPARE_BLOCK):
            rows = slice(start, start + COMPARE_BLOCK)
            ref, test = log_softmax64(ref_logits[rows]), log_softmax64(test_logits[rows])
            # KL(ref || test) is >= 0; float64 rounding can leave -1e-17 on identical rows
            self.kld.append(np.maximum((np.exp(ref) * (ref - test)).sum(axis=-1), 0.0))
            ref_top, test_top = ref.argmax(axis=-1), test.argmax(axis=-1)
            self.same_top.append(ref_top == test_top)
            every = np.arange(ref.shape[0])
            self.top_gap.append(ref[every, ref_top] - ref[every, test_top])
            picks = every, next_ids[rows]
            self.logp_ref.append(ref[picks])
            self.logp_test.append(test[picks])


@dataclass(frozen=True)
class KLSummary:
    """The figures of llama-perplexity's KL-divergence summary; probabilities as fractions."""

    tokens: int
    ppl_ref: float
    ppl_test: float
    mean_kld: float
    mean_kld_stderr: float
    median_kld: float
    p99_kld: float
    p999_kld: float
    max_kld: float
    same_top: float
    same_top_stderr: float
    mean_dp: float
    rms_dp: float
    max_abs_dp: float
    decisive_top_misses: int = 0  # top-1 differs where the reference leads by more than TOP1_TIE_NATS


def summarize_positions(stats: PositionStats) -> KLSummary:
    if not stats.kld:
        raise InputError("the evaluation text gives no position to score; use a longer text")
    kld = np.concatenate(stats.kld)
    same = np.concatenate(stats.same_top).astype(np.float64)
    lp_ref, lp_test = np.concatenate(stats.logp_ref), np.concatenate(stats.logp_test)
    dp = np.exp(lp_test) - np.exp(lp_ref)
    n = len(kld)

    def stderr(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    return KLSummary(
        tokens=n,
        ppl_ref=float(np.exp(-lp_ref.mean())),
        ppl_test=float(np.exp(-lp_test.mean())),
        mean_kld=float(kld.mean()),
        mean_kld_stderr=stderr(kld),
        median_kld=float(np.percentile(kld, 50)),
        p99_kld=float(np.percentile(kld, 99)),
        p999_kld=float(np.percentile(kld, 99.9)),
        max_kld=float(kld.max()),
        same_top=float(same.mean()),
        same_top_stderr=stderr(same),
        mean_dp=float(dp.mean()),
        rms_dp=float(np.sqrt((dp**2).mean())),
        max_abs_dp=float(np.abs(dp).max()),
        decisive_top_misses=int(np.count_nonzero(np.concatenate(stats.top_gap) > TOP1_TIE_NATS))
        if stats.top_gap else 0,
    )


@dataclass(frozen=True)
class Limits:
    max_mean_kld: float | None
    exact_top1: bool


def limits_for(file_type: str, max_kld: float | None) -> Limits:
    """Default limits for a GGUF type; --max-kld gates the types that have none."""
    default = DEFAULT_MAX_MEAN_KLD.get(file_type)
    return Limits(default if default is not None else max_kld, file_type in EXACT_TOP1_TYPES)


def check_limits(summary: KLSummary, limits: Limits) -> list[str]:
    failures = []
    if limits.max_mean_kld is not None and summary.mean_kld > limits.max_mean_kld:
        failures.append(f"mean KLD {summary.mean_kld:.3g} > {limits.max_mean_kld:g}")
    if limits.exact_top1 and summary.decisive_top_misses:
        failures.append(f"top-1 token differs at {summary.decisive_top_misses} of {summary.tokens} positions where "
                        f"the reference leads by more than {TOP1_TIE_NATS:g} nats (must agree at all)")
    return failures


class LogitStore:
    """Float32 logits of every chunk position, in a memory-mapped file inside `folder`."""

    def __init__(self, folder: Path, name: str, chunks: Sequence[Chunk], vocab: int):
        self.offsets = np.cumsum([0, *(len(c.ids) for c in chunks)])
        self.array = np.memmap(folder / f"{name}.f32", dtype=np.float32, mode="w+",
                               shape=(int(self.offsets[-1]), vocab))

    def __setitem__(self, index: int, logits: np.ndarray) -> None:
        self.array[self.offsets[index]:self.offsets[index + 1]] = logits

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[self.offsets[index]:self.offsets[index + 1]]


def torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


