"""Training SEAL scales: masked loss, gradients through checkpointing, learning, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import seal_gguf.learn.train as train_module
from seal_gguf.cli.app import cli
from seal_gguf.constants import ScalesMeta
from seal_gguf.learn.data import encode_case, load_cases, make_cases
from seal_gguf.learn.objective import answer_loss
from seal_gguf.learn.train import enable_checkpointing, fit_scales, heldout_accuracy, train_scales
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.hooks import attach_scales
from seal_gguf.model.loading import load_model, load_tokenizer
from seal_gguf.scales import identity_scales, load_scales

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def loaded(llama: Path):
    model, layout = load_model(llama, CPU, "float32", progress=False)
    return model, layout, load_tokenizer(llama)


def test_model_is_frozen(loaded) -> None:
    model, _, _ = loaded
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


def test_prompt_is_masked_in_the_loss(loaded) -> None:
    """answer_loss == transformers' own loss with the prompt labelled -100, and the prompt's
    tokens are not scored: changing what the prompt would predict changes nothing."""
    model, _, tokenizer = loaded
    (case,) = make_cases(tokenizer, "passkey", 200, 1, seed=0, split="train")
    prompt_ids, answer_ids = encode_case(tokenizer, case)
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    with torch.no_grad():
        ours = answer_loss(model, prompt_ids, answer_ids, CPU)
        reference = model(input_ids=ids, labels=labels).loss
        unmasked = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, unmasked, rtol=1e-3)


def test_gradients_reach_the_scales_through_checkpointing(tiny_model, loaded) -> None:
    model, layout, tokenizer = loaded
    (case,) = make_cases(tokenizer, "lines", 320, 1, seed=0, split="train")
    prompt_ids, answer_ids = encode_case(tokenizer, case)

    def grad(checkpointing: bool) -> torch.Tensor:
        fresh, _ = load_model(tiny_model("llama"), CPU, "float32", progress=False)
        scales = torch.nn.Parameter(identity_scales(layout, "channel"))
        if checkpointing:
            enable_checkpointing(fresh)
        with attach_scales(fresh, layout, scales), \
                (train_module.checkpointed_layers(fresh) if checkpointing else torch.enable_grad()):
            answer_loss(fresh, prompt_ids, answer_ids, CPU).backward()
        return scales.grad

    plain, checkpointed = grad(False), grad(True)
    assert plain is not None and checkpointed is not None
    assert all(plain[layer].abs().sum() > 0 for layer in range(layout.num_layers))
    assert torch.allclose(plain, checkpointed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_a_few_steps_lower_the_loss(loaded, granularity: str) -> None:
    model, layout, tokenizer = loaded
    cases = make_cases(tokenizer, "passkey", 160, 3, seed=1, split="train")
    encoded = [encode_case(tokenizer, c) for c in cases]

    def mean_loss(scales: torch.Tensor) -> float:
        with torch.no_grad(), attach_scales(model, layout, scales):
            return sum(answer_loss(model, p, a, CPU).item() for p, a in encoded) / len(encoded)

    before = mean_loss(identity_scales(layout, granularity))
    scales, losses = fit_scales(model, layout, tokenizer, cases * 4, granularity, lr=0.05, device=CPU,
                                gradient_checkpointing=True, progress=False)
    after = mean_loss(scales.detach())
    assert len(losses) == 12
    assert after < before - 0.05, (before, after)
    assert (scales > 0).all() and not torch.equal(scales.detach(), identity_scales(layout, granularity))


def test_heldout_accuracy_scores_generated_text(loaded) -> None:
    model, _, tokenizer = loaded
    cases = make_cases(tokenizer, "lines", 320, 2, seed=0)
    correct, total = heldout_accuracy(model, tokenizer, cases, CPU, progress=False, desc="eval")
    assert total == 2 and 0 <= correct <= 2


def test_same_seed_same_scales(llama: Path) -> None:
    def run(seed: int) -> torch.Tensor:
        return train_scales(llama, "head", "lines", samples=3, length=320, lr=0.05, seed=seed, device="cpu",
                            eval_samples=0, progress=False).scales

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_bfloat16_model_trains_float32_scales(llama: Path) -> None:
    result = train_scales(llama, "channel", "passkey", samples=2, length=160, lr=0.05, seed=0, device="cpu",
                          dtype="bfloat16", eval_samples=0, progress=False)
    assert result.scales.dtype == torch.float32 and torch.isfinite(result.scales).all()
    assert (result.scales != 1).any() and all(loss == loss for loss in result.losses)


@pytest.mark.slow
def test_smollm2_retrieves_the_pass_key(smollm2_dir: Path) -> None:
    """The real model answers short pass-key prompts: prompts, greedy decoding and scoring fit together."""
    model, _ = load_model(smollm2_dir, CPU, "float32", progress=False)
    tokenizer = load_tokenizer(smollm2_dir)
    cases = make_cases(tokenizer, "passkey", 300, 3, seed=0)
    assert heldout_accuracy(model, tokenizer, cases, CPU, progress=False, desc="eval") == (3, 3)


def test_cli_train_round_trip(llama: Path, tmp_path: Path) -> None:
    out, cases_file = tmp_path / "scales.safetensors", tmp_path / "cases.jsonl"
    args = ["train", str(llama), "-o", str(out), "--granularity", "channel", "--task", "niah", "--samples", "3",
            "--length", "200", "--lr", "0.05", "--seed", "4", "--device", "cpu", "--eval-samples", "1",
            "--save-cases", str(cases_file), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Held-out accuracy: before 0/1" in result.output or "Held-out accuracy: before 1/1" in result.output
    layout = model_layout(llama)
    scales = load_scales(out, layout)
    assert scales.granularity == "channel" and tuple(scales.values.shape) == (2, 4, 64)
    meta = scales.metadata
    assert meta[ScalesMeta.TASK] == "niah" and meta[ScalesMeta.SAMPLES] == "3" and meta[ScalesMeta.LENGTH] == "200"
    assert float(meta[ScalesMeta.LR]) == 0.05 and meta[ScalesMeta.SEED] == "4"
    assert len(meta[ScalesMeta.BASE_FINGERPRINT]) == 16 and meta[ScalesMeta.SEAL_GGUF_VERSION]
    assert meta[ScalesMeta.COMMAND].startswith("seal-gguf")
    assert meta[ScalesMeta.HELDOUT_BEFORE].endswith("/1)") and meta[ScalesMeta.HELDOUT_AFTER].endswith("/1)")
    cases = load_cases(cases_file)
    assert len(cases) == 3 and all(c.task == "niah" and c.length == 200 for c in cases)

    # an existing output is refused before any work; --force replaces it
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output
    # the saved cases train to the same scales
    reused = tmp_path / "reused.safetensors"
    result = CliRunner().invoke(cli, ["train", str(llama), "-o", str(reused), "--granularity", "channel",
                                      "--cases", str(cases_file), "--lr", "0.05", "--seed", "4",
                                      "--device", "cpu", "--eval-samples", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_scales(reused, layout).values, scales.values)


def test_cli_errors_are_one_line(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    out = tmp_path / "s.safetensors"
    for args in (["train", str(tmp_path / "missing"), "-o", str(out)],
                 ["train", str(llama), "-o", str(out), "--cases", str(bad)],
                 ["train", str(llama), "-o", str(out), "--length", "50", "--device", "cpu"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert list(tmp_path.iterdir()) == [bad]


def test_ctrl_c_leaves_no_file(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = train_module.answer_loss
    calls = []

    def interrupted(*args, **kwargs):  # the user presses Ctrl-C during the second case
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "answer_loss", interrupted)
    result = CliRunner().invoke(cli, ["train", str(llama), "-o", str(tmp_path / "s.safetensors"), "--samples", "3",
                                      "--length", "320", "--device", "cpu", "--eval-samples", "0", "-q"])
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []
