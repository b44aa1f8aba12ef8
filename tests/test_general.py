"""What SEAL costs on general text (seal_gguf.measure.general) and the anchor text (seal_gguf.learn.anchor).

Tiny random llama models: identity scales cost exactly nothing in PyTorch and through llama.cpp,
scaled heads cost something, SEAL-C works, a GGUF pair with another vocabulary is refused; the
built-in measurement text and the trainer's anchor text are long enough and share nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from seal_gguf.errors import InputError, ScalesError
from seal_gguf.kld import PositionStats
from seal_gguf.learn.anchor import anchor_documents, anchor_windows, split_windows
from seal_gguf.measure.general import CostSummary, check_same_vocabulary, cost_gguf, cost_pytorch
from seal_gguf.measure.texts import general_documents
from seal_gguf.model.loading import load_model, load_tokenizer
from seal_gguf.scales import expected_shape, identity_scales, save_scales
from seal_gguf.texts import Document, read_text_document

CTX = 128
TOKENS = 600  # per PyTorch run: 120 tokens of each built-in document


@pytest.fixture(scope="module")
def llama(tiny_model: Callable[..., Path]) -> dict:
    model_dir = tiny_model("llama")
    model, layout = load_model(model_dir, torch.device("cpu"), "float32", progress=False)
    return {"dir": model_dir, "model": model, "layout": layout, "tokenizer": load_tokenizer(model_dir)}


def scaled(layout, granularity: str, spread: float, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(spread * torch.randn(expected_shape(layout, granularity), generator=g))


# -- PyTorch --

@pytest.mark.engine
def test_identity_costs_nothing_pytorch(llama: dict) -> None:
    layout = llama["layout"]
    cost = cost_pytorch(llama["model"], layout, identity_scales(layout, "head"), llama["tokenizer"],
                        ctx=CTX, max_tokens=TOKENS)
    assert cost.ppl_ratio == 1.0 and cost.mean_kld == 0.0 and cost.p99_kld == 0.0
    assert cost.same_top == 1.0 and cost.ppl_base == cost.ppl_seal
    assert TOKENS - 10 <= cost.tokens <= TOKENS  # every document is cut to its share
    assert "PPL ×1.000" in cost.describe() and "same top-1 100.0%" in cost.describe()


@pytest.mark.engine
@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_scaled_heads_cost_something_pytorch(llama: dict, granularity: str) -> None:
    model, layout = llama["model"], llama["layout"]
    values = torch.nn.Parameter(scaled(layout, granularity, 1.0))  # as the trainer holds them
    before = [p.detach().clone() for p in model.parameters()]
    cost = cost_pytorch(model, layout, values, llama["tokenizer"], ctx=CTX, max_tokens=TOKENS)
    assert cost.mean_kld > 1e-4 and cost.p99_kld >= cost.mean_kld
    assert cost.ppl_ratio != 1.0 and cost.ppl_ratio == pytest.approx(cost.ppl_seal / cost.ppl_base)
    assert cost.ppl_ratio_stderr is not None and cost.ppl_ratio_stderr > 0 and cost.mean_kld_stderr > 0
    assert 0.0 <= cost.same_top < 1.0
    # no hook is left behind and the weights are untouched
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    again = cost_pytorch(model, layout, values, llama["tokenizer"], ctx=CTX, max_tokens=TOKENS)
    assert again == cost  # deterministic, and the base pass is the unhooked model


@pytest.mark.engine
def test_user_text_and_bad_scales(llama: dict, tmp_path: Path) -> None:
    model, layout, tokenizer = llama["model"], llama["layout"], llama["tokenizer"]
    path = tmp_path / "mine.txt"
    path.write_text("A short text of my own about rivers and the bridges over them. " * 4, encoding="utf-8")
    cost = cost_pytorch(model, layout, scaled(layout, "head", 0.5), tokenizer, documents=[read_text_document(path)])
    assert 40 <= cost.tokens <= 80
    with pytest.raises(ScalesError, match="do not fit the model"):
        cost_pytorch(model, layout, torch.ones(layout.num_layers + 1, layout.num_heads), tokenizer)
    with pytest.raises(InputError, match="at least 16 tokens"):
        cost_pytorch(model, layout, scaled(layout, "head", 0.5), tokenizer, ctx=8)
    with pytest.raises(InputError, match="no position to score"):
        cost_pytorch(model, layout, scaled(layout, "head", 0.5), tokenizer, documents=[Document("empty", "")])


# -- llama.cpp --

@pytest.fixture(scope="module")
def ggufs(llama: dict, tiny_model: Callable[..., Path], module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """f32 GGUFs of the tiny llama: base, identity scales folded, scaled heads folded, and the same
    weights with another vocabulary (a SentencePiece tokenizer.model, which llama's converter prefers)."""
    from seal_gguf.convert.to_gguf import convert_to_gguf

    out = module_tmp("general-ggufs")
    layout = llama["layout"]
    files = {"base": convert_to_gguf(llama["dir"], out / "base.gguf", "f32", progress=False)}
    for name, values in [("identity", identity_scales(layout, "head")), ("seal", scaled(layout, "head", 1.0))]:
        scales = out / f"{name}.safetensors"
        save_scales(scales, values, layout, "head", force=True)
        files[name] = convert_to_gguf(llama["dir"], out / f"{name}.gguf", "f32", scales, progress=False)
    files["other_vocab"] = convert_to_gguf(tiny_model("llama", spm_tokenizer=True), out / "other-vocab.gguf",
                                           "f32", progress=False)
    return files


@pytest.mark.engine
def test_identity_costs_nothing_gguf(ggufs: dict[str, Path]) -> None:
    cost = cost_gguf(ggufs["identity"], ggufs["base"], ctx=CTX, max_tokens=TOKENS)
    assert cost.ppl_ratio == 1.0 and cost.mean_kld == 0.0 and cost.same_top == 1.0
    assert TOKENS - 10 <= cost.tokens <= TOKENS


@pytest.mark.engine
def test_scaled_heads_cost_something_gguf(ggufs: dict[str, Path], llama: dict) -> None:
    cost = cost_gguf(ggufs["seal"], ggufs["base"], ctx=CTX, max_tokens=TOKENS)
    assert cost.mean_kld > 1e-4 and cost.ppl_ratio != 1.0 and cost.same_top < 1.0
    json.dumps(cost.to_dict())  # fit for a report or the scales' provenance
    # the same figures as PyTorch when both engines are given the same ids (f32, so close)
    layout = llama["layout"]
    torch_cost = cost_pytorch(llama["model"], layout, scaled(layout, "head", 1.0), llama["tokenizer"],
                              ctx=CTX, max_tokens=TOKENS)
    gguf_cost = cost_gguf(ggufs["seal"], ggufs["base"], ctx=CTX, max_tokens=TOKENS, tokenizer=llama["tokenizer"])
    assert gguf_cost.tokens == torch_cost.tokens
    assert gguf_cost.mean_kld == pytest.approx(torch_cost.mean_kld, rel=1e-2)
    assert gguf_cost.ppl_ratio == pytest.approx(torch_cost.ppl_ratio, rel=1e-3)


@pytest.mark.engine
def test_other_vocabulary_refused(ggufs: dict[str, Path]) -> None:
    for seal, base in [(ggufs["other_vocab"], ggufs["base"]), (ggufs["seal"], ggufs["other_vocab"])]:
        with pytest.raises(InputError) as info:
            cost_gguf(seal, base, ctx=CTX, max_tokens=TOKENS)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(seal)) and "vocabulary" in message
        assert base.name in message
    check_same_vocabulary(ggufs["seal"], ggufs["base"])  # same vocabulary: no error


