"""Training SEAL scales: masked loss, gradients through checkpointing, learning, the CLI."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import seal_gguf.learn.train as train_module
from seal_gguf.cases import encode_case, load_cases, wrap_prompt
from seal_gguf.cli.app import Terminated, cli
from seal_gguf.constants import ScalesMeta
from seal_gguf.errors import InputError
from seal_gguf.learn.anchor import ANCHOR_PROMPTS, MIN_REPLY_TOKENS, generated_windows, interleave
from seal_gguf.learn.objective import (
    BUILTIN_ANCHOR,
    DEFAULT_ANCHOR_WEIGHT,
    Anchor,
    AnchorTeacher,
    answer_loss,
    kl_base_seal,
    make_anchor,
    window_log_probs,
)
from seal_gguf.learn.train import enable_checkpointing, fit_scales, heldout_accuracy, train_scales
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.hooks import attach_scales
from seal_gguf.model.loading import load_model, load_tokenizer
from seal_gguf.scales import identity_scales, load_scales
from seal_gguf.tasks import make_cases

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
    fit = fit_scales(model, layout, tokenizer, cases * 4, granularity, lr=0.05, device=CPU,
                     gradient_checkpointing=True, progress=False, lr_schedule="constant")
    scales = fit.scales
    after = mean_loss(scales.detach())
    assert len(fit.losses) == 12 and fit.anchor_kls == []
    assert after < before - 0.05, (before, after)
    assert (scales > 0).all() and not torch.equal(scales.detach(), identity_scales(layout, granularity))


def test_cosine_schedule_takes_smaller_late_steps(loaded) -> None:
    """Annealed to 0 over the epoch: the first step is the constant schedule's, the later ones shorter,
    so the scales end nearer where they were than with the constant schedule."""
    model, layout, tokenizer = loaded
    cases = make_cases(tokenizer, "passkey", 160, 3, seed=1, split="train") * 2

    def run(schedule: str, some: list) -> torch.Tensor:
        return fit_scales(model, layout, tokenizer, some, "head", lr=0.05, device=CPU, gradient_checkpointing=True,
                          progress=False, lr_schedule=schedule).scales.detach()

    assert torch.equal(run("cosine", cases[:1]), run("constant", cases[:1]))
    constant, cosine = run("constant", cases), run("cosine", cases)
    assert 0 < (cosine - 1).abs().mean() < (constant - 1).abs().mean()


def test_heldout_accuracy_scores_generated_text(loaded) -> None:
    model, _, tokenizer = loaded
    cases = make_cases(tokenizer, "lines", 320, 2, seed=0)
    correct, total = heldout_accuracy(model, tokenizer, cases, CPU, progress=False, desc="eval")
    assert total == 2 and 0 <= correct <= 2


def test_kl_is_zero_at_identity_and_positive_elsewhere(loaded) -> None:
    model, layout, tokenizer = loaded
    anchor = make_anchor(tokenizer, 1.0, window=64)
    assert anchor.source == BUILTIN_ANCHOR and all(len(w) <= 64 for w in anchor.windows) and len(anchor.windows) > 3
    teacher = AnchorTeacher(anchor, CPU)
    with torch.no_grad():
        base = teacher.log_probs(model, 0)
        with attach_scales(model, layout, identity_scales(layout, "head")):
            same = kl_base_seal(base, window_log_probs(model, anchor.window_for(0), CPU))
        with attach_scales(model, layout, identity_scales(layout, "head") * 1.5):
            moved = kl_base_seal(base, window_log_probs(model, anchor.window_for(0), CPU))
    assert abs(same.item()) < 1e-5 and moved.item() > 1e-4
    assert anchor.window_for(len(anchor.windows) + 1) == anchor.windows[1]  # cycled


def test_teacher_runs_without_the_hooks(loaded) -> None:
    """The teacher is the model without scales even when called while training scales exist."""
    model, layout, tokenizer = loaded
    anchor = make_anchor(tokenizer, 1.0, window=32)
    with torch.no_grad():
        plain = window_log_probs(model, anchor.windows[0], CPU)
    cached = AnchorTeacher(Anchor(1.0, anchor.windows, "x", 32, cache=True), CPU)
    first, again = cached.log_probs(model, 0), cached.log_probs(model, 0)
    assert again is first and first.dtype == torch.float16
    assert torch.allclose(first.float(), plain, atol=0.02)
    assert torch.equal(AnchorTeacher(anchor, CPU).log_probs(model, 0), plain)


def test_anchor_keeps_the_model_closer_to_itself(loaded) -> None:
    """Against the same cases and learning rate, a strong anchor ends with a smaller KL on the anchor
    text and scales nearer the identity than no anchor; caching the teacher changes little."""
    model, layout, tokenizer = loaded
    cases = make_cases(tokenizer, "passkey", 160, 3, seed=1, split="train") * 2
    anchor = make_anchor(tokenizer, 20.0, window=48)

    def run(weight: float, cache: bool = False):
        a = Anchor(weight, anchor.windows, anchor.source, anchor.window, cache)
        return fit_scales(model, layout, tokenizer, cases, "channel", lr=0.05, device=CPU,
                          gradient_checkpointing=True, progress=False, anchor=a)

    def kl_on_anchor(scales: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for ids in anchor.windows[:4]:
                base = window_log_probs(model, ids, CPU)
                with attach_scales(model, layout, scales):
                    total += kl_base_seal(base, window_log_probs(model, ids, CPU)).item()
        return total

    free, held, cached = run(0.0), run(20.0), run(20.0, cache=True)
    assert free.anchor_kls == [] and len(held.anchor_kls) == len(cases)
    assert kl_on_anchor(held.scales.detach()) < kl_on_anchor(free.scales.detach())
    assert (held.scales - 1).abs().mean() < (free.scales - 1).abs().mean()
    assert torch.allclose(cached.scales, held.scales, atol=1e-3)


def test_anchor_errors(loaded, tmp_path: Path) -> None:
    _, _, tokenizer = loaded
    with pytest.raises(InputError, match="anchor weight"):
        make_anchor(tokenizer, -1.0)
    with pytest.raises(InputError, match="not found|does not exist|no such"):
        make_anchor(tokenizer, 1.0, text=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="empty"):
        make_anchor(tokenizer, 1.0, text=empty)
    assert make_anchor(tokenizer, 0.0, text=tmp_path / "missing.txt").windows == []  # off: nothing read


def test_generated_anchor_windows_are_the_models_own_replies(loaded) -> None:
    """Each window is a request in the model's chat template followed by the model's sampled reply: at
    most `window` tokens, the same for a seed, other replies for another seed, and the global RNG and
    the model untouched."""
    model, _, tokenizer = loaded
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    windows = generated_windows(model, tokenizer, 3, 96, seed=5, device=CPU, progress=False)
    assert torch.equal(torch.rand(1), expected_next)
    assert len(windows) == 3 and all(len(w) <= 96 for w in windows)
    for window in windows:
        text = tokenizer.decode(window)
        prompt = next(p for p in ANCHOR_PROMPTS if p in text)
        request = tokenizer(wrap_prompt(tokenizer, prompt, ""), add_special_tokens=False).input_ids
        assert window[:len(request)] == request and len(window) > len(request)
    assert generated_windows(model, tokenizer, 3, 96, seed=5, device=CPU, progress=False) == windows
    assert generated_windows(model, tokenizer, 3, 96, seed=6, device=CPU, progress=False) != windows
    assert generated_windows(model, tokenizer, 0, 96, seed=5, device=CPU, progress=False) == []
    longest = max(len(tokenizer(wrap_prompt(tokenizer, p, ""), add_special_tokens=False).input_ids)
                  for p in ANCHOR_PROMPTS)
    with pytest.raises(InputError, match=f"use --anchor-window {longest + MIN_REPLY_TOKENS} or more"):
        generated_windows(model, tokenizer, len(ANCHOR_PROMPTS), longest + MIN_REPLY_TOKENS - 1, seed=5, device=CPU,
                          progress=False)  # every request asked: the longest is among them
    assert len(generated_windows(model, tokenizer, 1, longest + MIN_REPLY_TOKENS, seed=5, device=CPU,
                                 progress=False)) == 1


def test_interleave_spreads_both_kinds_through_the_cycle() -> None:
    text, generated = [[1]] * 6, [[2]] * 3
    merged = interleave(text, generated)
    assert merged.count([1]) == 6 and merged.count([2]) == 3
    assert [2] in merged[:3] and [2] in merged[-3:]  # not all at one end
    assert interleave([], [[2]]) == [[2]] and interleave([[1]], []) == [[1]]


def test_train_with_generated_anchor_records_it(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    result = CliRunner().invoke(cli, [
        "train", str(llama), "-o", str(out), "--task", "passkey", "--samples", "2", "--length", "160",
        "--anchor-window", "96", "--anchor-generated", "2", "--device", "cpu", "--eval-samples", "0",
        "--general-tokens", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "Anchor: λ = 40 on built-in + 2 generated text, 96-token windows" in result.output
    assert load_scales(out, model_layout(llama)).metadata[ScalesMeta.ANCHOR_TEXT] == "built-in + 2 generated"
    off = CliRunner().invoke(cli, [
        "train", str(llama), "-o", str(tmp_path / "off.safetensors"), "--task", "passkey", "--samples", "1",
        "--length", "160", "--anchor-weight", "0", "--anchor-generated", "2", "--device", "cpu",
        "--eval-samples", "0", "--general-tokens", "0", "-q"])
    assert off.exit_code == 0 and "--anchor-generated" in off.stderr and "Anchor:" not in off.output


def test_same_seed_same_scales(llama: Path) -> None:
    def run(seed: int) -> torch.Tensor:
        return train_scales(llama, "head", "lines", samples=3, length=320, lr=0.05, seed=seed, device="cpu",
                            eval_samples=0, progress=False, general_tokens=0).scales

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
    # the anchor and the cost on the measurement text, recorded and printed
    assert float(meta[ScalesMeta.ANCHOR_WEIGHT]) == DEFAULT_ANCHOR_WEIGHT and meta[ScalesMeta.ANCHOR_TEXT] == "built-in"
    assert meta[ScalesMeta.LR_SCHEDULE] == "cosine"
    assert meta[ScalesMeta.ANCHOR_WINDOW] == "256"
    assert float(meta[ScalesMeta.GENERAL_PPL_RATIO]) > 0 and float(meta[ScalesMeta.GENERAL_MEAN_KLD]) >= 0
    assert 0 <= float(meta[ScalesMeta.GENERAL_SAME_TOP]) <= 1 and int(meta[ScalesMeta.GENERAL_TOKENS]) > 1000
    assert "general text: PPL ×" in result.output and f"Anchor: λ = {DEFAULT_ANCHOR_WEIGHT:g} on built-in text" in result.output
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


def test_cli_mixture_and_paper_recipe(llama: Path, tmp_path: Path) -> None:
    out, cases_file, anchor = tmp_path / "s.safetensors", tmp_path / "cases.jsonl", tmp_path / "anchor.txt"
    anchor.write_text("Plain words about the weather and the sea. " * 40, encoding="utf-8")
    result = CliRunner().invoke(cli, [
        "train", str(llama), "-o", str(out), "--task", "lines,kv", "--samples", "4", "--length", "400",
        "--min-length", "300", "--lr", "0.05", "--device", "cpu", "--eval-samples", "2", "--anchor-text",
        str(anchor), "--anchor-window", "64", "--anchor-weight", "2", "--general-tokens", "300",
        "--lr-schedule", "cosine", "--save-cases", str(cases_file), "-q"])
    assert result.exit_code == 0, result.output
    assert "on 4 lines,kv cases of 300-400 tokens" in result.output
    meta = load_scales(out, model_layout(llama)).metadata
    assert meta[ScalesMeta.TASK] == "lines,kv" and meta[ScalesMeta.MIN_LENGTH] == "300"
    assert meta[ScalesMeta.ANCHOR_TEXT] == "anchor.txt" and meta[ScalesMeta.ANCHOR_WINDOW] == "64"
    assert meta[ScalesMeta.LR_SCHEDULE] == "cosine"
    assert int(meta[ScalesMeta.GENERAL_TOKENS]) <= 300
    cases = load_cases(cases_file)
    assert [c.task for c in cases] == ["lines", "kv"] * 2 and all(300 <= c.length <= 400 for c in cases)
    # the paper's recipe: no anchor, and a mixed cases file trains as it is
    paper = tmp_path / "paper.safetensors"
    result = CliRunner().invoke(cli, ["train", str(llama), "-o", str(paper), "--cases", str(cases_file),
                                      "--anchor-weight", "0", "--cache-teacher", "--lr", "0.05", "--device", "cpu",
                                      "--eval-samples", "0", "--general-tokens", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "Anchor:" not in result.output and "general text" not in result.output
    assert "Warning: --anchor-weight 0 turns the anchor off" in result.stderr
    meta = load_scales(paper, model_layout(llama)).metadata
    assert meta[ScalesMeta.ANCHOR_WEIGHT] == "0" and ScalesMeta.GENERAL_PPL_RATIO not in meta
    assert meta[ScalesMeta.TASK] == "lines,kv" and meta[ScalesMeta.LENGTH] == str(max(c.length for c in cases))


def test_cli_errors_are_one_line(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    out = tmp_path / "s.safetensors"
    for args in (["train", str(tmp_path / "missing"), "-o", str(out)],
                 ["train", str(llama), "-o", str(out), "--cases", str(bad)],
                 ["train", str(llama), "-o", str(out), "--length", "50", "--device", "cpu"],
                 ["train", str(llama), "-o", str(out), "--task", "lines,trivia"],
                 ["train", str(llama), "-o", str(out), "--task", "lines", "--min-length", "2000"],
                 ["train", str(llama), "-o", str(out), "--anchor-text", str(tmp_path / "nope.txt")]):
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


def test_kill_exits_143_and_leaves_no_file(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*args, **kwargs):  # SIGTERM arrives while the cases are generated (seal_gguf.cli.main's handler)
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(train_module, "make_mixture", killed)
    result = CliRunner().invoke(cli, ["train", str(llama), "-o", str(tmp_path / "s.safetensors"), "--samples", "3",
                                      "--length", "320", "--device", "cpu", "--eval-samples", "0", "-q"])
    assert result.exit_code == 143 and "Interrupted; no partial output was left behind." in result.output
    assert list(tmp_path.iterdir()) == []


def test_refused_before_any_case_is_generated(tiny_model, tmp_path: Path) -> None:
    """A length beyond the model's context, or a folded model, fails at once (one line), not after
    minutes of generating cases; and plan's bad --max-memory fails before it prints a plan."""
    from seal_gguf.errors import AlreadyFoldedError
    from seal_gguf.fold.hf import fold_checkpoint
    from seal_gguf.scales import save_scales

    folder = tiny_model("llama")  # max_position_embeddings 4096
    with pytest.raises(InputError, match="beyond the model's context of 4096 tokens; .*--rope-scaling"):
        train_scales(folder, samples=1, length=100_000, eval_samples=0, progress=False)
    layout = model_layout(folder)
    save_scales(tmp_path / "s.safetensors", identity_scales(layout, "head") * 1.5, layout, "head")
    folded = fold_checkpoint(folder, tmp_path / "s.safetensors", tmp_path / "folded", progress=False).out_dir
    with pytest.raises(AlreadyFoldedError, match="already has SEAL scales folded in"):
        train_scales(folded, samples=1, length=100_000, eval_samples=0, progress=False)
    result = CliRunner().invoke(cli, ["plan", str(folder), "--max-memory", "0=abc"])
    assert result.exit_code == 1 and result.output.startswith("Error:"), result.output
