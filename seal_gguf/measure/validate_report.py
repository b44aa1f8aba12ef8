"""validate's report as a table for the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from seal_gguf.measure.general import describe_costs
from seal_gguf.measure.validate import GGUFResult, ValidationReport
from seal_gguf.model.rope import parse_rope_scaling
from seal_gguf.texts import grid


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
                   f"(max |logit| {f.max_abs_logit:.3g}, ratio {f.relative:.2g}, limit {f.limit:.2g}"
                   + (f": {f.dtype} rounding costs {f.noise_relative:.2g}" if f.noise_relative else "") + ")"
                   f"  {status}")
    if report.ggufs:
        out += ["", "Level 2, GGUF in llama.cpp vs PyTorch on the same tokens "
                    "(seal: vs the model with scales; base: vs the model without)"]
        out += grid(_level2_rows(report.ggufs))
    if report.general:
        out += ["", "What SEAL costs on general text: the model with its scales vs without (for scale: a base "
                    "GGUF's mean KLD in Level 2 is what quantization costs)"]
        out += describe_costs(report.general)
    if report.retrieval is not None:
        from seal_gguf.measure.evaluate import render_table

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
