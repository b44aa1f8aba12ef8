"""Head ablation (`seal-gguf heads`): the batched, prefix-reusing sweep against naive hooked runs,
the CSV and heat maps, and `inspect --plot` on scales files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seal_gguf.cases import encode_case
from seal_gguf.cli.app import cli
from seal_gguf.constants import CONFIG_FOLD_KEY
from seal_gguf.errors import InputError
from seal_gguf.learn.objective import answer_loss
from seal_gguf.measure.heads import (
    CSV_COLUMNS,
    _row_factors,
    decoder_layers,
    parse_factors,
    score_head_factors,
    single_head_rows,
    sweep_heads,
)
from seal_gguf.model.generate import greedy_continuation
from seal_gguf.model.hooks import attach_scales, o_proj_modules
from seal_gguf.model.loading import load_model, load_tokenizer
from seal_gguf.scales import identity_scales, save_scales
from seal_gguf.tasks import make_cases

CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FACTORS = (0.0, 1.5)
LENGTH = 280  # a few lines of the lines task: the shortest case the tokenizer allows, with room


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama", num_hidden_layers=3)


def _model_and_case(model_dir: Path):
    model, layout = load_model(model_dir, CPU, "float32", progress=False)
    tokenizer = load_tokenizer(model_dir)
    (case,) = make_cases(tokenizer, "lines", LENGTH, 1, seed=0)
    prompt_ids, _ = encode_case(tokenizer, case)
    # the model's own greedy answer: correct at baseline, so ablations can flip it
    answer_ids = greedy_continuation(model, prompt_ids, 4, set(), CPU)
    return model, layout, prompt_ids, answer_ids


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_batched_sweep_equals_one_hooked_run_per_ablation(tiny_model, model_type: str) -> None:
    """The key correctness check: bypassed prefixes and per-row factors give what one forward pass per
    ablation with SEAL's own hooks gives; correct == greedy decoding reproduces the answer."""
    model, layout, prompt_ids, answer_ids = _model_and_case(tiny_model(model_type, num_hidden_layers=3))
    rows = single_head_rows(layout, FACTORS)
    (base_loss, base_correct), batched = score_head_factors(
        model, layout, prompt_ids, answer_ids, {layer: rows for layer in range(layout.num_layers)}, batch_size=5)
    assert base_correct
    with torch.no_grad():
        assert base_loss == pytest.approx(answer_loss(model, prompt_ids, answer_ids, CPU).item(), rel=1e-5)
    flips = 0
    for layer in range(layout.num_layers):
        losses, corrects = batched[layer]
        assert losses.shape == corrects.shape == (len(FACTORS) * layout.num_heads,)
        for r, factors in enumerate(rows):
            scales = identity_scales(layout, "head")
            scales[layer] = factors
            with attach_scales(model, layout, scales), torch.no_grad():
                naive_loss = answer_loss(model, prompt_ids, answer_ids, CPU).item()
                naive_correct = greedy_continuation(model, prompt_ids, len(answer_ids), set(), CPU) == answer_ids
            assert losses[r].item() == pytest.approx(naive_loss, rel=1e-4, abs=1e-5), (layer, r)
            assert bool(corrects[r]) == naive_correct, (layer, r)
            flips += not naive_correct
        assert (losses != base_loss).any()  # the ablations do something
    if model_type == "llama":  # (random gemma3 weights give an answer that no single head changes)
        assert flips > 0  # some ablation changes the answer: the accuracy comparison is not vacuous


def test_zeroing_a_whole_layer(llama: Path) -> None:
    """Row factors follow the column layout: removing every head of a layer equals zeroing its o_proj
    weight, and its effect on o_proj's output is the sum of the single-head removals'."""
    model, layout, prompt_ids, answer_ids = _model_and_case(llama)
    layer = 1
    (_, _), result = score_head_factors(model, layout, prompt_ids, answer_ids,
                                        {layer: torch.zeros(1, layout.num_heads)})
    o_proj = o_proj_modules(model, layout)[layer]
    saved = o_proj.weight.detach().clone()
    with torch.no_grad():
        o_proj.weight.zero_()
        zeroed_weight = answer_loss(model, prompt_ids, answer_ids, CPU).item()
        o_proj.weight.copy_(saved)
    assert result[layer][0][0].item() == pytest.approx(zeroed_weight, rel=1e-4, abs=1e-5)

    rows = torch.cat([torch.ones(1, layout.num_heads), single_head_rows(layout, [0.0]),
                      torch.zeros(1, layout.num_heads)])
    outputs = []
    handle = o_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    ids = torch.tensor([prompt_ids]).expand(len(rows), -1)
    try:
        with _row_factors(o_proj, rows, layout.head_dim), torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
    finally:
        handle.remove()
    (out,) = outputs
    full, singles, none = out[0], out[1:-1], out[-1]
    assert torch.allclose((full - singles).sum(dim=0), full - none, atol=1e-5)
    assert torch.count_nonzero(none) == 0


