"""Which heads matter (`seal-gguf heads`): attribution (the gradient) against finite differences, the
batched, prefix-reusing exact ablation against naive hooked runs, top-K exact ablation against the
full sweep, the CSV and heat maps, and `inspect --plot` on scales files."""

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
    CHANNEL_CSV_COLUMNS,
    HEAD_CSV_COLUMNS,
    _row_factors,
    _scores,
    _teacher_forced,
    answer_gradient,
    decoder_layers,
    exact_head_count,
    largest_heads,
    measure_heads,
    parse_factors,
    score_head_factors,
    single_head_rows,
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
    report = measure_heads(model, layout, tokenizer, cases, factors=(0.0,),
                           exact_heads=layout.num_layers * layout.num_heads, batch_size=3, progress=False)
    assert bool(report.ablated.all())
    assert all("forward" not in vars(layer) for layer in decoder_layers(model, layout))
    assert all(not o_proj._forward_pre_hooks for o_proj in o_proj_modules(model, layout))
    assert report.grid(0.0).shape == (layout.num_layers, layout.num_heads)
    # the baseline afterwards is the plain model's
    prompt_ids, answer_ids = encode_case(tokenizer, cases[0])
    (base, _), _ = score_head_factors(model, layout, prompt_ids, answer_ids, {0: torch.ones(1, layout.num_heads)})
    with torch.no_grad():
        assert base == pytest.approx(answer_loss(model, prompt_ids, answer_ids, CPU).item(), rel=1e-5)


# -- attribution --

# Central differences in float64: 1 +- EPS is exact in float32 (score_head_factors' factors). The
# models' RMSNorms still round to float32 (about 1e-7 of the loss), so a smaller step would measure
# that noise: at 2^-8 noise and the step's own error (~eps^2) each stay near 1e-4.
EPS = 2.0 ** -8
FD_TOLERANCE = {"rtol": 1e-3, "atol": 3e-4}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_gradient_equals_finite_differences(tiny_model, model_type: str) -> None:
    """d(answer loss)/d(scale) of every head from one backward pass equals the central difference
    (loss(1 + eps) - loss(1 - eps)) / 2 eps, each loss from exact ablation, in float64; the weights get
    no gradients and the hooks are gone afterwards."""
    model, layout, prompt_ids, answer_ids = _model_and_case(tiny_model(model_type, num_hidden_layers=3))
    model.double()
    loss, correct, gradient = answer_gradient(model, layout, prompt_ids, answer_ids)
    assert gradient.shape == (layout.num_layers, layout.num_heads) and gradient.dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())
    assert all(not o_proj._forward_pre_hooks for o_proj in o_proj_modules(model, layout))

    rows = single_head_rows(layout, (1 + EPS, 1 - EPS))
    (base_loss, base_correct), per_layer = score_head_factors(
        model, layout, prompt_ids, answer_ids, {layer: rows for layer in range(layout.num_layers)})
    assert loss == pytest.approx(base_loss, rel=1e-12) and correct == base_correct
    up, down = torch.stack([per_layer[layer][0] for layer in range(layout.num_layers)]).view(
        layout.num_layers, 2, layout.num_heads).unbind(dim=1)
    finite_difference = (up - down) / (2 * EPS)
    assert finite_difference.abs().max() > 10 * FD_TOLERANCE["atol"]  # the comparison is not vacuous
    torch.testing.assert_close(gradient.double(), finite_difference, **FD_TOLERANCE)


