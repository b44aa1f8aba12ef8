"""What SEAL costs on general text: the model with its scales against the same model without.

SEAL scales every attention head's output, so it changes the model everywhere, not only on
retrieval prompts (DESIGN.md section 5b; issue 19, "Measure the cost everywhere"). The cost is
measured the way llama-perplexity measures what quantization costs (its --kl-divergence
statistics): on the same token chunks, the base model is the reference and the SEAL model the
candidate, and at every position that has a next token in its chunk

- KL(base ‖ SEAL) over the whole vocabulary, in float64 (nats per token): its mean with a
  standard error, and its 99th percentile;
- whether the most likely next token (top-1) is unchanged: the share of such positions;
- the probability of the text's actual next token under each model, which gives both
  perplexities and their ratio (SEAL / base), with the standard error of that ratio from the
  per-token log-probability differences (first-order).

Two engines:
- cost_pytorch: one model in PyTorch, run once without hooks (base) and once with the scales
  attached by forward pre-hooks (SEAL) on each chunk: one copy of the weights.
- cost_gguf: a SEAL GGUF against the base GGUF of the same type in llama.cpp, one model loaded
  at a time (the base logits wait in a memory-mapped file in a temporary folder).

The text is the built-in general text (general_documents(): prose, dialogue, code, technical
writing, news), which is never used for training: the trainer's anchor text lives apart, in
seal_gguf/learn/anchortext. A user's text is `documents=[read_text_document(path)]`.
"""

from __future__ import annotations

import math
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from seal_gguf.errors import InputError, ScalesError
from seal_gguf.fileio import require_gguf
from seal_gguf.gguffile.header import read_model_header, string_array
from seal_gguf.gguffile.llama import open_llama
from seal_gguf.kld import KLSummary, LogitStore, PositionStats, summarize_positions
from seal_gguf.measure.identity import first_token_difference
from seal_gguf.measure.texts import general_documents
from seal_gguf.model.architectures import ModelLayout
from seal_gguf.model.hooks import attach_scales
from seal_gguf.texts import Chunk, Document, make_chunks, special_prefix

# Chunks as llama-perplexity's (the cost is a property of the model at ordinary lengths), and the
# tokens measured by default: enough for a mean KLD to about ±10% on SmolLM2, seconds on a CPU.
DEFAULT_CTX = 512
GENERAL_TOKENS = 2048
MIN_CTX = 16
# llama.cpp is opened this small for tokenizing only.
TOKENIZE_CTX = 16
TOKENS_KEY = "tokenizer.ggml.tokens"


# -- the figures --