@pytest.mark.engine
def test_not_a_gguf_refused(ggufs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(InputError, match="not a GGUF"):
        cost_gguf(bad, ggufs["base"])


# -- the figures --

@pytest.mark.unit
def test_summary_from_stats() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 20))
    test = ref + rng.normal(scale=0.3, size=ref.shape)
    stats = PositionStats()
    stats.add(ref, test, rng.integers(0, 20, size=50))
    cost = CostSummary.from_stats(stats)
    assert cost.tokens == 50 and cost.mean_kld > 0 and 0 < cost.same_top <= 1
    lp_ref, lp_test = np.concatenate(stats.logp_ref), np.concatenate(stats.logp_test)
    assert cost.ppl_ratio == pytest.approx(np.exp(np.mean(lp_ref - lp_test)))
    assert cost.ppl_ratio_stderr == pytest.approx(cost.ppl_ratio * np.std(lp_ref - lp_test, ddof=1) / np.sqrt(50))
    assert set(cost.to_dict()) >= {"tokens", "ppl_base", "ppl_seal", "ppl_ratio", "mean_kld", "p99_kld", "same_top"}


@pytest.mark.unit
def test_describe() -> None:
    cost = CostSummary(tokens=4096, ppl_base=15.6, ppl_seal=15.9, ppl_ratio=1.0192, ppl_ratio_stderr=None,
                       mean_kld=0.0123, mean_kld_stderr=0.001, p99_kld=0.0912, same_top=0.9713, same_top_stderr=0.002)
    assert cost.describe() == ("PPL ×1.019 (15.6 → 15.9), mean KLD 0.0123, 99% KLD 0.0912, same top-1 97.1% "
                               "over 4,096 scored positions")


# -- the texts --

