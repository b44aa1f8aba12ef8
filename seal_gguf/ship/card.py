"""What a GGUF says about itself, and the model card (README.md beside it) built from that.

A GGUF folded by seal-gguf carries its SEAL provenance under seal.* keys: granularity, shape and
the sha256 of the scales file. How the scales were learned (task, samples, length, learning rate,
seed, command, held-out accuracy) is in that scales file's metadata, found by the sha256: the file
given with --scales, one named in the validate / eval reports, or one bundled with seal-gguf.
The card adds validate's figures (KL divergence, top-1 agreement) and eval's retrieval accuracy
for the GGUF's quantization type, with the commands that produce them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seal_gguf import __version__
from seal_gguf.constants import GRANULARITY_HEAD, GRANULARITY_LABEL, GGUFKeys, ScalesMeta
from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_file, check_output_path, require_file, require_gguf
from seal_gguf.gguffile.metadata import GGUFFacts, read_gguf_facts
from seal_gguf.ship.provenance import Recipe, default_context, find_recipe

CARD_TAGS = ("gguf", "seal", "llama.cpp")


# -- validate's and eval's reports --

def read_report(path: Path, kind: str, keys: Sequence[str]) -> dict[str, Any]:
    """A JSON report written by `seal-gguf validate --json` or `seal-gguf eval --json`."""
    path = require_file(Path(path), f"{kind} report")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise InputError(f"{path}: not a report of `seal-gguf {kind} --json` (it lacks {', '.join(keys)})")
    return data


VALIDATE_KEYS = ("scales_sha256", "ggufs", "ctx", "documents")
EVAL_KEYS = ("task", "lengths", "samples", "seed", "models", "accuracy", "cases")


def quant_type_in_name(name: str) -> str | None:
    """The GGUF type a file name states (seal-h-q4_k_m.gguf -> q4_k_m), longest name first."""
    from seal_gguf.convert.quantize import QUANT_TYPES

    lowered = name.lower()
    for qtype in sorted(QUANT_TYPES, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(qtype)}(?![a-z0-9_])", lowered):
            return qtype
    return None


def validation_figures(report: dict[str, Any], facts: GGUFFacts, where: Path) -> tuple[dict, dict | None]:
    """This GGUF's entry in a validate report, and the base GGUF of the same type if one was measured."""
    sha = facts.scales_sha256
    if sha is not None and report.get("scales_sha256") not in (None, sha):
        raise InputError(f"{where}: validated scales {str(report['scales_sha256'])[:12]}..., but "
                         f"{facts.path.name} was folded with {sha[:12]}...")
    seal = [g for g in report["ggufs"] if g.get("role") == "seal"]
    mine = [g for g in seal if Path(g["info"]["path"]).name == facts.path.name]
    if not mine:  # renamed since: the one SEAL GGUF of this type, validated with these very scales
        mine = [g for g in seal if g["info"].get("file_type") == facts.file_type] if sha is not None else []
    if len(mine) != 1:
        names = ", ".join(Path(g["info"]["path"]).name for g in seal) or "no SEAL GGUF"
        raise InputError(f"{where}: holds no figures for {facts.path.name} (it validated {names})")
    qtype = mine[0]["info"].get("file_type")
    base = next((g for g in report["ggufs"] if g.get("role") == "base" and g["info"].get("file_type") == qtype),
                None)
    return mine[0], base