@dataclass(frozen=True)
class CostSummary:
    """SEAL against base on general text; probabilities as fractions, KL divergences in nats per token.

    ppl_ratio is ppl_seal / ppl_base (1.0: no cost); its stderr is None when only a KLSummary
    was given. Positions are every token that has a next token in its chunk.
    """

    tokens: int
    ppl_base: float
    ppl_seal: float
    ppl_ratio: float
    ppl_ratio_stderr: float | None
    mean_kld: float
    mean_kld_stderr: float
    p99_kld: float
    same_top: float
    same_top_stderr: float

    @classmethod
    def from_kl(cls, summary: KLSummary, ppl_ratio_stderr: float | None = None) -> CostSummary:
        """From a KLSummary whose reference is the base model and whose test is the SEAL model."""
        return cls(
            tokens=summary.tokens,
            ppl_base=summary.ppl_ref,
            ppl_seal=summary.ppl_test,
            ppl_ratio=summary.ppl_test / summary.ppl_ref,
            ppl_ratio_stderr=ppl_ratio_stderr,
            mean_kld=summary.mean_kld,
            mean_kld_stderr=summary.mean_kld_stderr,
            p99_kld=summary.p99_kld,
            same_top=summary.same_top,
            same_top_stderr=summary.same_top_stderr,
        )

    @classmethod
    def from_stats(cls, stats: PositionStats) -> CostSummary:
        """From per-position statistics with the base model as reference and SEAL as test.

        Raises InputError if no position was scored.
        """
        summary = summarize_positions(stats)
        # ln(PPL_seal / PPL_base) is the mean of lp_base - lp_seal; the ratio's stderr to first order
        diff = np.concatenate(stats.logp_ref) - np.concatenate(stats.logp_test)
        n = len(diff)
        ln_stderr = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        ratio = summary.ppl_test / summary.ppl_ref
        return cls.from_kl(summary, ppl_ratio_stderr=ratio * ln_stderr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line, e.g. "PPL ×1.019 (15.6 → 15.9), mean KLD 0.0123, 99% KLD 0.0912, same top-1 97.1%
        over 4,096 scored positions"."""
        return (f"PPL ×{self.ppl_ratio:.3f} ({_ppl(self.ppl_base)} → {_ppl(self.ppl_seal)}), "
                f"mean KLD {_kld(self.mean_kld)}, 99% KLD {_kld(self.p99_kld)}, "
                f"same top-1 {100 * self.same_top:.1f}% over {self.tokens:,} scored positions")


def _ppl(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _kld(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}"


@dataclass(frozen=True)
class GeneralCost:
    """One SEAL-vs-base comparison on general text, as validate, eval and the card report it."""

    engine: str  # "pytorch" (hooked vs unhooked) or "llama.cpp" (SEAL GGUF vs base GGUF)
    seal: str  # the SEAL model: a scales file on a folder, or a GGUF
    base: str  # the model without scales
    file_type: str  # float32 in PyTorch; the GGUFs' type (f16, q8_0, q4_k_m, ...)
    cost: CostSummary


def pair_by_type(seal: Sequence[tuple[Path, str]], base: Sequence[tuple[Path, str]]) -> list[tuple[Path, Path, str]]:
    """(SEAL GGUF, base GGUF, type) for each SEAL GGUF that has a base GGUF of its own type: the cost of
    the scales, not of quantization. Arguments are (path, file type) pairs."""
    bases = {file_type: path for path, file_type in base}
    return [(path, bases[file_type], file_type) for path, file_type in seal if file_type in bases]


def general_costs(models: Sequence[Path], scales: Path | None, documents: Sequence[Document] | None = None,
                  max_tokens: int = GENERAL_TOKENS, ctx: int = DEFAULT_CTX, progress: bool = False) -> list[GeneralCost]:
    """What SEAL costs each SEAL model among `models` (eval's list): an HF folder run with `scales`
    (hooked vs unhooked, float32 on the CPU), and each GGUF carrying seal.* keys against the GGUF
    without them of the same file type (SEAL GGUFs without such a base are left out)."""
    from seal_gguf.gguffile.header import read_metadata
    from seal_gguf.gguffile.metadata import file_type_name, gguf_seal_metadata
    from seal_gguf.model.loading import load_model, load_tokenizer
    from seal_gguf.scales import load_scales

    out: list[GeneralCost] = []
    seal_ggufs: list[tuple[Path, str]] = []
    base_ggufs: list[tuple[Path, str]] = []
    for model in (Path(m) for m in models):
        if model.is_dir():
            if scales is None:
                continue
            hf, layout = load_model(model, torch.device("cpu"), "float32", progress=False)
            cost = cost_pytorch(hf, layout, load_scales(Path(scales), layout).values, load_tokenizer(model),
                                documents, ctx, max_tokens, progress)
            out.append(GeneralCost("pytorch", f"{model.name} + {Path(scales).name}", model.name, "float32", cost))
            continue
        file_type = file_type_name(read_metadata(model).get("general.file_type"))
        is_seal = any(key != "general.architecture" for key in gguf_seal_metadata(model))
        (seal_ggufs if is_seal else base_ggufs).append((model, file_type))
    for seal, base, file_type in pair_by_type(seal_ggufs, base_ggufs):
        cost = cost_gguf(seal, base, documents, ctx, max_tokens=max_tokens, progress=progress)
        out.append(GeneralCost("llama.cpp", seal.name, base.name, file_type, cost))
    return out


def describe_costs(costs: Sequence[GeneralCost]) -> list[str]:
    """Report lines, one per comparison."""
    return [f"  {c.engine:9s} {c.file_type:8s} {c.seal} vs {c.base}: {c.cost.describe()}" for c in costs]


# -- PyTorch: hooked against unhooked --

def cost_pytorch(
    model: torch.nn.Module,
    layout: ModelLayout,
    scales_values: Any,
    tokenizer: Any,
    documents: Sequence[Document] | None = None,
    ctx: int = DEFAULT_CTX,
    max_tokens: int | None = None,
    progress: bool = False,
) -> CostSummary:
    """What the scales cost `model` on general text, in PyTorch.

    model, layout: as seal_gguf.model.loading.load_model returns them (any dtype or device);
    scales_values: the scales tensor, [L, H] (SEAL-H) or [L, H, D] (SEAL-C), or a SealScales; it
    may be a trainable Parameter (it is detached here). tokenizer: the model's transformers
    tokenizer. documents: the text (default: general_documents()). ctx: tokens per chunk (BOS
    included). max_tokens: at most this many text tokens in all, split evenly between the documents
    (their beginnings); None: all of them.

    Each chunk runs twice on the same model, without hooks (base) and with the scales attached
    (SEAL); no second copy of the weights is made. The model is in eval mode during the run and
    left in the mode it had. Raises InputError (bad ctx or max_tokens, no text) or ScalesError
    (scales that do not fit the layout).
    """
    values = _scales_tensor(scales_values, layout)
    documents = general_documents() if documents is None else list(documents)
    _check_sizes(ctx, max_tokens)
    ids = [list(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in documents]
    chunks = _chunks(documents, ids, special_prefix(tokenizer), ctx, max_tokens)
    device = _input_device(model)
    stats = PositionStats()
    was_training = model.training
    model.eval()
    try:
        with _bar(chunks, "general text", progress) as bar:
            for chunk in chunks:
                n = len(chunk.ids)
                base = _torch_logits(model, chunk.ids, device)
                with attach_scales(model, layout, values):
                    seal = _torch_logits(model, chunk.ids, device)
                stats.add(base[:n - 1], seal[:n - 1], np.asarray(chunk.ids[1:]))
                bar.update(n)
    finally:
        model.train(was_training)
    return CostSummary.from_stats(stats)


def _scales_tensor(scales: Any, layout: ModelLayout) -> torch.Tensor:
    values = scales if isinstance(scales, torch.Tensor) else getattr(scales, "values", scales)  # or a SealScales
    if not isinstance(values, torch.Tensor):
        raise ScalesError(f"scales must be a tensor, not {type(values).__name__}")
    head = (layout.num_layers, layout.num_heads)
    shapes = (head, (*head, layout.head_dim))
    if tuple(values.shape) not in shapes:
        raise ScalesError(f"scales of shape {list(values.shape)} do not fit the model: expected {list(shapes[0])} "
                          f"(SEAL-H) or {list(shapes[1])} (SEAL-C)")
    return values.detach()


def _input_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _torch_logits(model: torch.nn.Module, ids: list[int], device: torch.device) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device))
        return out.logits[0].float().cpu().numpy()


# -- llama.cpp: SEAL GGUF against base GGUF --

def cost_gguf(
    seal_gguf: Path,
    base_gguf: Path,
    documents: Sequence[Document] | None = None,
    ctx: int = DEFAULT_CTX,
    tokenizer: Any = None,
    progress: bool = False,
    max_tokens: int | None = None,
) -> CostSummary:
    """What the scales folded into `seal_gguf` cost, against `base_gguf` (the same model and type
    without scales), in llama.cpp.

    The text (default: general_documents()) is tokenized by llama.cpp with the base GGUF's own
    tokenizer, and the SEAL GGUF must have the same vocabulary and turn the text into the same ids;
    a transformers `tokenizer` given instead supplies the ids for both (as validate does when the
    engines disagree), and only the vocabularies are compared. ctx and max_tokens as in
    cost_pytorch. One model is loaded at a time: the base logits wait in a memory-mapped file in a
    temporary folder (tokens x vocabulary x 4 bytes).

    Raises InputError, with one line naming the file, for a file that is not a loadable GGUF, a
    vocabulary or tokenization that differs from the base GGUF's, bad ctx or max_tokens, or no text.
    """
    seal_gguf, base_gguf = require_gguf(Path(seal_gguf)), require_gguf(Path(base_gguf))
    _check_sizes(ctx, max_tokens)
    documents = general_documents() if documents is None else list(documents)
    check_same_vocabulary(seal_gguf, base_gguf)
    if tokenizer is None:
        prefix, ids = llama_tokens(base_gguf, documents)
    else:
        prefix = special_prefix(tokenizer)
        ids = [list(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in documents]
    chunks = _chunks(documents, ids, prefix, ctx, max_tokens)
    n_ctx = max(len(c.ids) for c in chunks)
    stats = PositionStats()
    with tempfile.TemporaryDirectory(prefix="seal-cost-") as tmp:
        with open_llama(base_gguf, n_ctx=n_ctx) as llm:
            vocab = llm.n_vocab()
            store = LogitStore(Path(tmp), "base", chunks, vocab)
            with _bar(chunks, base_gguf.name, progress) as bar:
                for i, chunk in enumerate(chunks):
                    llm.reset()
                    llm.eval(chunk.ids)
                    store[i] = llm.scores[:len(chunk.ids)]
                    bar.update(len(chunk.ids))
        with open_llama(seal_gguf, n_ctx=n_ctx) as llm:
            if llm.n_vocab() != vocab:
                raise InputError(f"{seal_gguf}: llama.cpp reports {llm.n_vocab():,} logits per token, "
                                 f"the base GGUF {base_gguf.name} {vocab:,}")
            if tokenizer is None:
                _check_same_tokens(llm, seal_gguf, base_gguf, documents, prefix, ids)
            with _bar(chunks, seal_gguf.name, progress) as bar:
                for i, chunk in enumerate(chunks):
                    n = len(chunk.ids)
                    llm.reset()
                    llm.eval(chunk.ids)
                    stats.add(store[i][:n - 1], llm.scores[:n - 1], np.asarray(chunk.ids[1:]))
                    bar.update(n)
        del store  # the memory map closes before its folder is removed
    return CostSummary.from_stats(stats)


def llama_tokens(path: Path, documents: Sequence[Document]) -> tuple[list[int], list[list[int]]]:
    """llama.cpp's BOS prefix (or []) and the ids of each document, from the GGUF at path."""
    with open_llama(path, n_ctx=TOKENIZE_CTX, logits_all=False) as llm:
        return _tokenize(llm, documents)


def _tokenize(llm: Any, documents: Sequence[Document]) -> tuple[list[int], list[list[int]]]:
    prefix = list(llm.tokenize(b"", add_bos=True, special=True))
    ids = [list(llm.tokenize(d.text.encode("utf-8"), add_bos=False, special=True)) for d in documents]
    return prefix, ids


def _check_same_tokens(llm: Any, seal: Path, base: Path, documents: Sequence[Document],
                       prefix: list[int], ids: list[list[int]]) -> None:
    theirs_prefix, theirs = _tokenize(llm, documents)
    if theirs_prefix != prefix:
        raise InputError(f"{seal}: llama.cpp starts every text with {theirs_prefix}, the base GGUF "
                         f"{base.name} with {prefix}: not the same model's tokenizer settings")
    for doc, mine, other in zip(documents, ids, theirs, strict=True):
        at = first_token_difference(mine, other)
        if at is not None:
            raise InputError(f"{seal}: llama.cpp tokenizes {doc.name} differently from the base GGUF "
                             f"{base.name}, first at token {at} of {len(mine)}: not the same tokenizer")


def check_same_vocabulary(seal: Path, base: Path) -> None:
    """Raise InputError (naming `seal`) unless both GGUFs list the same tokens in the same order.

    Read from the files' headers; the token strings are parsed only when the bytes differ.
    """
    (seal_header, seal_raw), (base_header, base_raw) = read_model_header(seal), read_model_header(base)
    seal_entry, base_entry = seal_header.kv.get(TOKENS_KEY), base_header.kv.get(TOKENS_KEY)
    if seal_entry is None or base_entry is None:
        if seal_entry is None and base_entry is None:
            return  # neither has a vocabulary of its own: llama.cpp's tokenization check decides
        lacking, other = (seal, base) if seal_entry is None else (base, seal)
        raise InputError(f"{lacking}: no vocabulary ({TOKENS_KEY}) in this GGUF, unlike {other.name}: "
                         f"the two files are not the same model")
    if seal_raw[seal_entry.start:seal_entry.end] == base_raw[base_entry.start:base_entry.end]:
        return
    try:
        mine, theirs = string_array(seal_raw, seal_entry), string_array(base_raw, base_entry)
    except (ValueError, struct.error) as exc:
        raise InputError(f"{seal}: cannot compare its vocabulary with {base.name}'s ({exc})") from None
    if len(mine) != len(theirs):
        raise InputError(f"{seal}: its vocabulary has {len(mine):,} tokens, the base GGUF {base.name}'s "
                         f"{len(theirs):,}: not the same model")
    at = first_token_difference(mine, theirs)
    raise InputError(f"{seal}: its vocabulary differs from the base GGUF {base.name}'s, first at token {at} "
                     f"({mine[at or 0]!r} vs {theirs[at or 0]!r}): not the same model")


# -- shared --

def _check_sizes(ctx: int, max_tokens: int | None) -> None:
    if ctx < MIN_CTX:
        raise InputError(f"the chunk length (ctx) must be at least {MIN_CTX} tokens (got {ctx})")
    if max_tokens is not None and max_tokens < 2:
        raise InputError(f"max_tokens must be at least 2 (got {max_tokens})")


def _chunks(documents: Sequence[Document], ids: Sequence[list[int]], prefix: list[int], ctx: int,
            max_tokens: int | None) -> list[Chunk]:
    if max_tokens is not None:
        share, extra = divmod(max_tokens, len(documents)) if documents else (0, 0)
        ids = [doc_ids[:share + (1 if i < extra else 0)] for i, doc_ids in enumerate(ids)]
    chunks = make_chunks([(d.name, i) for d, i in zip(documents, ids, strict=True)], prefix, ctx)
    if not chunks:
        names = ", ".join(d.name for d in documents) or "no document"
        raise InputError(f"the general text ({names}) gives no position to score after tokenization")
    return chunks


@contextmanager
def _bar(chunks: Sequence[Chunk], desc: str, progress: bool) -> Iterator[tqdm]:
    with tqdm(total=sum(len(c.ids) for c in chunks), unit="tok", desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        yield bar
