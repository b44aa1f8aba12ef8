"""`seal-gguf validate`: the folded checkpoint and its GGUFs against the unfolded model with hooks.

The reference is the original HF model in PyTorch, float32, with the SEAL scales applied by hooks,
run on evaluation text split into chunks of at most `ctx` tokens. Its logits at every position are
kept in a temporary memory-mapped file; each candidate is then run on exactly the same token ids and
compared position by position:
- Level 1, the folded HF checkpoint: max |Δlogit| (float rounding only).
- Level 2, each GGUF in llama.cpp: KL(reference || GGUF) over the whole vocabulary in float64,
  top-1 agreement, and the change in the probability of the text's next token, summarised as
  llama-perplexity's KL-divergence report does. Base GGUFs are compared with the unscaled model.
- Level 3 (optional), retrieval accuracy on generated cases, through evaluate.py.
With a context extension (rope.RopeScaling) every engine runs the extended model: PyTorch loads it
with the extended config, and each GGUF must carry the same extension in its metadata.
Defaults per GGUF type turn the figures into pass / fail, so the command can gate a release.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .architectures import ModelLayout, layout_from_config, read_config
from .constants import CONFIG_FOLD_KEY, GGUF_SEAL_PREFIX, GGUFKeys, ScalesMeta
from .errors import InputError, ValidationFailed
from .fileio import atomic_file, require_file, require_gguf
from .fold import check_not_folded, fold_checkpoint
from .hooks import attach_scales
from .rope import RopeScaling, expected_gguf_keys, extend_config, extension_mismatch, parse_rope_scaling
from .runners import HFRunner
from .scales import SealScales, load_scales

DEFAULT_CTX = 1024
MIN_CTX = 16
# The generated retrieval prompt in the built-in text: a LongEval line-retrieval case this long.
RETRIEVAL_TOKENS = 768
RETRIEVAL_SEED = 0
# Mean-KLD limits by GGUF type; other (lower-bit) types are gated only by --max-kld.
DEFAULT_MAX_MEAN_KLD: dict[str, float] = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-3, "q8_0": 5e-3}
# Types whose top-1 token must agree with the reference at every position.
EXACT_TOP1_TYPES = ("f32",)
# Level 1: max |Δlogit| / max |logit| of the folded checkpoint; float32 rounding stays far below.
MAX_RELATIVE_LOGIT_DIFF = 1e-4
# Rows of the vocabulary-wide float64 comparison done at once (memory, not results).
COMPARE_BLOCK = 32
# HF model_type -> the general.architecture llama.cpp's converter writes for it.
GGML_TYPE_F32 = 0  # KV cache in f32: the figures then measure the weights, not the cache
# llama.cpp reports float metadata with 6 decimals (std::to_string): compared to this relative precision.
METADATA_REL_TOL = 1e-5
CONTEXT_LENGTH_KEY = "context_length"  # after the '{arch}.' prefix, as rope.expected_gguf_keys names it
ROPE_KEY_PREFIX = "rope."


# -- evaluation text --

@dataclass(frozen=True)
class Document:
    name: str
    text: str


def builtin_documents() -> list[Document]:
    """The packaged evaluation texts (prose, notes with numbers and a table, code), in name order."""
    folder = resources.files(__package__).joinpath("evaltext")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    return [Document(f.name, f.read_text(encoding="utf-8")) for f in files]


def retrieval_document(tokenizer: Any, length: int = RETRIEVAL_TOKENS) -> Document:
    """One generated line-retrieval prompt in the model's chat template, followed by its answer."""
    from .data import make_cases

    case = make_cases(tokenizer, "lines", length, 1, RETRIEVAL_SEED)[0]
    return Document(f"lines-{length}", case.prompt + case.answer)