def test_channel_gradient_sums_to_the_head_gradient(llama: Path) -> None:
    """SEAL-C granularity: [layers, heads, head_dim]; a head's channels sum to its head gradient (scaling
    every channel of a head scales the head), and single channels match central differences."""
    model, layout, prompt_ids, answer_ids = _model_and_case(llama)
    model.double()
    _, _, per_head = answer_gradient(model, layout, prompt_ids, answer_ids, "head")
    _, _, per_channel = answer_gradient(model, layout, prompt_ids, answer_ids, "channel")
    assert per_channel.shape == (layout.num_layers, layout.num_heads, layout.head_dim)
    torch.testing.assert_close(per_channel.sum(dim=-1), per_head, rtol=1e-5, atol=1e-7)
    ids, answer = _teacher_forced(prompt_ids, answer_ids, CPU)
    largest = tuple(int(i) for i in torch.unravel_index(per_channel.abs().argmax(), per_channel.shape))
    for where in (largest, (0, 1, 5), (2, 3, layout.head_dim - 1)):
        losses = []
        for step in (EPS, -EPS):
            scales = identity_scales(layout, "channel")
            scales[where] += step
            with attach_scales(model, layout, scales), torch.no_grad():
                losses.append(_scores(model, ids, answer)[0].item())
        finite_difference = (losses[0] - losses[1]) / (2 * EPS)
        assert per_channel[where].item() == pytest.approx(finite_difference, rel=FD_TOLERANCE["rtol"],
                                                          abs=FD_TOLERANCE["atol"]), where
    assert per_channel.abs().max() > 10 * FD_TOLERANCE["atol"]  # the largest channel is checked closely


def test_largest_heads_ranks_by_magnitude_of_either_sign() -> None:
    gradient = torch.tensor([[0.1, -0.5, 0.0], [0.3, 0.0, -0.2]])
    assert largest_heads(gradient, 3) == [(0, 1), (1, 0), (1, 2)]


def test_exact_top_k_equals_the_full_sweep(llama: Path) -> None:
    """--exact K: the K heads with the largest |gradient| are ablated, and only they, with the values
    the full sweep gives them; the gradient and the estimate do not depend on it."""
    model, layout = load_model(llama, CPU, "float32", progress=False)
    tokenizer = load_tokenizer(llama)
    cases = make_cases(tokenizer, "lines", LENGTH, 2, seed=1)
    total, k = layout.num_layers * layout.num_heads, 5
    full = measure_heads(model, layout, tokenizer, cases, FACTORS, exact_heads=total, batch_size=5, progress=False)
    top = measure_heads(model, layout, tokenizer, cases, FACTORS, exact_heads=k, batch_size=4, progress=False)
    assert not full.loss.isnan().any() and not full.accuracy.isnan().any()
    torch.testing.assert_close(top.gradient, full.gradient)
    assert (top.base_loss, top.base_accuracy) == pytest.approx((full.base_loss, full.base_accuracy))
    chosen = top.ablated
    assert int(chosen.sum()) == k
    assert {tuple(i) for i in chosen.nonzero().tolist()} == set(largest_heads(full.gradient, k))
    assert full.gradient.abs()[chosen].min() >= full.gradient.abs()[~chosen].max()
    torch.testing.assert_close(top.loss[:, chosen], full.loss[:, chosen], rtol=1e-5, atol=1e-6)
    assert torch.equal(top.accuracy[:, chosen], full.accuracy[:, chosen])
    assert top.loss[:, ~chosen].isnan().all() and top.accuracy[:, ~chosen].isnan().all()
    for factor in FACTORS:
        torch.testing.assert_close(top.grid(factor, "estimated_delta_loss"), (factor - 1) * full.gradient)
    none = measure_heads(model, layout, tokenizer, cases, FACTORS, progress=False)
    assert not none.ablated.any() and none.ablation_seconds == 0.0
    for bad in ({"exact_heads": total + 1}, {"exact_heads": -1}, {"exact_heads": 1, "granularity": "channel"}):
        with pytest.raises(InputError):
            measure_heads(model, layout, tokenizer, cases, FACTORS, progress=False, **bad)


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_gradient_checkpointing_gives_the_same_gradients(llama: Path, granularity: str) -> None:
    """Recomputing each layer's activations in the backward pass changes the memory, not the result;
    the model is left in eval mode, with no weight gradients."""
    model, layout = load_model(llama, CPU, "float32", progress=False)
    tokenizer = load_tokenizer(llama)
    cases = make_cases(tokenizer, "lines", LENGTH, 2, seed=3)
    kept = measure_heads(model, layout, tokenizer, cases, FACTORS, granularity, progress=False,
                         gradient_checkpointing=False)
    recomputed = measure_heads(model, layout, tokenizer, cases, FACTORS, granularity, progress=False)
    torch.testing.assert_close(recomputed.gradient, kept.gradient, rtol=1e-5, atol=1e-7)
    assert recomputed.base_loss == pytest.approx(kept.base_loss, rel=1e-6)
    assert not any(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())


