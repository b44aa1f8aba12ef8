"""Retrieval accuracy of several models on the same generated cases, with intervals and paired tests.

The cases are generated once per length with the first model's tokenizer; every model (GGUF in
llama.cpp, HF folder in PyTorch) answers exactly those prompts, greedily. Accuracy carries a 95%
Wilson interval; the first model is compared with each other one case by case (exact McNemar).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from seal_gguf.cases import TASKS, Case, score_answer
from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_file, require_gguf
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.gguffile.split import read_gguf_parts
from seal_gguf.measure.general import GeneralCost, describe_costs, general_costs
from seal_gguf.measure.runners import open_runner
from seal_gguf.model.architectures import model_layout, read_config
from seal_gguf.model.loading import load_tokenizer
from seal_gguf.model.rope import RopeScaling, extend_config
from seal_gguf.scales import load_scales
from seal_gguf.tasks import make_cases
from seal_gguf.texts import grid, read_text_document

Z95 = 1.959963984540054  # two-sided 95% normal quantile
NIAH_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
# Room beyond the longest case: the answer tokens, plus slack for a tokenizer that splits the
# same text into a few more tokens than the one that generated the cases.
N_CTX_SLACK = 64


@dataclass(frozen=True)
class CaseResult:
    model: str
    length: int  # the case's length in tokens (the generating tokenizer's count)
    depth: float | None
    index: int  # position of the case within its length
    expected: str
    given: str  # the model's greedy continuation of the prompt
    correct: bool
    prompt_tokens: int  # the prompt's length in this model's own tokenization
    seconds: float


@dataclass(frozen=True)
class Accuracy:
    model: str
    length: int
    depth: float | None  # None: all depths together
    correct: int
    total: int
    accuracy: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Paired:
    """The first model (a) against another (b) on the same cases."""

    model_a: str
    model_b: str
    length: int | None  # None: all lengths together
    both: int
    a_only: int
    b_only: int
    neither: int
    p_value: float  # exact McNemar (two-sided sign test on the discordant cases)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    engine: str  # "llama.cpp" or "pytorch"
    scales: str | None
    n_ctx: int | None
    seconds_per_case: float
    token_mismatches: int  # prompts this model tokenizes to a length other than the case's
    rope_scaling: str | None = None  # the context extension PyTorch applied (a GGUF carries its own)


@dataclass
class EvalReport:
    task: str
    lengths: list[int]
    samples: int
    seed: int
    depths: list[float] | None
    max_tokens: int
    models: list[ModelInfo] = field(default_factory=list)
    accuracy: list[Accuracy] = field(default_factory=list)
    paired: list[Paired] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    general: list[GeneralCost] = field(default_factory=list)  # with general_tokens: what SEAL costs

    def cell(self, model: str, length: int, depth: float | None = None) -> Accuracy:
        for acc in self.accuracy:
            if (acc.model, acc.length, acc.depth) == (model, length, depth):
                return acc
        raise KeyError((model, length, depth))


# -- statistics --

def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1.0 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # the ends are exact at k = 0 and k = n; rounding would otherwise leave them a hair off
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == total else min(1.0, center + half)
    return low, high


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a sign test on the cases only one model gets right."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def accuracy_of(model: str, length: int, depth: float | None, results: Sequence[CaseResult]) -> Accuracy:
    total = len(results)
    correct = sum(r.correct for r in results)
    low, high = wilson_interval(correct, total)
    return Accuracy(model, length, depth, correct, total, correct / total if total else 0.0, low, high)


def paired(model_a: str, model_b: str, length: int | None, a: Sequence[CaseResult],
           b: Sequence[CaseResult]) -> Paired:
    pairs = list(zip(a, b, strict=True))
    both = sum(x.correct and y.correct for x, y in pairs)
    a_only = sum(x.correct and not y.correct for x, y in pairs)
    b_only = sum(y.correct and not x.correct for x, y in pairs)
    return Paired(model_a, model_b, length, both, a_only, b_only, len(pairs) - both - a_only - b_only,
                  mcnemar_exact(a_only, b_only))


def summarize_report(report: EvalReport) -> None:
    """Fill report.accuracy and report.paired from report.cases."""
    by_key: dict[tuple[str, int], list[CaseResult]] = {}
    for r in report.cases:
        by_key.setdefault((r.model, r.length), []).append(r)
    names = [m.name for m in report.models]
    report.accuracy = []
    for name in names:
        for length in report.lengths:
            rows = by_key.get((name, length), [])
            report.accuracy.append(accuracy_of(name, length, None, rows))
            for depth in report.depths or []:
                report.accuracy.append(accuracy_of(name, length, depth, [r for r in rows if r.depth == depth]))
    report.paired = []
    first = names[0]
    for other in names[1:]:
        for length in report.lengths:
            report.paired.append(paired(first, other, length, by_key[(first, length)], by_key[(other, length)]))
        everything_a = [r for length in report.lengths for r in by_key[(first, length)]]
        everything_b = [r for length in report.lengths for r in by_key[(other, length)]]
        report.paired.append(paired(first, other, None, everything_a, everything_b))


# -- running --

def _check_model(model: Path) -> None:
    """Fail before any long work on a model path that cannot be run."""
    if model.is_dir():
        read_config(model)
    elif not model.exists():
        raise InputError(f"{model}: no such GGUF file or model folder")
    else:
        read_gguf_parts(require_gguf(model))  # a split GGUF: every part there, from one split


def model_names(models: Sequence[Path], scales: Path | None) -> list[str]:
    """Short names (file or folder name); full paths where two short names would collide."""
    def short(m: Path) -> str:
        return m.name + (f"+{scales.name}" if scales and m.is_dir() else "")

    names = [short(m) for m in models]
    if len(set(names)) < len(names):
        names = [str(m) + (f"+{scales.name}" if scales and m.is_dir() else "") for m in models]
    if len(set(names)) < len(names):
        raise InputError("the same model is listed twice")
    return names


def _validate(models: Sequence[Path], task: str, lengths: Sequence[int], samples: int,
              scales: Path | None, max_tokens: int, rope: RopeScaling | None = None) -> None:
    if not models:
        raise InputError("give at least one model (a GGUF file or an HF model folder)")
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not lengths or min(lengths) <= 0:
        raise InputError("lengths must be positive token counts, e.g. 1024,2048")
    if samples <= 0:
        raise InputError(f"samples must be at least 1 (got {samples})")
    if max_tokens <= 0:
        raise InputError(f"max_tokens must be at least 1 (got {max_tokens})")
    for model in models:
        _check_model(model)
    if scales is not None and not any(m.is_dir() for m in models):
        raise InputError(
            "--scales applies to HF model folders, and none is listed; a GGUF carries its scales folded in"
        )
    if rope is not None and not any(m.is_dir() for m in models):
        raise InputError("--rope-scaling applies to HF model folders, and none is listed; a GGUF carries its "
                         "context extension in its metadata (convert it with --rope-scaling)")
    for model in models:
        if scales is not None and model.is_dir():  # a bad or mismatched scales file fails before the cases
            load_scales(scales, model_layout(model))
        if rope is not None and model.is_dir():  # so does a model that cannot take the extension
            extend_config(read_config(model), rope, str(model / "config.json"))
        _check_context(model, max(lengths) + max_tokens, rope)


def _check_context(model: Path, tokens: int, rope: RopeScaling | None) -> None:
    """Refuse prompts longer than the context the model runs with (its config's or GGUF's, extended
    by rope for a folder): past it, the model is not the one the scales were made for."""
    if model.is_dir():
        config = read_config(model)
        context = config.get("max_position_embeddings")
        if rope is not None:
            context = extend_config(config, rope, str(model / "config.json"))["max_position_embeddings"]
        remedy = "use shorter --lengths, or extend the context with --rope-scaling"
    else:
        metadata = read_metadata(model)
        context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
        remedy = "use shorter --lengths, or a GGUF converted with --rope-scaling"
    if isinstance(context, int) and tokens > context:
        raise InputError(f"{model}: a prompt of {tokens} tokens (the longest length plus the answer tokens) "
                         f"does not fit its context of {context} tokens; {remedy}")


def generate_cases(tokenizer: Any, task: str, lengths: Sequence[int], samples: int, seed: int,
                   depths: Sequence[float] | None) -> dict[int, list[Case]]:
    """`samples` cases per length (per length and depth when depths are given)."""
    n = samples * (len(depths) if depths else 1)
    return {length: make_cases(tokenizer, task, length, n, seed, depths=depths) for length in lengths}


def evaluate(
    models: Sequence[Path],
    task: str,
    lengths: Sequence[int],
    samples: int,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    scales: Path | None = None,
    progress: bool = True,
    max_tokens: int = 16,
    device: str = "cpu",
    threads: int | None = None,
    rope: RopeScaling | None = None,
    general_tokens: int = 0,
    general_text: Path | None = None,
) -> EvalReport:
    """Run every model on the same cases. `scales` is applied (by hooks) to the HF folders only,
    and so is `rope` (a context extension; a GGUF carries its own).

    threads: CPU threads per model (None: llama.cpp's and PyTorch's own defaults).
    general_tokens: also measure what SEAL costs on general text (seal_gguf.measure.general), this
    many tokens of general_text (default: the built-in general text): gain and cost side by side.
    """
    models = [Path(m) for m in models]
    lengths = sorted(set(int(x) for x in lengths))
    # the general text is read now: a missing file fails before the retrieval run, not after it
    general = [read_text_document(Path(general_text))] if general_tokens and general_text else None
    scales = Path(scales) if scales else None
    _validate(models, task, lengths, samples, scales, max_tokens, rope)
    if depths is None and task == "niah":
        depths = NIAH_DEPTHS
    depth_list = sorted(set(float(d) for d in depths)) if depths is not None else None
    names = model_names(models, scales)

    try:
        tokenizer = load_tokenizer(models[0])
    except InputError as exc:
        raise InputError(f"{exc}; the cases are generated with the first model's tokenizer, so list a model "
                         "whose tokenizer transformers can read (an HF folder) first") from None
    cases = generate_cases(tokenizer, task, lengths, samples, seed, depth_list)
    n_ctx = max(lengths) + max_tokens + N_CTX_SLACK
    report = EvalReport(task, lengths, samples, seed, depth_list, max_tokens)
    total = sum(len(c) for c in cases.values()) * len(models)
    with tqdm(total=total, unit="case", disable=not progress, dynamic_ncols=True) as bar:
        for name, model in zip(names, models, strict=True):
            bar.set_description(name)
            model_scales = scales if model.is_dir() else None
            model_rope = rope.resolved(read_config(model), str(model / "config.json")) if rope and model.is_dir() else None
            runner = open_runner(model, scales=model_scales, n_ctx=n_ctx, device=device, threads=threads,
                                 rope=model_rope)
            mismatches, seconds_total = 0, 0.0
            try:
                for length in lengths:
                    for index, case in enumerate(cases[length]):
                        tick = time.perf_counter()
                        given = runner.generate(case.prompt, max_tokens)
                        seconds = time.perf_counter() - tick
                        seconds_total += seconds
                        tokens = len(runner.tokenize(case.prompt))
                        mismatches += tokens != case.length
                        report.cases.append(CaseResult(
                            name, length, case.depth, index, case.expected, given.strip(),
                            score_answer(case, given), tokens, round(seconds, 4),
                        ))
                        bar.update(1)
            finally:
                runner.close()
            count = sum(len(c) for c in cases.values())
            report.models.append(ModelInfo(
                name, str(model), "pytorch" if model.is_dir() else "llama.cpp",
                str(model_scales) if model_scales else None, runner.n_ctx,
                round(seconds_total / count, 4), mismatches, model_rope.spec() if model_rope else None,
            ))
    summarize_report(report)
    if general_tokens:
        report.general = general_costs(models, scales, general, general_tokens, progress=progress)
    return report


# -- output --

def report_to_json(report: EvalReport) -> dict[str, Any]:
    return asdict(report)


def write_eval_json(path: Path, report: EvalReport, force: bool = False) -> None:
    with atomic_file(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(report_to_json(report), indent=2) + "\n", encoding="utf-8")


def _cell(acc: Accuracy) -> str:
    return f"{acc.correct}/{acc.total} {acc.accuracy:.2f} [{acc.ci_low:.2f},{acc.ci_high:.2f}]"


def _length_label(length: int) -> str:
    return f"{length} tok"


def render_table(report: EvalReport) -> str:
    """Plain-text tables: accuracy per model and length, niah depth grids, the paired comparison."""
    per = f"{report.samples} per length" + (" and depth" if report.depths else "")
    out = [f"Task {report.task}: {per}, seed {report.seed}. Cells: right/total accuracy [95% Wilson interval]."]
    header = ["model", *(_length_label(x) for x in report.lengths), "s/case"]
    rows = [[m.name, *(_cell(report.cell(m.name, x)) for x in report.lengths), f"{m.seconds_per_case:.2f}"]
            for m in report.models]
    out += grid([header, *rows])
    if report.task == "niah" and report.depths:
        for m in report.models:
            out += ["", f"{m.name}: accuracy by depth (rows, % of context) and length"]
            header = ["depth", *(_length_label(x) for x in report.lengths)]
            rows = [[f"{d:g}%", *(f"{report.cell(m.name, x, d).correct}/{report.cell(m.name, x, d).total}"
                                  for x in report.lengths)] for d in report.depths]
            out += grid([header, *rows])
    if report.paired:
        first = report.models[0].name
        out += ["", f"Paired with {first} (same cases): both right / {first} only / other only / both wrong, "
                    "exact McNemar p"]
        header = ["model", *(_length_label(x) for x in report.lengths), "all"]
        rows = []
        for m in report.models[1:]:
            cells = []
            for length in [*report.lengths, None]:
                p = next(p for p in report.paired if p.model_b == m.name and p.length == length)
                cells.append(f"{p.both}/{p.a_only}/{p.b_only}/{p.neither} p={p.p_value:.3g}")
            rows.append([m.name, *cells])
        out += grid([header, *rows])
    if report.general:
        out += ["", "What SEAL costs on general text (SEAL vs base):", *describe_costs(report.general)]
    for m in report.models:
        if m.token_mismatches:
            out.append(f"Note: {m.name} tokenizes {m.token_mismatches} of the prompts to a different length "
                       "than the tokenizer that generated the cases.")
    return "\n".join(out)