def read_text_document(path: Path) -> Document:
    path = require_file(Path(path), "text file")
    try:
        return Document(path.name, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


# -- tokens and chunks --

@dataclass(frozen=True)
class Chunk:
    document: str
    ids: list[int]


def make_chunks(documents: Sequence[tuple[str, list[int]]], prefix: list[int], ctx: int) -> list[Chunk]:
    """Split each document's ids into chunks of at most ctx tokens, each starting with `prefix`
    (the model's BOS, if any) unless the text itself starts with it. Chunks never cross documents;
    a chunk needs two tokens to score one prediction."""
    chunks: list[Chunk] = []
    for name, ids in documents:
        start = 0
        while start < len(ids):
            own = bool(prefix) and ids[start:start + len(prefix)] == prefix
            room = ctx if own or not prefix else ctx - len(prefix)
            piece = ids[start:start + room]
            chunk = piece if own or not prefix else prefix + piece
            if len(chunk) >= 2:
                chunks.append(Chunk(name, chunk))
            start += room
    return chunks


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where a and b differ (or where one ends); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- pure statistics --

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

    def add(self, ref_logits: np.ndarray, test_logits: np.ndarray, next_ids: np.ndarray) -> None:
        """Compare rows of reference and candidate logits; next_ids[i] is the token after row i."""
        for start in range(0, len(next_ids), COMPARE_BLOCK):
            rows = slice(start, start + COMPARE_BLOCK)
            ref, test = log_softmax64(ref_logits[rows]), log_softmax64(test_logits[rows])
            # KL(ref || test) is >= 0; float64 rounding can leave -1e-17 on identical rows
            self.kld.append(np.maximum((np.exp(ref) * (ref - test)).sum(axis=-1), 0.0))
            self.same_top.append(ref.argmax(axis=-1) == test.argmax(axis=-1))
            picks = np.arange(ref.shape[0]), next_ids[rows]
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
    if limits.exact_top1 and summary.same_top < 1.0:
        missed = round((1.0 - summary.same_top) * summary.tokens)
        failures.append(f"top-1 token differs at {missed} of {summary.tokens} positions (must agree at all)")
    return failures


# -- GGUF metadata --

@dataclass(frozen=True)
class GGUFInfo:
    path: str
    architecture: str
    file_type: str  # f32, f16, bf16, q8_0, q4_k_m, ...
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    head_dim: int | None
    embedding_length: int | None
    vocab_size: int
    seal: dict[str, str]
    rope_keys: dict[str, str]  # context_length and rope.* (after the '{arch}.' prefix): the context extension


def file_type_name(value: int | None) -> str:
    from gguf import LlamaFileType

    if value is None:
        return "unknown"
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"type{value}"
    return name.removeprefix("ALL_").removeprefix("MOSTLY_").lower()


def gguf_info(path: Path, metadata: dict[str, str], n_vocab: int) -> GGUFInfo:
    """The figures that identify a model, from a GGUF's metadata as llama.cpp reports it (strings)."""
    arch = metadata.get("general.architecture", "")

    def number(key: str) -> int | None:
        value = metadata.get(key, "")
        return int(value) if value.isdigit() else None  # absent, or a per-layer array: not compared

    return GGUFInfo(
        path=str(path), architecture=arch, file_type=file_type_name(number("general.file_type")),
        block_count=number(f"{arch}.block_count"), head_count=number(f"{arch}.attention.head_count"),
        head_count_kv=number(f"{arch}.attention.head_count_kv"), head_dim=number(f"{arch}.attention.key_length"),
        embedding_length=number(f"{arch}.embedding_length"), vocab_size=n_vocab,
        seal={k: v for k, v in metadata.items() if k.startswith(GGUF_SEAL_PREFIX)},
        rope_keys={name: v for k, v in metadata.items() if k.startswith(f"{arch}.")
                   and ((name := k.removeprefix(f"{arch}.")) == CONTEXT_LENGTH_KEY or name.startswith(ROPE_KEY_PREFIX))},
    )


def read_gguf_info(path: Path) -> GGUFInfo:
    # llama.cpp's own view of the metadata: gguf's GGUFReader would parse every vocabulary entry
    # (seconds per file), where this needs a handful of numbers.
    path = require_gguf(Path(path))
    with open_llama(path, n_ctx=MIN_CTX, logits_all=False) as llm:
        return gguf_info(path, dict(llm.metadata), llm.n_vocab())


def check_same_model(info: GGUFInfo, config: dict[str, Any], layout: ModelLayout, model_dir: Path) -> None:
    """Refuse a GGUF whose architecture or shape differs from the HF model's."""
    allowed = layout.gguf_architectures
    if info.architecture not in allowed:
        raise InputError(
            f"{info.path} is not a GGUF of {model_dir}: its architecture is {info.architecture!r}, "
            f"a {layout.model_type} model converts to {' or '.join(repr(a) for a in allowed)}"
        )
    want = {
        "layers": (info.block_count, layout.num_layers),
        "attention heads": (info.head_count, layout.num_heads),
        "KV heads": (info.head_count_kv, config.get("num_key_value_heads", layout.num_heads)),
        "head size": (info.head_dim, layout.head_dim),
        "hidden size": (info.embedding_length, config.get("hidden_size")),
        "vocabulary": (info.vocab_size, config.get("vocab_size")),
    }
    wrong = [f"{what} {got} vs {expected}" for what, (got, expected) in want.items()
             if got is not None and expected is not None and got != expected]
    if wrong:
        raise InputError(f"{info.path} is not a GGUF of {model_dir} (GGUF vs config.json: {', '.join(wrong)})")


def seal_warnings(info: GGUFInfo, scales: SealScales | None) -> list[str]:
    """What the GGUF's seal.* keys say about the scales folded into it (the figures decide)."""
    name = Path(info.path).name
    if scales is None:
        if info.seal:
            return [f"{name} carries SEAL scales (seal.* keys) but is given as a base GGUF"]
        return []
    if not info.seal:
        return [f"{name} has no seal.* keys: it does not record which scales were folded into it"]
    recorded = info.seal.get(GGUFKeys.SCALES_SHA256)
    if recorded and scales.sha256 and recorded != scales.sha256:
        return [f"{name} records scales sha256 {str(recorded)[:12]}..., the scales file is {scales.sha256[:12]}..."]
    return []


# -- the context extension --

def _same_value(want: Any, text: str | None) -> bool:
    if text is None:
        return False
    try:
        if isinstance(want, float):
            return math.isclose(want, float(text), rel_tol=METADATA_REL_TOL)
        if isinstance(want, int):
            return int(text) == want
    except ValueError:
        return False
    return text == str(want)


def extension_differences(info: GGUFInfo, config: dict[str, Any], scaling: RopeScaling) -> list[str]:
    """'key = value (expected ...)' for each key the GGUF of the model extended by `scaling` has and
    this GGUF lacks or gives another value."""
    want = expected_gguf_keys(config, scaling)
    return [f"{name} = {info.rope_keys.get(name, 'missing')} (expected {value})" for name, value in want.items()
            if not _same_value(value, info.rope_keys.get(name))]


def stretched_context(info: GGUFInfo, config: dict[str, Any]) -> tuple[int, int] | None:
    """(GGUF context_length, config max_position_embeddings) when the GGUF's is the longer: every
    extension stretches it. The scaling keys alone say nothing (a model whose own config is scaled
    converts with them)."""
    native, context = config.get("max_position_embeddings"), info.rope_keys.get(CONTEXT_LENGTH_KEY, "")
    if isinstance(native, int) and context.isdigit() and int(context) > native:
        return int(context), native
    return None


def carried_extension(info: GGUFInfo, config: dict[str, Any]) -> RopeScaling | None:
    """The extension this model was converted with to give the GGUF's keys; None when it has none,
    or none that --rope-scaling options reproduce."""
    stretched = stretched_context(info, config)
    if stretched is None:
        return None
    context, native = stretched
    kind = info.rope_keys.get("rope.scaling.type")
    try:
        if kind in ("linear", "yarn"):
            factor = float(info.rope_keys.get("rope.scaling.factor", "nan"))
            original = info.rope_keys.get("rope.scaling.original_context_length")
            candidate = RopeScaling(kind, factor, int(original) if original else round(context / factor))
        else:  # ntk leaves no type: only the longer context and the raised base tell
            candidate = RopeScaling("ntk", context / native, native)
        return None if extension_differences(info, config, candidate) else candidate
    except (InputError, ValueError):  # no valid factor, or a model that cannot take this extension
        return None


def rope_option_text(scaling: RopeScaling, config: dict[str, Any]) -> str:
    """The command-line options that give `scaling` for this model."""
    text = f"--rope-scaling {scaling.kind} --rope-factor {scaling.factor:g}"
    if scaling.original_context != config.get("max_position_embeddings"):
        text += f" --rope-original-context {scaling.original_context}"
    return text


def check_extension(info: GGUFInfo, config: dict[str, Any], rope: RopeScaling | None) -> None:
    """Refuse a GGUF whose context extension is not `rope` (None: the model's own context): llama.cpp
    runs a GGUF with the extension its metadata carries, and the reference must be that model."""
    name = Path(info.path).name
    carried = carried_extension(info, config)
    stretched = stretched_context(info, config)
    if rope is None:
        if stretched is None:
            return
        how = (f"pass {rope_option_text(carried, config)}" if carried is not None
               else "pass the --rope-scaling options it was converted with")
        raise InputError(f"{name} carries a RoPE context extension (context_length {stretched[0]}, the model's "
                         f"max_position_embeddings {stretched[1]}); validate it against the model extended the "
                         f"same way: {how}")
    wrong = extension_differences(info, config, rope)
    if wrong:
        was = (f"; it was converted with {rope_option_text(carried, config)}" if carried is not None
               else "; it was converted without --rope-scaling" if stretched is None else "")
        raise InputError(f"{name} does not carry the {rope} RoPE context extension given ({'; '.join(wrong)}){was}")


# -- engines --

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


@contextmanager
def open_llama(path: Path, n_ctx: int, logits_all: bool = True) -> Iterator[Any]:
    # Not vocab_only even for tokenizing, and swa_full off (same results for one sequence): either
    # makes llama.cpp log warnings on stderr.
    from llama_cpp import Llama

    try:
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                    type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, swa_full=False, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"{path}: llama.cpp cannot load this GGUF ({str(exc).strip() or type(exc).__name__})") from None
    try:
        yield llm
    finally:
        llm.close()