def test_exact_head_count(llama: Path) -> None:
    from seal_gguf.model.architectures import model_layout

    layout = model_layout(llama)  # 3 layers x 4 heads
    assert exact_head_count(layout, "head", "attribution", None) == 0
    assert exact_head_count(layout, "head", "attribution", 5) == 5
    assert exact_head_count(layout, "head", "attribution", 12) == 12
    assert exact_head_count(layout, "head", "exact", None) == 12
    assert exact_head_count(layout, "channel", "attribution", None) == 0
    for granularity, mode, top in (("head", "attribution", 0), ("head", "attribution", 13), ("head", "exact", 3),
                                   ("channel", "exact", None), ("channel", "attribution", 2), ("head", "all", None)):
        with pytest.raises(InputError):
            exact_head_count(layout, granularity, mode, top)


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


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


LAYERS, HEADS, HEAD_DIM = 3, 4, 64  # the llama fixture's
EXACT_COLUMNS = ("delta_loss", "delta_accuracy", "loss", "accuracy")


def test_heads_cli_attribution_then_exact_top_k(llama: Path, tmp_path: Path) -> None:
    """The default is attribution: every head estimated, the exact columns empty; --exact 3 fills them
    for the same 3 heads at every factor and keeps the estimates."""
    common = ["--length", str(LENGTH), "--samples", "2", "--factors", "0,1.1", "--batch-size", "3", "-q"]
    estimated, plot = tmp_path / "estimated.csv", tmp_path / "estimated.png"
    result = _invoke("heads", str(llama), "-o", str(estimated), "--plot", str(plot), *common)
    assert result.exit_code == 0, result.output
    assert "no first-order estimate" in result.output and "Exact:" not in result.output
    rows = _read_csv(estimated)
    assert tuple(rows[0]) == HEAD_CSV_COLUMNS
    assert {(r["layer"], r["head"], r["factor"]) for r in rows} == {
        (str(layer), str(head), factor) for layer in range(LAYERS) for head in range(HEADS) for factor in ("0", "1.1")}
    assert len(rows) == 2 * LAYERS * HEADS
    for r in rows:
        assert r["estimated_delta_loss"] != "" and all(r[column] == "" for column in EXACT_COLUMNS)
        assert r["cases"] == "2" and r["base_loss"] != ""
    # the estimate is (factor - 1) x one gradient: the two factors' estimates are in ratio -1 : 0.1
    by_head = {(r["layer"], r["head"], r["factor"]): float(r["estimated_delta_loss"]) for r in rows}
    for layer in range(LAYERS):
        for head in range(HEADS):
            zeroed, nudged = by_head[str(layer), str(head), "0"], by_head[str(layer), str(head), "1.1"]
            assert nudged == pytest.approx(-0.1 * zeroed, rel=1e-5, abs=1e-9)
    assert plot.read_bytes()[:8] == PNG_MAGIC

    top, top_plot = tmp_path / "top.csv", tmp_path / "top.png"
    result = _invoke("heads", str(llama), "-o", str(top), "--plot", str(top_plot), "--exact", "3", *common)
    assert result.exit_code == 0, result.output
    assert "Exact: 3 heads x 2 factor(s)" in result.output
    rows = _read_csv(top)
    assert len(rows) == 2 * LAYERS * HEADS
    ablated = {factor: {(r["layer"], r["head"]) for r in rows if r["factor"] == factor and r["delta_loss"] != ""}
               for factor in ("0", "1.1")}
    assert len(ablated["0"]) == 3 and ablated["0"] == ablated["1.1"]
    removal = {(layer, head): abs(value) for (layer, head, factor), value in by_head.items() if factor == "0"}
    assert ablated["0"] == set(sorted(removal, key=removal.__getitem__, reverse=True)[:3])
    for r in rows:
        assert float(r["estimated_delta_loss"]) == pytest.approx(by_head[r["layer"], r["head"], r["factor"]],
                                                                rel=1e-5, abs=1e-9)
        if (r["layer"], r["head"]) in ablated["0"]:
            assert float(r["delta_loss"]) == pytest.approx(float(r["loss"]) - float(r["base_loss"]), abs=1e-5)
            assert float(r["delta_accuracy"]) == pytest.approx(float(r["accuracy"]) - float(r["base_accuracy"]))
        else:
            assert all(r[column] == "" for column in EXACT_COLUMNS)
    assert top_plot.read_bytes()[:8] == PNG_MAGIC


