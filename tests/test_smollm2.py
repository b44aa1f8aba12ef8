"""The real embedded model: import-gguf gives a working checkpoint, and folding it is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seal_gguf.cli.app import cli
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.hooks import attach_scales
from seal_gguf.scales import expected_shape, save_scales

pytestmark = pytest.mark.slow


def test_import_gguf_answers_sensibly(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_fold_smollm2_channel_matches_hooks(smollm2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    layout = model_layout(smollm2_dir)
    values = torch.exp(0.3 * torch.randn(expected_shape(layout, "channel"), generator=torch.Generator().manual_seed(0)))
    save_scales(tmp_path / "c.safetensors", values, layout, "channel")
    result = CliRunner().invoke(cli, ["fold", str(smollm2_dir), str(tmp_path / "c.safetensors"), "-o",
                                      str(tmp_path / "folded"), "-q"])
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    # Real text: on random token ids fp32 rounding alone (hooked fp32 vs fp64) exceeds 1e-5.
    text = "SEAL learns a scale for every attention head, and folding moves it into the weights. " * 4
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(text, return_tensors="pt").input_ids
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
        with attach_scales(base, layout, values):
            ref = base(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()(ids).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