def _token_texts(decode: Any, ids: Sequence[int]) -> str:
    return " ".join(repr(decode(i)) for i in ids)


def tokenization_difference(path: Path, tokenizer: Any, documents: Sequence[Document],
                            hf_ids: Sequence[list[int]], hf_prefix: list[int]) -> str | None:
    """Where llama.cpp turns the text into other ids than transformers (first difference), or None."""
    with open_llama(path, n_ctx=MIN_CTX, logits_all=False) as llm:
        def llama_text(i: int) -> str:
            return llm.detokenize([i], special=True).decode("utf-8", errors="replace")

        def hf_text(i: int) -> str:
            return tokenizer.decode([i])

        llama_prefix = llm.tokenize(b"", add_bos=True, special=True)
        if llama_prefix != hf_prefix:
            return (f"{path.name}: llama.cpp starts every text with {llama_prefix} "
                    f"({_token_texts(llama_text, llama_prefix) or 'nothing'}), transformers with {hf_prefix} "
                    f"({_token_texts(hf_text, hf_prefix) or 'nothing'}): the GGUF's BOS setting is not the model's")
        for doc, ids in zip(documents, hf_ids, strict=True):
            theirs = llm.tokenize(doc.text.encode("utf-8"), add_bos=False, special=True)
            at = first_difference(ids, theirs)
            if at is not None:
                lo = max(0, at - 3)
                return (f"{path.name}: llama.cpp tokenizes {doc.name} differently from transformers, first at "
                        f"token {at} of {len(ids)}: transformers {_token_texts(hf_text, ids[lo:at])} | "
                        f"{_token_texts(hf_text, ids[at:at + 4])}, llama.cpp "
                        f"{_token_texts(llama_text, theirs[lo:at])} | {_token_texts(llama_text, theirs[at:at + 4])}")
    return None