def test_heads_cli_full_sweep(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads.csv"
    result = _invoke("heads", str(llama), "-o", str(out), "--mode", "exact", "--length", str(LENGTH),
                     "--samples", "2", "--factors", "0,1.1", "--batch-size", "3", "-q")
    assert result.exit_code == 0, result.output
    assert f"Exact: {LAYERS * HEADS} heads x 2 factor(s)" in result.output
    rows = _read_csv(out)
    assert len(rows) == 2 * LAYERS * HEADS
    for r in rows:
        assert r["estimated_delta_loss"] != ""
        assert float(r["delta_loss"]) == pytest.approx(float(r["loss"]) - float(r["base_loss"]), abs=1e-5)
    assert "Wrote" in result.output and str(out) in result.output


def test_heads_cli_channels(llama: Path, tmp_path: Path) -> None:
    """--granularity channel: one row per channel; each head's channels sum to its head estimate."""
    common = ["--length", str(LENGTH), "--samples", "1", "-q"]
    heads_csv, channels_csv, plot = tmp_path / "heads.csv", tmp_path / "channels.csv", tmp_path / "channels.png"
    assert _invoke("heads", str(llama), "-o", str(heads_csv), *common).exit_code == 0
    result = _invoke("heads", str(llama), "-o", str(channels_csv), "--granularity", "channel", "--plot", str(plot),
                     *common)
    assert result.exit_code == 0, result.output
    assert f"{LAYERS} layers x {HEADS} heads x {HEAD_DIM} channels" in result.output
    rows = _read_csv(channels_csv)
    assert tuple(rows[0]) == CHANNEL_CSV_COLUMNS
    assert len(rows) == LAYERS * HEADS * HEAD_DIM
    sums: dict[tuple[str, str], float] = {}
    for r in rows:
        sums[r["layer"], r["head"]] = sums.get((r["layer"], r["head"]), 0.0) + float(r["estimated_delta_loss"])
    for r in _read_csv(heads_csv):
        assert sums[r["layer"], r["head"]] == pytest.approx(float(r["estimated_delta_loss"]), rel=1e-4, abs=1e-7)
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_heads_cli_errors(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads.csv"
    out.write_text("keep me")
    assert "already exists" in _error_line(_invoke("heads", str(llama), "-o", str(out), "-q"))
    assert out.read_text() == "keep me"

    fresh = tmp_path / "fresh.csv"
    for args, message in (
        (["--plot", str(tmp_path / "heads.jpg")], "plot file must end in"),
        (["--plot", str(fresh)], "the CSV and the --plot are the same file"),
        (["--factors", "0,1"], "baseline"),
        (["--length", "5"], "too short"),
        (["--exact", "0"], "--exact 0: give 1 to 12 heads"),
        (["--exact", "13"], "--exact 13: give 1 to 12 heads"),
        (["--mode", "exact", "--exact", "3"], "give one of them"),
        (["--granularity", "channel", "--exact", "2"], "attribution only"),
        (["--granularity", "channel", "--mode", "exact"], "attribution only"),
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