def test_decoder_layers_are_restored_after_a_sweep(llama: Path) -> None:
    model, layout = load_model(llama, CPU, "float32", progress=False)
    tokenizer = load_tokenizer(llama)
    cases = make_cases(tokenizer, "passkey", 200, 2, seed=3)
    report = sweep_heads(model, layout, tokenizer, cases, factors=(0.0,), batch_size=3, progress=False)
    assert len(report.effects) == layout.num_layers * layout.num_heads
    assert all("forward" not in vars(layer) for layer in decoder_layers(model, layout))
    assert report.grid(0.0).shape == (layout.num_layers, layout.num_heads)
    # the baseline afterwards is the plain model's
    prompt_ids, answer_ids = encode_case(tokenizer, cases[0])
    (base, _), _ = score_head_factors(model, layout, prompt_ids, answer_ids, {0: torch.ones(1, layout.num_heads)})
    with torch.no_grad():
        assert base == pytest.approx(answer_loss(model, prompt_ids, answer_ids, CPU).item(), rel=1e-5)


def test_parse_factors() -> None:
    assert parse_factors("0") == (0.0,)
    assert parse_factors("0, 0.9,1.1,0.9") == (0.0, 0.9, 1.1)
    for bad in ("1", "x", "-0.5", "nan", ""):
        with pytest.raises(InputError):
            parse_factors(bad)


# -- CLI --

def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_heads_cli_writes_csv_and_heat_map(llama: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "heads.csv", tmp_path / "heads.png"
    result = _invoke("heads", str(llama), "-o", str(out), "--plot", str(plot), "--length", str(LENGTH),
                     "--samples", "2", "--factors", "0,1.1", "--batch-size", "3", "-q")
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    layers, heads = 3, 4
    assert len(rows) == 2 * layers * heads
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {(r["layer"], r["head"], r["factor"]) for r in rows} == {
        (str(layer), str(head), factor) for layer in range(layers) for head in range(heads) for factor in ("0", "1.1")}
    for r in rows:
        assert float(r["delta_loss"]) == pytest.approx(float(r["loss"]) - float(r["base_loss"]), abs=1e-5)
        assert r["cases"] == "2"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert "Wrote" in result.output and str(out) in result.output


def test_heads_cli_errors(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads.csv"
    out.write_text("keep me")
    assert "already exists" in _error_line(_invoke("heads", str(llama), "-o", str(out), "-q"))
    assert out.read_text() == "keep me"

    fresh = tmp_path / "fresh.csv"
    for args, message in (
        (["--plot", str(tmp_path / "heads.jpg")], "plot file must end in"),
        (["--factors", "0,1"], "baseline"),
        (["--length", "5"], "too short"),
    ):
        assert message in _error_line(_invoke("heads", str(llama), "-o", str(fresh), "-q", *args))
        assert not fresh.exists() and not (tmp_path / "heads.jpg").exists()
    assert "no such folder" in _error_line(_invoke("heads", str(tmp_path / "missing"), "-o", str(fresh), "-q"))

    folded = tmp_path / "folded"
    shutil.copytree(llama, folded)
    config = json.loads((folded / "config.json").read_text())
    config[CONFIG_FOLD_KEY] = {"scales_sha256": "0" * 64}
    (folded / "config.json").write_text(json.dumps(config))
    assert "fold" in _error_line(_invoke("heads", str(folded), "-o", str(fresh), "-q", "--length", str(LENGTH),
                                         "--samples", "1"))
    assert not fresh.exists()


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_inspect_plot_draws_scales(llama: Path, tmp_path: Path, granularity: str) -> None:
    from seal_gguf.model.architectures import model_layout

    layout = model_layout(llama)
    scales = tmp_path / "scales.safetensors"
    values = identity_scales(layout, granularity) + 0.1 * torch.rand(identity_scales(layout, granularity).shape)
    save_scales(scales, values, layout, granularity)
    plot = tmp_path / "scales.png"
    result = _invoke("inspect", str(scales), "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert "already exists" in _error_line(_invoke("inspect", str(scales), "--plot", str(plot)))
    assert _invoke("inspect", str(scales), "--plot", str(plot), "--force").exit_code == 0


def test_inspect_plot_refuses_other_inputs(llama: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    plot = tmp_path / "x.png"
    for path in (smollm2_gguf, llama):
        assert "--plot" in _error_line(_invoke("inspect", str(path), "--plot", str(plot)))
        assert not plot.exists()