def retrieval_models(report: dict[str, Any], facts: GGUFFacts, where: Path,
                     known_types: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """This GGUF's name in an eval report and the report's models of the same GGUF type (it included)."""
    names = {m["name"]: m for m in report["models"]}
    mine = next((m["name"] for m in report["models"]
                 if facts.path.name in (m["name"], Path(m["path"]).name)), None)
    if mine is None:
        raise InputError(f"{where}: holds no results for {facts.path.name} (it evaluated {', '.join(names)})")

    def qtype(model: dict[str, Any]) -> str | None:
        name = Path(model["path"]).name
        return known_types.get(name) or quant_type_in_name(name)

    rows = [m for m in report["models"]
            if m["name"] == mine or (m.get("engine") == "llama.cpp" and qtype(m) == facts.file_type)]
    return mine, rows


# -- the card --

def _number(x: float) -> str:
    return f"{x:.6f}" if abs(x) >= 1e-4 or x == 0 else f"{x:.2e}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _shell(words: Iterable[str]) -> str:
    import shlex

    return " ".join(shlex.quote(w) for w in words)


def front_matter(facts: GGUFFacts, base_model: str | None, license_id: str | None) -> list[str]:
    lines = ["---"]
    if license_id or facts.license:
        lines.append(f"license: {license_id or facts.license}")
    if base_model or facts.source_repo:
        lines.append(f"base_model: {base_model or facts.source_repo}")
    lines += ["tags:", *(f"- {t}" for t in CARD_TAGS), "---", ""]
    return lines


def seal_section(facts: GGUFFacts, recipe: Recipe | None) -> list[str]:
    seal = facts.seal
    granularity = seal.get(GGUFKeys.GRANULARITY, "")
    layers, heads, dim = (int(seal.get(k, "0")) for k in (GGUFKeys.NUM_LAYERS, GGUFKeys.NUM_HEADS, GGUFKeys.HEAD_DIM))
    if granularity == GRANULARITY_HEAD:
        what = f"SEAL-H: one scale per attention head, {layers} layers × {heads} heads = {layers * heads} scales"
    else:
        what = (f"SEAL-C: one scale per channel of each head's output, {layers} × {heads} × {dim} = "
                f"{layers * heads * dim} scales")
    lines = ["## SEAL scales", "",
             f"- granularity: {what}",
             "- folded into: the input columns of each layer's attention output projection (`attn_output`); "
             "nothing else differs from the base model",
             f"- scales file sha256: `{facts.scales_sha256}`",
             f"- folded by seal-gguf {seal.get(GGUFKeys.VERSION, 'unknown')}", ""]
    if recipe is None:
        return lines + ["The GGUF records the scales' sha256 but not how they were learned, and no scales file with "
                        "that sha256 was given (`seal-gguf card --scales FILE`).", ""]
    meta = recipe.metadata
    rows = [(label, meta[key]) for label, key in (
        ("task", ScalesMeta.TASK), ("training cases", ScalesMeta.SAMPLES), ("case length (tokens)", ScalesMeta.LENGTH),
        ("shortest case (tokens)", ScalesMeta.MIN_LENGTH), ("learning rate", ScalesMeta.LR),
        ("learning-rate schedule", ScalesMeta.LR_SCHEDULE), ("seed", ScalesMeta.SEED),
        ("anchor weight λ (0: the paper's recipe)", ScalesMeta.ANCHOR_WEIGHT), ("anchor text", ScalesMeta.ANCHOR_TEXT),
        ("RoPE scaling", ScalesMeta.ROPE_SCALING),
    ) if meta.get(key)]
    if any(meta.get(k, "n/a") != "n/a" for k in (ScalesMeta.HELDOUT_BEFORE, ScalesMeta.HELDOUT_AFTER)):
        rows.append(("held-out accuracy, before → after",
                     f"{meta.get(ScalesMeta.HELDOUT_BEFORE, '?')} → {meta.get(ScalesMeta.HELDOUT_AFTER, '?')}"))
    origin = ("as the GGUF records it" if recipe.source.suffix == ".gguf"
              else f"from the metadata of `{recipe.source.name}`, the scales file folded in")
    lines += [f"Training recipe ({origin}); only the scales were trained, the model stayed frozen:", "",
              *_table(["", "value"], rows), ""]
    if meta.get(ScalesMeta.COMMAND):
        lines += ["Command:", "", "```", meta[ScalesMeta.COMMAND], "```", ""]
    return lines


def cost_section(facts: GGUFFacts, recipe: Recipe | None, reports: Sequence[dict[str, Any]]) -> list[str]:
    """What the scales cost on general text, next to what they gain: this GGUF against the base GGUF of
    its type (validate --base-gguf, eval --general), else the unquantized model in PyTorch, else the
    figures training recorded."""
    entries = [g for r in reports for g in r.get("general") or []]
    mine = [g for g in entries if g["engine"] == "llama.cpp" and g["seal"] == facts.path.name]
    mine = mine[:1] or [g for g in entries if g["engine"] == "pytorch"][:1]
    lines = ["## What the scales cost on general text", ""]
    if mine:
        g, c = mine[0], mine[0]["cost"]
        where = (f"this GGUF against the base GGUF `{g['base']}` of the same type, in llama.cpp" if g["engine"] ==
                 "llama.cpp" else "the unquantized model with the scales against it without, in PyTorch")
        return lines + [f"SEAL changes every head's output, so it changes the model on all text, not only on "
                        f"retrieval prompts. Measured on {c['tokens']} tokens of general text never used in "
                        f"training: {where}.", "",
                        *_table(["perplexity, base → SEAL", "ratio", "mean KLD", "99% KLD", "same top-1 token"],
                                [[f"{c['ppl_base']:.2f} → {c['ppl_seal']:.2f}", f"×{c['ppl_ratio']:.3f}",
                                  _number(c["mean_kld"]), _number(c["p99_kld"]), f"{100 * c['same_top']:.1f}%"]]), ""]
    meta = recipe.metadata if recipe is not None else {}
    if meta.get(ScalesMeta.GENERAL_PPL_RATIO):
        return lines + [f"Recorded by training (PyTorch, {meta.get(ScalesMeta.GENERAL_TOKENS, '?')} tokens of general "
                        f"text): perplexity ratio ×{float(meta[ScalesMeta.GENERAL_PPL_RATIO]):.3f}, mean KLD "
                        f"{meta.get(ScalesMeta.GENERAL_MEAN_KLD)}, same top-1 "
                        f"{100 * float(meta.get(ScalesMeta.GENERAL_SAME_TOP, 'nan')):.1f}%.", ""]
    return lines + ["Not measured: give `--validate-json` from `seal-gguf validate ... --base-gguf BASE.gguf` or "
                    "`--eval-json` from `seal-gguf eval BASE.gguf SEAL.gguf --general`.", ""]


def validate_command(report: dict[str, Any], json_name: str) -> str:
    from seal_gguf.kld import DEFAULT_MAX_MEAN_KLD

    ggufs = report["ggufs"]
    words = ["seal-gguf", "validate", Path(report["model_dir"]).name + "/", Path(report["scales"]).name,
             *(Path(g["info"]["path"]).name for g in ggufs if g["role"] == "seal")]
    for g in ggufs:
        if g["role"] == "base":
            words += ["--base-gguf", Path(g["info"]["path"]).name]
    if len(report["documents"]) == 1:
        words += ["--text", report["documents"][0][0]]
    words += ["--ctx", str(report["ctx"])]
    gated = [g["limits"]["max_mean_kld"] for g in ggufs
             if g["info"]["file_type"] not in DEFAULT_MAX_MEAN_KLD and g["limits"].get("max_mean_kld") is not None]
    if gated:
        words += ["--max-kld", f"{gated[0]:g}"]
    retrieval = report.get("retrieval")
    if retrieval:
        words += ["--task", retrieval["task"], "--length", str(retrieval["lengths"][0]),
                  "--samples", str(retrieval["samples"]), "--seed", str(retrieval["seed"])]
    return _shell([*words, "--json", json_name])


def validation_section(report: dict[str, Any], facts: GGUFFacts, where: Path) -> list[str]:
    mine, base = validation_figures(report, facts, where)
    entries = [("this GGUF" if Path(mine["info"]["path"]).name == facts.path.name
                else f"{Path(mine['info']['path']).name}", mine)]
    if base is not None:
        entries.append((f"base {base['info']['file_type']} ({Path(base['info']['path']).name})", base))
    s = [e["summary"] for _, e in entries]
    rows = [
        ["GGUF type", *(e["info"]["file_type"] for _, e in entries)],
        ["tokens scored", *(str(x["tokens"]) for x in s)],
        ["mean KLD", *(f"{_number(x['mean_kld'])} ± {_number(x['mean_kld_stderr'])}" for x in s)],
        ["median KLD", *(_number(x["median_kld"]) for x in s)],
        ["99% KLD", *(_number(x["p99_kld"]) for x in s)],
        ["max KLD", *(_number(x["max_kld"]) for x in s)],
        ["same top-1 token", *(f"{100 * x['same_top']:.2f}%" for x in s)],
        ["perplexity, reference → GGUF", *(f"{x['ppl_ref']:.3f} → {x['ppl_test']:.3f}" for x in s)],
    ]
    limit = mine["limits"].get("max_mean_kld")
    verdict = "failed: " + "; ".join(mine["failures"]) if mine["failures"] else "passed"
    tokens = sum(n for _, n in report["documents"])
    lines = ["## Validation against the unfolded model", "",
             f"llama.cpp runs this GGUF on {tokens} tokens of text ({', '.join(d for d, _ in report['documents'])}; "
             f"chunks of at most {report['ctx']}); PyTorch runs the unfolded model (float32) with the scales applied "
             "by hooks on the same tokens. KL divergence and top-1 agreement as llama-perplexity reports them"
             + ("; the base GGUF of the same type, against the model without scales, shows the cost of quantization "
                "alone." if base is not None else "."), "",
             *_table(["", *(label for label, _ in entries)], rows), "",
             f"Result: {verdict}" + (f" (limit: mean KLD ≤ {limit:g})" if limit is not None else "") + "."]
    if report.get("folded"):
        folded = report["folded"]
        lines += ["", f"The folded checkpoint in PyTorch gives the hooked model's logits to max |Δlogit| "
                      f"{folded['max_abs_diff']:.3g} (largest |logit| {folded['max_abs_logit']:.3g})."]
    return lines + ["", f"Command (reconstructed from `{where.name}`; paths shortened to names):", "", "```",
                    validate_command(report, where.name), "```", ""]


def eval_command(report: dict[str, Any], json_name: str) -> str:
    words = ["seal-gguf", "eval"]
    words += [Path(m["path"]).name + ("/" if m.get("engine") == "pytorch" else "") for m in report["models"]]
    words += ["--task", report["task"], "--lengths", ",".join(str(x) for x in report["lengths"]),
              "--samples", str(report["samples"]), "--seed", str(report["seed"])]
    if report.get("depths"):
        words += ["--depths", ",".join(f"{d:g}" for d in report["depths"])]
    scales = next((m["scales"] for m in report["models"] if m.get("scales")), None)
    if scales:
        words += ["--scales", Path(scales).name]
    if report.get("max_tokens", 16) != 16:
        words += ["--max-tokens", str(report["max_tokens"])]
    return _shell([*words, "--json", json_name])


def paired_with(report: dict[str, Any], model_a: str, model_b: str) -> Any:
    """Two models of an eval report compared case by case over all lengths (evaluate's own statistics)."""
    from seal_gguf.measure.evaluate import CaseResult, paired

    def cases(name: str) -> list[CaseResult]:
        found = [CaseResult(**c) for c in report.get("cases", []) if c["model"] == name]
        return sorted(found, key=lambda c: (c.length, c.depth if c.depth is not None else -1.0, c.index))

    return paired(model_a, model_b, None, cases(model_a), cases(model_b))


def retrieval_section(report: dict[str, Any], facts: GGUFFacts, where: Path, known_types: dict[str, str]) -> list[str]:
    mine, models = retrieval_models(report, facts, where, known_types)
    lengths = report["lengths"]

    def cell(name: str, length: int) -> str:
        acc = next(a for a in report["accuracy"]
                   if a["model"] == name and a["length"] == length and a.get("depth") is None)
        return f"{acc['correct']}/{acc['total']} ({100 * acc['accuracy']:.0f}%) [{acc['ci_low']:.2f}, {acc['ci_high']:.2f}]"

    rows = [[f"**{m['name']}** (this GGUF)" if m["name"] == mine else m["name"], *(cell(m["name"], x) for x in lengths)]
            for m in models]
    pairs = [paired_with(report, other["name"], mine) for other in models if other["name"] != mine]
    lines = ["## Retrieval accuracy", "",
             f"Task `{report['task']}`: {report['samples']} generated cases per length (seed {report['seed']}), the "
             f"same cases for every model, greedy answers in llama.cpp; the GGUFs of type {facts.file_type} in the "
             "report. Cells: right / total (accuracy) [95% Wilson interval].", "",
             *_table(["model", *(f"{x} tokens" for x in lengths)], rows), ""]
    if pairs:
        lines += ["Case by case, all lengths together (exact McNemar test on the cases only one model gets right):", ""]
        lines += [f"- {p.model_a} vs {p.model_b}: both right {p.both}, only {p.model_a} {p.a_only}, "
                  f"only {p.model_b} {p.b_only}, neither {p.neither}; p = {p.p_value:.3g}" for p in pairs]
        lines.append("")
    return lines + [f"Command (reconstructed from `{where.name}`; paths shortened to names):", "", "```",
                    eval_command(report, where.name), "```", ""]


def usage_section(facts: GGUFFacts, n_ctx: int, reason: str) -> list[str]:
    from seal_gguf.ship.ollama import default_modelfile, ollama_name

    name = facts.path.name
    return ["## Use it", "",
            f"An ordinary {facts.architecture} GGUF: nothing to install besides your usual runtime. The context below "
            f"is {n_ctx} tokens, {reason}.", "", "```",
            f"llama-cli -m {name} -c {n_ctx} -cnv              # llama.cpp, chat in the terminal",
            f"llama-server -m {name} -c {n_ctx} --port 8080    # llama.cpp's OpenAI-compatible server",
            f"seal-gguf serve {name} --port 8080            # the same through llama-cpp-python",
            f"seal-gguf ollama {name} && ollama create {ollama_name(facts.path)} -f {default_modelfile(facts.path).name}",
            "```", ""]


def render_card(facts: GGUFFacts, recipe: Recipe | None, validation: tuple[dict[str, Any], Path] | None = None,
                retrieval: tuple[dict[str, Any], Path] | None = None, base_model: str | None = None,
                license_id: str | None = None) -> str:
    granularity = facts.seal.get(GGUFKeys.GRANULARITY)
    label = GRANULARITY_LABEL.get(granularity or "")
    size = facts.size / 1e6
    layers, heads, dim = (facts.arch_number(k) for k in ("block_count", "attention.head_count", "attention.key_length"))
    shape = " × ".join(str(x) for x in (layers, heads, dim) if x is not None)
    lines = [*front_matter(facts, base_model, license_id),
             f"# {(base_model or '').rpartition('/')[2] or facts.title}{f' + {label}' if label else ''} "
             f"({facts.file_type} GGUF)", ""]
    if granularity:
        lines += [f"`{facts.path.name}` is {base_model or facts.source_repo or facts.title} with SEAL attention scales "
                  "folded into its weights. SEAL (arXiv 2501.15225) learns how much each attention head (or channel) "
                  "should contribute so that the model retrieves facts from long contexts more reliably; folded in, "
                  "the scales cost nothing at inference. llama.cpp, llama-server, Ollama and LM Studio run this file "
                  "unchanged, at the speed of the unmodified model.", ""]
    lines += [*_table(["file", "type", "size", "architecture", "layers × heads × head size", "context length"],
                      [[f"`{facts.path.name}`" + (f" (first of {facts.parts} parts, loaded together)"
                                                  if facts.parts > 1 else ""),
                        facts.file_type, f"{size:.1f} MB", facts.architecture, shape,
                        str(facts.context_length or "?")]]), ""]
    if granularity:
        lines += seal_section(facts, recipe)
    known_types: dict[str, str] = {}
    if validation is not None:
        report, where = validation
        lines += validation_section(report, facts, where)
        known_types = {Path(g["info"]["path"]).name: g["info"]["file_type"] for g in report["ggufs"]}
    if retrieval is not None:
        report, where = retrieval
        lines += retrieval_section(report, facts, where, known_types)
    if granularity:
        lines += cost_section(facts, recipe, [given[0] for given in (validation, retrieval) if given is not None])
    n_ctx, reason = default_context(facts, recipe)
    lines += usage_section(facts, n_ctx, reason)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines += [f"Card written by seal-gguf {__version__} on {now} from the GGUF's metadata"
              + (", the scales' recipe" if recipe else "")
              + (", validate's report" if validation else "") + (", eval's report" if retrieval else "") + ".", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class CardResult:
    path: Path
    recipe: Recipe | None


def write_card(gguf: Path, out: Path | None = None, *, validate_json: Path | None = None,
               eval_json: Path | None = None, scales: Path | None = None, base_model: str | None = None,
               license_id: str | None = None, force: bool = False) -> CardResult:
    """Write the model card of `gguf` (default: README.md in its folder) and return where, with the recipe used."""
    gguf = require_gguf(Path(gguf))
    out = Path(out) if out is not None else gguf.parent / "README.md"
    check_output_path(out, force, inputs=[gguf, validate_json, eval_json, scales])
    validation = (read_report(Path(validate_json), "validate", VALIDATE_KEYS), Path(validate_json)) \
        if validate_json is not None else None
    retrieval = (read_report(Path(eval_json), "eval", EVAL_KEYS), Path(eval_json)) if eval_json is not None else None
    facts = read_gguf_facts(gguf)
    if GGUFKeys.FORMAT not in facts.seal:
        raise InputError(f"{gguf}: not a SEAL GGUF (no seal.* metadata); fold scales into it first, e.g. "
                         f"`seal-gguf fold-gguf {gguf} scales.safetensors -o {gguf.with_name(gguf.stem + '-seal.gguf')}`")
    # scales files the reports name, wherever they still exist: a relative path is relative to the
    # folder the command ran in, here or (often) the report's own
    named = [(Path(validation[0]["scales"]), validation[1])] if validation and validation[0].get("scales") else []
    if retrieval is not None:
        named += [(Path(m["scales"]), retrieval[1]) for m in retrieval[0]["models"] if m.get("scales")]
    candidates = [p for path, report in named for p in (path, Path(report).parent / path)]
    recipe = find_recipe(facts, scales, candidates)
    text = render_card(facts, recipe, validation, retrieval, base_model, license_id)
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return CardResult(out, recipe)
