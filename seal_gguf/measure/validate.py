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
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from seal_gguf.constants import CONFIG_FOLD_KEY, ScalesMeta
from seal_gguf.errors import InputError, ValidationFailed
from seal_gguf.fileio import atomic_file
from seal_gguf.fold.hf import fold_checkpoint
from seal_gguf.gguffile.llama import open_llama
from seal_gguf.kld import (
    BASE_KLD_FACTOR,
    KLSummary,
    Limits,
    LogitStore,
    PositionStats,
    check_limits,
    limits_for,
    summarize_positions,
    torch_logits,
)
from seal_gguf.measure import general as general_cost
from seal_gguf.measure.identity import (
    MIN_CTX,
    GGUFInfo,
    check_extension,
    check_same_model,
    read_gguf_info,
    seal_warnings,
    tokenization_difference,
)
from seal_gguf.measure.runners import HFRunner
from seal_gguf.measure.texts import builtin_documents, general_documents, retrieval_document
from seal_gguf.model.architectures import ModelLayout, layout_from_config, read_config
from seal_gguf.model.checkpoint import (
    check_base_fingerprint,
    check_not_folded,
    locate_o_proj,
    read_headers,
    read_tensor,
)
from seal_gguf.model.hooks import attach_scales
from seal_gguf.model.rope import (
    RopeScaling,
    extend_config,
    extension_mismatch,
)
from seal_gguf.scales import SealScales, load_scales
from seal_gguf.texts import Chunk, make_chunks, read_text_document

DEFAULT_CTX = 1024
# Level 1: max |Δlogit| / max |logit| of the folded checkpoint. The floor: float32 arithmetic in another
# order stays far below it. A checkpoint stored in float16 or bfloat16 rounds every folded weight to
# that type, which costs far more (bf16: ~4e-3 on a tiny llama): the limit is then NOISE_FACTOR times
# what the same rounding costs the model (rounding_noise), measured on the same chunks.
MAX_RELATIVE_LOGIT_DIFF = 1e-4
NOISE_FACTOR = 4.0
# The rounding noise is measured with o_proj times this constant (not a power of two: that would round
# nothing), rounded to the stored type, and divided back: the rounding a fold does, with no head
# mapping in it that a mis-fold could share.
NOISE_SCALE = 4.0 / 3.0
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# -- engines --

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
    dtype: str = "F32"  # how the folded o_proj weights are stored
    noise_relative: float = 0.0  # what rounding the model's weights to that dtype costs, same measure
    limit: float = MAX_RELATIVE_LOGIT_DIFF  # max(MAX_RELATIVE_LOGIT_DIFF, NOISE_FACTOR * noise_relative)


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
    general: list[general_cost.GeneralCost] = field(default_factory=list)  # what SEAL costs on general text

    @property
    def failures(self) -> list[str]:
        out = [f"folded checkpoint: {f}" for f in (self.folded.failures if self.folded else [])]
        out += [f"{Path(g.info.path).name}: {f}" for g in self.ggufs for f in g.failures]
        return out

    def to_dict(self) -> dict[str, Any]:
        from seal_gguf.measure.evaluate import report_to_json

        data = asdict(self)
        data["retrieval"] = report_to_json(self.retrieval) if self.retrieval is not None else None
        data["failures"] = self.failures
        data["passed"] = not self.failures
        return data