def gguf_stats(path: Path, chunks: Sequence[Chunk], store: LogitStore, vocab: int, progress: bool) -> KLSummary:
    stats = PositionStats()
    with open_llama(path, n_ctx=max(len(c.ids) for c in chunks)) as llm:
        if llm.n_vocab() != vocab:
            raise InputError(f"{path}: llama.cpp reports {llm.n_vocab()} logits per token, the model {vocab}")
        with _bar(chunks, path.name, progress) as bar:
            for i, chunk in enumerate(chunks):
                llm.reset()
                llm.eval(chunk.ids)
                n = len(chunk.ids)
                stats.add(store[i][:n - 1], llm.scores[:n - 1], np.asarray(chunk.ids[1:]))
                bar.update(n)
    return summarize_positions(stats)


@contextmanager
def _bar(chunks: Sequence[Chunk], desc: str, progress: bool) -> Iterator[tqdm]:
    with tqdm(total=sum(len(c.ids) for c in chunks), unit="tok", desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        yield bar


# -- the report --

@dataclass(frozen=True)
class FoldedResult:
    """Level 1: the folded HF checkpoint against the reference."""

    path: str  # "(temporary)" when validate folded it
    max_abs_diff: float
    max_abs_logit: float
    relative: float
    failures: list[str]


@dataclass(frozen=True)
class GGUFResult:
    role: str  # "seal" (against the reference with scales) or "base" (against the unscaled model)
    info: GGUFInfo
    summary: KLSummary
    limits: Limits
    failures: list[str]


@dataclass
class ValidationReport:
    model_dir: str
    scales: str
    scales_sha256: str | None
    granularity: str
    ctx: int
    documents: list[tuple[str, int]]  # name, tokens
    chunks: int
    rope_scaling: str | None = None  # the context extension every engine ran (RopeScaling.spec()); None: none
    folded: FoldedResult | None = None
    ggufs: list[GGUFResult] = field(default_factory=list)
    retrieval: Any = None  # evaluate.EvalReport
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        out = [f"folded checkpoint: {f}" for f in (self.folded.failures if self.folded else [])]
        out += [f"{Path(g.info.path).name}: {f}" for g in self.ggufs for f in g.failures]
        return out

    def to_dict(self) -> dict[str, Any]:
        from .evaluate import report_to_json

        data = asdict(self)
        data["retrieval"] = report_to_json(self.retrieval) if self.retrieval is not None else None
        data["failures"] = self.failures
        data["passed"] = not self.failures
        return data


def write_report_json(path: Path, report: ValidationReport, force: bool = False) -> None:
    with atomic_file(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")


def raise_for_failures(report: ValidationReport) -> None:
    if report.failures:
        raise ValidationFailed(f"validation failed: {'; '.join(report.failures)}")


# -- the whole run --

def validate(
    model_dir: Path,
    scales_path: Path,
    ggufs: Sequence[Path] = (),
    base_ggufs: Sequence[Path] = (),
    folded: Path | None = None,
    text: Path | None = None,
    ctx: int = DEFAULT_CTX,
    max_kld: float | None = None,
    task: str | None = None,
    length: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    allow_token_mismatch: bool = False,
    progress: bool = True,
    rope: RopeScaling | None = None,
) -> ValidationReport:
    """Run every level; the report holds the figures and the failures (nothing is raised for them).

    rope: a context extension the model runs with in every engine; each GGUF must carry it.
    """
    model_dir, scales_path = Path(model_dir), Path(scales_path)
    ggufs, base_ggufs = [Path(g) for g in ggufs], [Path(g) for g in base_ggufs]
    if ctx < MIN_CTX:
        raise InputError(f"--ctx must be at least {MIN_CTX} tokens (got {ctx})")
    if max_kld is not None and not max_kld > 0:
        raise InputError(f"--max-kld must be > 0 (got {max_kld})")
    if task is not None and (not length or not samples):
        raise InputError("--task needs --length and --samples")
    config = read_config(model_dir)
    layout = layout_from_config(config, model_dir / "config.json")
    check_not_folded(config, str(model_dir), force=False, remedy="validate against the original, unfolded model")
    scales = load_scales(scales_path, layout)
    if rope is not None:  # a model that cannot take the extension fails now, not after the reference
        rope = rope.resolved(config, str(model_dir / "config.json"))
        extend_config(config, rope, str(model_dir / "config.json"))
    if folded is not None:
        folded_config = read_config(Path(folded))
        if rope is not None:
            extend_config(folded_config, rope, str(Path(folded) / "config.json"))

    if len({g.resolve() for g in [*ggufs, *base_ggufs]}) < len(ggufs) + len(base_ggufs):
        raise InputError("the same GGUF is listed twice")
    # Every GGUF is checked to be this model before any logits are computed.
    infos = {g: read_gguf_info(g) for g in [*ggufs, *base_ggufs]}
    mismatch = extension_mismatch(scales.metadata.get(ScalesMeta.ROPE_SCALING), rope)
    warnings = [mismatch] if mismatch else []
    for g, info in infos.items():
        check_same_model(info, config, layout, model_dir)
        check_extension(info, config, rope)
        warnings += seal_warnings(info, scales if g in ggufs else None)

    runner = HFRunner(model_dir, rope=rope)  # float32, no hooks: scales are attached per pass below
    tokenizer = runner.tokenizer
    documents = [read_text_document(text)] if text else [*builtin_documents(), retrieval_document(tokenizer)]
    if task is not None:
        from .data import make_cases

        make_cases(tokenizer, task, int(length or 0), 1, seed)  # a bad --length fails now, not after Level 2
    hf_ids = [list(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in documents]
    prefix = runner.tokenize("")
    for g in infos:
        difference = tokenization_difference(g, tokenizer, documents, hf_ids, prefix)
        if difference and not allow_token_mismatch:
            raise ValidationFailed(difference)
        if difference:
            warnings.append(f"{difference}; both engines are given transformers' ids")
    chunks = make_chunks([(d.name, ids) for d, ids in zip(documents, hf_ids, strict=True)], prefix, ctx)
    if not chunks:
        raise InputError("the evaluation text is empty after tokenization")
    vocab = runner.model.get_output_embeddings().weight.shape[0]

    report = ValidationReport(
        str(model_dir), str(scales_path), scales.sha256, scales.granularity, ctx,
        [(d.name, len(ids)) for d, ids in zip(documents, hf_ids, strict=True)], len(chunks),
        rope_scaling=rope.spec() if rope else None, warnings=warnings,
    )
    with tempfile.TemporaryDirectory(prefix="seal-validate-") as tmp_name:
        tmp = Path(tmp_name)
        scaled = LogitStore(tmp, "reference", chunks, vocab)
        unscaled = LogitStore(tmp, "base", chunks, vocab) if base_ggufs else None
        with _bar(chunks, "reference", progress) as bar:
            for i, chunk in enumerate(chunks):
                with attach_scales(runner.model, layout, scales.values):
                    scaled[i] = torch_logits(runner.model, chunk.ids)
                if unscaled is not None:
                    unscaled[i] = torch_logits(runner.model, chunk.ids)
                bar.update(len(chunk.ids))
        runner.close()

        report.folded = _level1(model_dir, scales_path, scales, folded, chunks, scaled, tmp, progress, warnings,
                                rope)
        for g in ggufs:
            report.ggufs.append(_level2("seal", infos[g], chunks, scaled, vocab, max_kld, progress))
        for g in base_ggufs if unscaled is not None else []:
            report.ggufs.append(_level2("base", infos[g], chunks, unscaled, vocab, max_kld, progress))

    if task is not None:
        from .evaluate import evaluate

        # The hooked reference first: every GGUF, SEAL or base, is paired with it case by case.
        report.retrieval = evaluate([model_dir, *ggufs, *base_ggufs], task, [int(length or 0)],
                                    int(samples or 0), seed, scales=scales_path, progress=progress, rope=rope)
    return report


def _level1(model_dir: Path, scales_path: Path, scales: SealScales, folded: Path | None,
            chunks: Sequence[Chunk], reference: LogitStore, tmp: Path, progress: bool,
            warnings: list[str], rope: RopeScaling | None) -> FoldedResult:
    if folded is None:
        folded_dir = fold_checkpoint(model_dir, scales_path, tmp / "folded", progress=progress).out_dir
    else:
        folded_dir = Path(folded)
        record = read_config(folded_dir).get(CONFIG_FOLD_KEY)
        if not record:
            warnings.append(f"{folded_dir} has no {CONFIG_FOLD_KEY} record in config.json: not folded by seal-gguf")
        elif record.get("scales_sha256") != scales.sha256:
            warnings.append(f"{folded_dir} records scales sha256 {str(record.get('scales_sha256'))[:12]}..., "
                            f"the scales file is {str(scales.sha256)[:12]}...")
    runner = HFRunner(folded_dir, rope=rope)
    max_diff = max_logit = 0.0
    try:
        with _bar(chunks, "folded", progress) as bar:
            for i, chunk in enumerate(chunks):
                ref = reference[i]
                got = torch_logits(runner.model, chunk.ids)
                if got.shape != ref.shape:
                    raise InputError(f"{folded_dir}: {got.shape[-1]} logits per token, the model has {ref.shape[-1]}")
                max_diff = max(max_diff, float(np.abs(got - ref).max()))
                max_logit = max(max_logit, float(np.abs(ref).max()))
                bar.update(len(chunk.ids))
    finally:
        runner.close()
    relative = max_diff / max_logit if max_logit else max_diff
    failures = ([f"max |Δlogit| {max_diff:.3g} is {relative:.2g} of max |logit|, more than {MAX_RELATIVE_LOGIT_DIFF:g}"]
                if relative > MAX_RELATIVE_LOGIT_DIFF else [])
    return FoldedResult(str(folded) if folded else "(temporary)", max_diff, max_logit, relative, failures)


def _level2(role: str, info: GGUFInfo, chunks: Sequence[Chunk], reference: LogitStore, vocab: int,
            max_kld: float | None, progress: bool) -> GGUFResult:
    summary = gguf_stats(Path(info.path), chunks, reference, vocab, progress)
    limits = limits_for(info.file_type, max_kld)
    # A base GGUF is context, not the product: its figures are shown, never gated.
    failures = check_limits(summary, limits) if role == "seal" else []
    return GGUFResult(role, info, summary, limits, failures)


# -- the table --

def _percent(x: float) -> str:
    return f"{100 * x:.3f}%"


def _kld(x: float) -> str:
    return f"{x:.6f}" if x >= 1e-4 else f"{x:.2e}"


def format_report(report: ValidationReport) -> str:
    """The plain-text report: text, Level 1, the Level 2 table (one column per GGUF), Level 3."""
    tokens = sum(n for _, n in report.documents)
    out = [
        f"Reference: {report.model_dir} in PyTorch (float32) with {report.scales} "
        f"({report.granularity} scales) applied by hooks",
        f"Text: {', '.join(f'{name} ({n})' for name, n in report.documents)}: {tokens} tokens in "
        f"{report.chunks} chunks of at most {report.ctx}",
        _extension_line(report.rope_scaling),
        "",
    ]
    if report.folded:
        f = report.folded
        status = "FAIL" if f.failures else "ok"
        out.append(f"Level 1, folded checkpoint {f.path}: max |Δlogit| {f.max_abs_diff:.3g} "
                   f"(max |logit| {f.max_abs_logit:.3g}, ratio {f.relative:.2g}, limit {MAX_RELATIVE_LOGIT_DIFF:g})"
                   f"  {status}")
    if report.ggufs:
        out += ["", "Level 2, GGUF in llama.cpp vs PyTorch on the same tokens "
                    "(seal: vs the model with scales; base: vs the model without)"]
        out += _grid(_level2_rows(report.ggufs))
    if report.retrieval is not None:
        from .evaluate import render_table

        out += ["", "Level 3, retrieval", render_table(report.retrieval)]
    out += ["", "PASSED" if not report.failures else f"FAILED: {len(report.failures)} check(s)"]
    return "\n".join(out)


def _extension_line(spec: str | None) -> str:
    if spec is None:
        return "Context extension: none (the model's own RoPE)"
    s = parse_rope_scaling(spec)
    return (f"Context extension: {s.kind} RoPE scaling x{s.factor:g} ({spec}): {s.original_context} -> "
            f"{s.extended_context} tokens, in PyTorch and in every GGUF")


def _level2_rows(results: Sequence[GGUFResult]) -> list[list[str]]:
    def limit(r: GGUFResult) -> str:
        parts = [f"≤ {r.limits.max_mean_kld:g}"] if r.limits.max_mean_kld is not None else []
        if r.limits.exact_top1:
            parts.append("top 100%")
        return ", ".join(parts) if parts else "none"

    def verdict(r: GGUFResult) -> str:
        if r.role == "base":
            return "(not gated)"
        return "FAIL" if r.failures else "ok"

    def versus_base(r: GGUFResult) -> str:
        base = next((b for b in results if b.role == "base" and b.info.file_type == r.info.file_type), None)
        if r.role != "seal" or base is None or base.summary.mean_kld == 0:
            return ""
        return f"{r.summary.mean_kld / base.summary.mean_kld:.2f}x"

    s = [r.summary for r in results]
    rows = [
        ["", *(Path(r.info.path).name for r in results)],
        ["role / type", *(f"{r.role} {r.info.file_type}" for r in results)],
        ["tokens scored", *(str(x.tokens) for x in s)],
        ["PPL(reference)", *(f"{x.ppl_ref:.4f}" for x in s)],
        ["PPL(GGUF)", *(f"{x.ppl_test:.4f}" for x in s)],
        ["Mean KLD", *(f"{_kld(x.mean_kld)} ± {_kld(x.mean_kld_stderr)}" for x in s)],
        ["Maximum KLD", *(_kld(x.max_kld) for x in s)],
        ["99.9% KLD", *(_kld(x.p999_kld) for x in s)],
        ["99.0% KLD", *(_kld(x.p99_kld) for x in s)],
        ["Median KLD", *(_kld(x.median_kld) for x in s)],
        ["Mean Δp", *(_percent(x.mean_dp) for x in s)],
        ["RMS Δp", *(_percent(x.rms_dp) for x in s)],
        ["Max |Δp|", *(_percent(x.max_abs_dp) for x in s)],
        ["Same top p", *(f"{_percent(x.same_top)} ± {_percent(x.same_top_stderr)}" for x in s)],
        ["limit (mean KLD)", *(limit(r) for r in results)],
        ["result", *(verdict(r) for r in results)],
    ]
    ratios = [versus_base(r) for r in results]
    if any(ratios):  # folding's own cost: mean KLD over the base GGUF's of the same type
        rows.insert(6, ["Mean KLD / base", *ratios])
    return rows


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]
