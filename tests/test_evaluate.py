"""Retrieval evaluation: statistics, runners (llama.cpp and PyTorch), the eval command and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from seal_gguf.cli.app import cli
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.errors import AlreadyFoldedError, InputError
from seal_gguf.fold.hf import fold_checkpoint
from seal_gguf.measure.evaluate import (
    CaseResult,
    EvalReport,
    ModelInfo,
    evaluate,
    mcnemar_exact,
    render_table,
    summarize_report,
    wilson_interval,
)
from seal_gguf.measure.runners import open_runner
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.loading import load_tokenizer
from seal_gguf.scales import expected_shape, save_scales
from seal_gguf.tasks import make_cases

CASE_FIELDS = {"model", "length", "depth", "index", "expected", "given", "correct", "prompt_tokens", "seconds"}
ACCURACY_FIELDS = {"model", "length", "depth", "correct", "total", "accuracy", "ci_low", "ci_high"}
PAIRED_FIELDS = {"model_a", "model_b", "length", "both", "a_only", "b_only", "neither", "p_value"}
MODEL_FIELDS = {"name", "path", "engine", "scales", "n_ctx", "seconds_per_case", "token_mismatches",
                 "rope_scaling"}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- statistics --

@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 5, 0.0, 0.4345),  # the "rule of three"-like upper bound for 0/5
    (5, 10, 0.2366, 0.7634),
    (8, 10, 0.4902, 0.9433),
    (20, 20, 0.8389, 1.0),
])
def test_wilson_known_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_estimate_and_is_symmetric(kn: tuple[int, int]) -> None:
    k, n = kn
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    mirror = wilson_interval(n - k, n)
    assert mirror == pytest.approx((1 - high, 1 - low), abs=1e-12)
    # more trials at the same proportion give a narrower interval
    low2, high2 = wilson_interval(4 * k, 4 * n)
    assert high2 - low2 < high - low


def test_wilson_without_trials_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0),
    (3, 3, 1.0),
    (0, 5, 0.0625),  # 2 * 0.5**5
    (1, 9, 2 * 11 / 1024),
    (0, 10, 2 / 1024),
    (2, 8, 2 * (1 + 10 + 45) / 1024),
])
def test_mcnemar_exact_known_values(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)


@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_is_a_probability_and_monotone(b: int, c: int) -> None:
    p = mcnemar_exact(b, c)
    assert 0.0 < p <= 1.0
    if b < c:  # one more discordant case on the same side can only strengthen the evidence
        assert mcnemar_exact(b, c + 1) <= p


def test_summarize_counts_pairs_case_by_case() -> None:
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, True]
    report = EvalReport("lines", [100], 6, 0, None, 16, models=[
        ModelInfo("A", "a.gguf", "llama.cpp", None, 256, 0.1, 0),
        ModelInfo("B", "b.gguf", "llama.cpp", None, 256, 0.1, 0),
    ])
    for name, marks in (("A", a), ("B", b)):
        report.cases += [CaseResult(name, 100, None, i, "1", "1" if ok else "2", ok, 100, 0.1)
                         for i, ok in enumerate(marks)]
    summarize_report(report)
    cell = report.cell("B", 100)
    assert (cell.correct, cell.total, cell.accuracy) == (5, 6, pytest.approx(5 / 6))
    assert (cell.ci_low, cell.ci_high) == pytest.approx(wilson_interval(5, 6))
    by_length = [p for p in report.paired if p.length == 100]
    overall = [p for p in report.paired if p.length is None]
    assert len(by_length) == len(overall) == 1
    p = overall[0]
    assert (p.model_a, p.model_b, p.both, p.a_only, p.b_only, p.neither) == ("A", "B", 2, 1, 3, 0)
    assert p.p_value == pytest.approx(mcnemar_exact(1, 3))
    table = render_table(report)
    assert "3/6 0.50" in table and "5/6 0.83" in table and "2/1/3/0" in table


# -- runners --

def test_hooked_runner_answers_like_the_folded_checkpoint(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    layout = model_layout(model_dir)
    g = torch.Generator().manual_seed(3)
    values = torch.exp(torch.randn(expected_shape(layout, "head"), generator=g))
    scales = tmp_path / "s.safetensors"
    save_scales(scales, values, layout, "head")
    folded = fold_checkpoint(model_dir, scales, tmp_path / "folded", progress=False).out_dir
    prompt = make_cases(load_tokenizer(model_dir), "passkey", 160, 1, seed=0)[0].prompt
    answers = {}
    for key, (path, s) in {"hooked": (model_dir, scales), "folded": (folded, None), "plain": (model_dir, None)}.items():
        runner = open_runner(path, scales=s)
        assert len(runner.tokenize(prompt)) == 160
        answers[key] = runner.generate(prompt, 12)
        runner.close()
    assert answers["hooked"] == answers["folded"]
    assert answers["hooked"] != answers["plain"]  # the scales do change what the model says


def test_runner_refuses_bad_inputs(tmp_path: Path, smollm2_gguf: Path, tiny_model) -> None:
    with pytest.raises(InputError, match="no such"):
        open_runner(tmp_path / "absent.gguf")
    with pytest.raises(InputError, match="GGUF carries its scales"):
        open_runner(smollm2_gguf, scales=tmp_path / "s.safetensors")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 1 << 20])
    with pytest.raises(InputError, match="inside its header: truncated"):
        open_runner(truncated)
    model_dir = tiny_model("llama")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(InputError, match="no \\*.safetensors"):
        open_runner(no_weights)
    layout = model_layout(model_dir)
    scales = tmp_path / "s.safetensors"
    save_scales(scales, torch.full(expected_shape(layout, "head"), 2.0), layout, "head")
    folded = fold_checkpoint(model_dir, scales, tmp_path / "folded", progress=False).out_dir
    with pytest.raises(AlreadyFoldedError):  # the scales would be applied twice
        open_runner(folded, scales=scales)


# -- the eval command --

@pytest.mark.slow
def test_eval_gguf_and_hf_folder_writes_json_and_plot(tiny_model, smollm2_gguf: Path, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    result = invoke("eval", smollm2_gguf, model_dir, "--task", "passkey", "--lengths", "192,256", "--samples", 2,
                    "--json", out, "--plot", plot, "-q")
    assert result.exit_code == 0, result.output
    assert "Paired with SmolLM2-135M-Instruct.Q4_1.gguf" in result.output
    report = json.loads(out.read_text())
    assert {"task", "lengths", "samples", "seed", "depths", "max_tokens", "models", "accuracy", "paired",
            "cases"} <= set(report)
    assert report["lengths"] == [192, 256] and report["task"] == "passkey"
    assert [m["engine"] for m in report["models"]] == ["llama.cpp", "pytorch"]
    assert all(set(m) == MODEL_FIELDS for m in report["models"])
    assert report["models"][0]["n_ctx"] >= 256 + 16
    assert len(report["cases"]) == 2 * 2 * 2
    for case in report["cases"]:
        assert set(case) == CASE_FIELDS
        # both engines see the prompts with exactly the generated length: same text, same tokens
        assert case["prompt_tokens"] == case["length"]
        assert case["expected"].isdigit()
    assert all(set(a) == ACCURACY_FIELDS for a in report["accuracy"])
    assert {(p["length"], p["model_b"]) for p in report["paired"]} == {(192, model_dir.name), (256, model_dir.name),
                                                                       (None, model_dir.name)}
    assert all(set(p) == PAIRED_FIELDS for p in report["paired"])
    # the same cases for both models: expected answers agree position by position
    by_model: dict[str, list[str]] = {}
    for case in report["cases"]:
        by_model.setdefault(case["model"], []).append(case["expected"])
    assert len(set(map(tuple, by_model.values()))) == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # SmolLM2 finds a pass key in 192-256 tokens; the random tiny model cannot
    assert report["models"][0]["token_mismatches"] == 0
    gguf_right = sum(c["correct"] for c in report["cases"] if c["model"] == smollm2_gguf.name)
    assert gguf_right >= 3


def test_eval_folded_tiny_gguf_answers_like_hooked_reference(tiny_model, tmp_path: Path) -> None:
    """The DESIGN's task-level check on a tiny model: SEAL folded into an f32 GGUF by the converter,
    run by llama.cpp, against the unfolded model with the scales hooked in, in PyTorch."""
    model_dir = tiny_model("llama")
    layout = model_layout(model_dir)
    g = torch.Generator().manual_seed(3)
    scales = tmp_path / "s.safetensors"
    save_scales(scales, torch.exp(torch.randn(expected_shape(layout, "head"), generator=g)), layout, "head")
    gguf = convert_to_gguf(model_dir, tmp_path / "tiny-seal.gguf", "f32", scales, progress=False)
    out = tmp_path / "eval.json"
    result = invoke("eval", model_dir, gguf, "--scales", scales, "--task", "passkey", "--lengths", "128,200",
                    "--samples", 3, "--max-tokens", 8, "--threads", 1, "--json", out, "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [m["engine"] for m in report["models"]] == ["pytorch", "llama.cpp"]
    assert [m["scales"] for m in report["models"]] == [str(scales), None]
    assert all(c["prompt_tokens"] == c["length"] for c in report["cases"])
    by_model: dict[str, list[str]] = {}
    for case in report["cases"]:
        # llama.cpp drops a split UTF-8 byte where transformers writes U+FFFD
        by_model.setdefault(case["model"], []).append(case["given"].replace("\ufffd", ""))
    hooked, folded = by_model.values()
    same = sum(a == b for a, b in zip(hooked, folded, strict=True))
    assert same >= len(hooked) - 1, list(zip(hooked, folded, strict=True))


def test_eval_niah_grid_with_scales_on_hf_folder(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    layout = model_layout(model_dir)
    scales = tmp_path / "s.safetensors"
    save_scales(scales, torch.full(expected_shape(layout, "head"), 0.5), layout, "head")
    out, plot = tmp_path / "niah.json", tmp_path / "niah.svg"
    result = invoke("eval", model_dir, "--task", "niah", "--lengths", "200", "--samples", 1, "--depths", "0,100",
                    "--scales", scales, "--max-tokens", 4, "--json", out, "--plot", plot, "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["depths"] == [0.0, 100.0]
    assert report["models"][0]["scales"] == str(scales)
    assert report["models"][0]["name"] == f"{model_dir.name}+s.safetensors"
    cells = {(a["length"], a["depth"]): a["total"] for a in report["accuracy"]}
    assert cells == {(200, None): 2, (200, 0.0): 1, (200, 100.0): 1}
    assert sorted(c["depth"] for c in report["cases"]) == [0.0, 100.0]
    assert "accuracy by depth" in result.output
    assert plot.read_text().lstrip().startswith("<?xml")


def test_eval_errors_are_one_line(tmp_path: Path, smollm2_gguf: Path, tiny_model) -> None:
    missing = tmp_path / "missing.gguf"
    one_line_error(invoke("eval", missing, "--lengths", 128, "--samples", 1), "missing.gguf", "no such")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("these are not weights\n")
    one_line_error(invoke("eval", not_gguf, "--lengths", 128, "--samples", 1), "not a GGUF file")
    # right magic, garbage after it: llama.cpp's own loader refuses it
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_gguf.read_bytes()[:4096])
    result = invoke("eval", broken, "--lengths", 128, "--samples", 1, "-q")
    one_line_error(result, "broken.gguf")
    one_line_error(invoke("eval", smollm2_gguf, "--scales", tmp_path / "s.safetensors", "--samples", 1),
                   "--scales applies to HF model folders")
    existing = tmp_path / "out.json"
    existing.write_text("{}")
    one_line_error(invoke("eval", smollm2_gguf, "--samples", 1, "--json", existing), "already exists")
    assert existing.read_text() == "{}"
    one_line_error(invoke("eval", smollm2_gguf, "--samples", 1, "--plot", tmp_path / "p.jpg"), ".png")
    one_line_error(invoke("eval", smollm2_gguf, smollm2_gguf, "--samples", 1), "listed twice")
    for option in ("--samples", "--max-tokens"):  # a value out of range is a usage error naming the option
        usage = invoke("eval", smollm2_gguf, option, 0)
        assert usage.exit_code == 2 and f"Invalid value for '{option}'" in usage.output, usage.output
    usage = invoke("eval", smollm2_gguf, "--lengths", "1k,2k")
    assert usage.exit_code == 2 and "comma-separated" in usage.output


def test_wilson_formula_matches_its_definition() -> None:
    # the interval's ends are the two roots of |p_hat - p| = z * sqrt(p (1 - p) / n)
    k, n, z = 7, 12, 1.959963984540054
    for end in wilson_interval(k, n):
        assert abs(k / n - end) == pytest.approx(z * math.sqrt(end * (1 - end) / n), abs=1e-9)


def test_lengths_beyond_the_context_are_refused_first(tiny_model, smollm2_gguf: Path) -> None:
    """A prompt longer than the model's context fails before any case runs, naming the context and
    the remedy: the model past its context is not the model the scales were made for."""
    from seal_gguf.model.rope import RopeScaling

    folder = tiny_model("llama")  # max_position_embeddings 4096
    with pytest.raises(InputError, match="does not fit its context of 4096 tokens; .*--rope-scaling"):
        evaluate([folder], "lines", [4090], 1, progress=False)
    with pytest.raises(InputError, match="does not fit its context of 8192 tokens"):
        evaluate([smollm2_gguf], "lines", [9000], 1, progress=False)
    with pytest.raises(InputError, match="does not fit its context of 8192 tokens"):  # x2 of 4096 is not enough
        evaluate([folder], "lines", [9000], 1, progress=False, rope=RopeScaling("linear", 2.0))