def write_validation_json(path: Path, report: ValidationReport, force: bool = False) -> None:
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
    general_text: Path | None = None,
    general_tokens: int = general_cost.GENERAL_TOKENS,
) -> ValidationReport:
    """Run every level; the report holds the figures and the failures (nothing is raised for them).

    rope: a context extension the model runs with in every engine; each GGUF must carry it.
    general_text, general_tokens: what SEAL costs (seal_gguf.measure.general) is measured on this
    UTF-8 file (default: the built-in general text, never used for training), at most this many
    tokens (0: not measured): hooked vs unhooked in PyTorch, and each SEAL GGUF vs the base GGUF of
    its type in llama.cpp. Reported beside the fidelity figures, not gated.
    """
    model_dir, scales_path = Path(model_dir), Path(scales_path)
    ggufs, base_ggufs = [Path(g) for g in ggufs], [Path(g) for g in base_ggufs]
    if ctx < MIN_CTX:
        raise InputError(f"--ctx must be at least {MIN_CTX} tokens (got {ctx})")
    if max_kld is not None and not max_kld > 0:
        raise InputError(f"--max-kld must be > 0 (got {max_kld})")
    if task is not None and (not length or not samples):
        raise InputError("--task needs --length and --samples")
    if general_tokens < 0 or 0 < general_tokens < MIN_CTX:
        raise InputError(f"--general-tokens must be 0 (off) or at least {MIN_CTX} (got {general_tokens})")
    general_docs = ([read_text_document(general_text)] if general_text else general_documents()) \
        if general_tokens else []
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
    # scales learned on another checkpoint validate as well as their own (the reference applies them
    # to this model): said, not refused, since validate measures whatever it is given
    header, entry = locate_o_proj(read_headers(model_dir), layout)[0]
    other = check_base_fingerprint(scales.metadata.get(ScalesMeta.BASE_FINGERPRINT),
                                   read_tensor(entry, header.path), scales_path, model_dir, force=True)
    warnings += [other] if other else []
    for g, info in infos.items():
        check_same_model(info, config, layout, model_dir)
        check_extension(info, config, rope)
        warnings += seal_warnings(info, scales if g in ggufs else None)

    runner = HFRunner(model_dir, rope=rope)  # float32, no hooks: scales are attached per pass below
    tokenizer = runner.tokenizer
    documents = [read_text_document(text)] if text else [*builtin_documents(), retrieval_document(tokenizer)]
    if task is not None:
        from seal_gguf.tasks import make_cases

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
        if general_docs:  # before rounding_noise, which rounds the model's weights in place
            cost = general_cost.cost_pytorch(runner.model, layout, scales.values, tokenizer, general_docs,
                                             ctx=min(ctx, general_cost.DEFAULT_CTX), max_tokens=general_tokens,
                                             progress=progress)
            report.general.append(general_cost.GeneralCost(
                "pytorch", f"{model_dir.name} + {scales_path.name}", model_dir.name, "float32", cost))
        dtype = stored_dtype(folded if folded is not None else model_dir, layout)
        try:
            noise = rounding_noise(runner.model, layout, scales, dtype, chunks, scaled, progress)
        finally:
            runner.close()

        report.folded = _level1(model_dir, scales_path, scales, folded, chunks, scaled, tmp, progress, warnings,
                                rope, dtype, noise)
        seal_results = [_level2("seal", infos[g], chunks, scaled, vocab, progress) for g in ggufs]
        base_results = [] if unscaled is None else [_level2("base", infos[g], chunks, unscaled, vocab, progress)
                                                    for g in base_ggufs]
        report.ggufs = [gate(r, max_kld, base_results) for r in seal_results] + base_results
    pairs = general_cost.pair_by_type([(g, infos[g].file_type) for g in ggufs],
                                      [(g, infos[g].file_type) for g in base_ggufs])
    for seal_gguf, base_gguf, file_type in pairs if general_docs else []:
        cost = general_cost.cost_gguf(seal_gguf, base_gguf, general_docs, ctx=min(ctx, general_cost.DEFAULT_CTX),
                                      max_tokens=general_tokens, progress=progress)
        report.general.append(general_cost.GeneralCost("llama.cpp", seal_gguf.name, base_gguf.name, file_type,
                                                       cost))

    if task is not None:
        from seal_gguf.measure.evaluate import evaluate

        # The hooked reference first: every GGUF, SEAL or base, is paired with it case by case.
        report.retrieval = evaluate([model_dir, *ggufs, *base_ggufs], task, [int(length or 0)],
                                    int(samples or 0), seed, scales=scales_path, progress=progress, rope=rope)
    return report


def stored_dtype(model_dir: Path, layout: ModelLayout) -> str:
    """The safetensors dtype the (folded) checkpoint stores o_proj in: F32, F16 or BF16."""
    entries = {entry.dtype for _, entry in locate_o_proj(read_headers(Path(model_dir)), layout).values()}
    if len(entries) != 1 or next(iter(entries)) not in STORED_DTYPES:
        raise InputError(f"{model_dir}: o_proj weights stored as {', '.join(sorted(entries))}; validate compares "
                         "F32, F16 or BF16 checkpoints")
    return next(iter(entries))