@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    """The tiny models' tokenizer (SmolLM2's), without building a model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.unit
def test_general_documents_genres(tokenizer) -> None:
    docs = general_documents()
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert len(docs) >= 4
    assert {"prose", "dialogue", "code", "technical"} <= {d.name.split("_", 1)[1].removesuffix(".txt") for d in docs}
    for doc in docs:
        assert len(tokenizer(doc.text, add_special_tokens=False)["input_ids"]) >= 500, doc.name


def _long_lines(docs: list[Document]) -> set[str]:
    return {line.strip() for d in docs for line in d.text.splitlines() if len(line.strip()) > 40}


@pytest.mark.unit
def test_measurement_and_anchor_text_disjoint() -> None:
    general, anchor = general_documents(), anchor_documents()
    assert 4 <= len(anchor) <= 6
    assert not _long_lines(general) & _long_lines(anchor)
    assert not {d.text for d in general} & {d.text for d in anchor}


@pytest.mark.unit
def test_split_windows() -> None:
    # full-length windows, the last one aligned to the document's end; a leading BOS is kept once
    assert split_windows(list(range(10, 20)), [1], 4) == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18],
                                                         [1, 17, 18, 19]]
    assert split_windows([1, 10, 11, 12, 13, 14, 15], [1], 4) == [[1, 10, 11, 12], [1, 13, 14, 15]]
    assert split_windows([5, 6], [1], 8) == [[1, 5, 6]]
    assert split_windows([5, 6, 7, 8], [], 2) == [[5, 6], [7, 8]]
    assert split_windows([], [1], 8) == [] and split_windows([5], [], 8) == []
    with pytest.raises(InputError, match="no room"):
        split_windows([5, 6], [1], 1)


@pytest.mark.unit
def test_anchor_windows(tokenizer, tmp_path: Path) -> None:
    windows = anchor_windows(tokenizer, 256)
    assert len(windows) >= 8 and all(len(w) == 256 for w in windows)
    path = tmp_path / "anchor.txt"
    path.write_text("Some general text of my own. " * 10, encoding="utf-8")
    mine = anchor_windows(tokenizer, 32, anchor_documents(path))
    assert mine and all(len(w) == 32 for w in mine)
    with pytest.raises(InputError, match="empty after tokenization"):
        anchor_windows(tokenizer, 32, [Document("empty", "")])
    with pytest.raises(InputError, match=r"no anchor document fills one window of 100000 tokens \(the longest gives"):
        anchor_windows(tokenizer, 100_000)
    with pytest.raises(InputError, match="no anchor document fills one window of 256 tokens"):
        anchor_windows(tokenizer, 256, [Document("short", "hello world")])
    with pytest.raises(InputError, match="no such"):
        anchor_documents(tmp_path / "missing.txt")


# -- in validate --

@pytest.mark.engine
def test_validate_reports_the_cost(llama: dict, ggufs: dict[str, Path], tmp_path: Path) -> None:
    """validate measures the cost hooked vs unhooked and SEAL GGUF vs base GGUF of the same type, and the
    two engines agree; --general-tokens 0 skips it."""
    from click.testing import CliRunner

    from seal_gguf.cli.app import cli

    scales = ggufs["seal"].with_suffix(".safetensors")
    args = ["validate", str(llama["dir"]), str(scales), str(ggufs["seal"]), "--base-gguf", str(ggufs["base"]),
            "--ctx", "64", "--general-tokens", "256", "-q", "--json", str(tmp_path / "v.json")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "What SEAL costs on general text" in result.output
    general = json.loads((tmp_path / "v.json").read_text())["general"]
    assert [g["engine"] for g in general] == ["pytorch", "llama.cpp"]
    assert general[1]["file_type"] == "f32" and general[1]["seal"] == ggufs["seal"].name
    torch_cost, gguf_cost = general[0]["cost"], general[1]["cost"]
    assert torch_cost["mean_kld"] > 1e-4 and torch_cost["tokens"] >= 200
    assert gguf_cost["mean_kld"] == pytest.approx(torch_cost["mean_kld"], rel=0.05)
    assert gguf_cost["ppl_ratio"] == pytest.approx(torch_cost["ppl_ratio"], rel=0.01)
    result = CliRunner().invoke(cli, [*args[:-2], "--general-tokens", "0"])
    assert result.exit_code == 0 and "What SEAL costs" not in result.output, result.output


@pytest.mark.engine
def test_eval_general_pairs_seal_with_base_of_its_type(llama: dict, ggufs: dict[str, Path], tmp_path: Path) -> None:
    """eval --general: each SEAL GGUF against the base GGUF of its type, and a folder with --scales
    against itself without; the accuracy table and the cost side by side, in the JSON too."""
    from click.testing import CliRunner

    from seal_gguf.cli.app import cli

    scales = ggufs["seal"].with_suffix(".safetensors")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(ggufs["base"]), str(ggufs["seal"]), str(llama["dir"]),
                                      "--scales", str(scales), "--lengths", "256", "--samples", "1", "--general",
                                      "--general-tokens", "128", "-q", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "What SEAL costs on general text" in result.output
    general = json.loads(out.read_text())["general"]
    assert {(g["engine"], g["seal"], g["base"]) for g in general} == {
        ("llama.cpp", ggufs["seal"].name, ggufs["base"].name),
        ("pytorch", f"{llama['dir'].name} + {scales.name}", llama["dir"].name)}
    assert all(g["cost"]["mean_kld"] > 1e-4 for g in general)
    result = CliRunner().invoke(cli, ["eval", str(ggufs["seal"]), "--general-text", str(scales), "-q"])
    assert result.exit_code == 2 and "need --general" in result.output