def rounding_noise(model: Any, layout: ModelLayout, scales: SealScales, dtype: str, chunks: Sequence[Chunk],
                   reference: LogitStore, progress: bool) -> float:
    """max |Δlogit| / max |logit| that storing the model in `dtype` costs a correct fold: every weight
    rounded to dtype (a no-op for a checkpoint already stored so), each o_proj as a fold rounds it
    (times NOISE_SCALE, rounded, divided back), then run with the scales' hooks like the reference.
    Changes the model's weights in place: the caller closes it afterwards."""
    if dtype == "F32":
        return 0.0  # the float32 floor MAX_RELATIVE_LOGIT_DIFF covers it
    target = STORED_DTYPES[dtype]
    o_proj = {id(model.get_submodule(layout.o_proj_module(layer)).weight) for layer in range(layout.num_layers)}
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_floating_point():
                continue
            if id(param) in o_proj:
                param.copy_((param * NOISE_SCALE).to(target).float() / NOISE_SCALE)
            else:
                param.copy_(param.to(target).float())
    max_diff = max_logit = 0.0
    with _bar(chunks, f"{dtype.lower()} rounding", progress) as bar:
        for i, chunk in enumerate(chunks):
            with attach_scales(model, layout, scales.values):
                got = torch_logits(model, chunk.ids)
            ref = reference[i]
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            max_logit = max(max_logit, float(np.abs(ref).max()))
            bar.update(len(chunk.ids))
    return max_diff / max_logit if max_logit else max_diff


def _level1(model_dir: Path, scales_path: Path, scales: SealScales, folded: Path | None,
            chunks: Sequence[Chunk], reference: LogitStore, tmp: Path, progress: bool,
            warnings: list[str], rope: RopeScaling | None, dtype: str = "F32", noise: float = 0.0) -> FoldedResult:
    if folded is None:
        # force: the model was checked to be unfolded, the folder is new, and another checkpoint's
        # base_fingerprint is already among the warnings
        folded_dir = fold_checkpoint(model_dir, scales_path, tmp / "folded", force=True, progress=progress).out_dir
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
    limit = max(MAX_RELATIVE_LOGIT_DIFF, NOISE_FACTOR * noise)
    why = (f" ({NOISE_FACTOR:g} x the {noise:.2g} that rounding the model to {dtype} costs)"
           if limit > MAX_RELATIVE_LOGIT_DIFF else "")
    failures = ([f"max |Δlogit| {max_diff:.3g} is {relative:.2g} of max |logit|, more than {limit:.2g}{why}"]
                if not relative <= limit else [])
    return FoldedResult(str(folded) if folded else "(temporary)", max_diff, max_logit, relative, failures,
                        dtype, noise, limit)


def _level2(role: str, info: GGUFInfo, chunks: Sequence[Chunk], reference: LogitStore, vocab: int,
            progress: bool) -> GGUFResult:
    summary = gguf_stats(Path(info.path), chunks, reference, vocab, progress)
    return GGUFResult(role, info, summary, Limits(None, False), [])


def gate(result: GGUFResult, max_kld: float | None, bases: Sequence[GGUFResult]) -> GGUFResult:
    """A SEAL GGUF's limits, and its failures. A base GGUF of the same type, given with --base-gguf,
    calibrates the mean-KLD limit to this model's own figures: a fold is held to what the same type
    costs the base model (BASE_KLD_FACTOR times), never to less than the type's default."""
    limits = limits_for(result.info.file_type, max_kld)
    same_type = [b.summary.mean_kld for b in bases if b.info.file_type == result.info.file_type]
    if limits.max_mean_kld is not None and same_type:
        limits = Limits(max(limits.max_mean_kld, BASE_KLD_FACTOR * max(same_type)), limits.exact_top1)
    return GGUFResult(result.role, result.info, result.summary, limits, check_limits(result.summary, limits))
