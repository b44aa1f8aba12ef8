"""Folded checkpoint == original with hooks; everything else byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import logits, random_scales
from safetensors import safe_open

from seal_gguf.cli.app import cli
from seal_gguf.constants import GRANULARITIES
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.checkpoint import read_header, weight_files

ARCHS = ["llama", "qwen2", "mistral", "qwen3", "gemma3_text", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fold_equals_hooks(tiny_model, tmp_path: Path, arch: str, granularity: str) -> None:
    model_dir = tiny_model(arch)
    values = random_scales(tmp_path / "s.safetensors", model_dir, granularity)
    out = tmp_path / "folded"
    result = CliRunner().invoke(cli, ["fold", str(model_dir), str(tmp_path / "s.safetensors"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(model_dir, ids, values)
    got = logits(out, ids)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and the scales matter: without hooks the logits differ
    assert (logits(model_dir, ids) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_other_tensors_byte_identical(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("qwen2")
    random_scales(tmp_path / "s.safetensors", model_dir, "channel")
    out = tmp_path / "folded"
    assert CliRunner().invoke(cli, ["fold", str(model_dir), str(tmp_path / "s.safetensors"), "-o", str(out), "-q"]).exit_code == 0
    src, dst = weight_files(model_dir)[0], weight_files(out)[0]
    assert read_header(src).header_bytes == read_header(dst).header_bytes
    with safe_open(str(src), "pt") as a, safe_open(str(dst), "pt") as b:
        for name in a.keys():
            same = torch.equal(a.get_tensor(name), b.get_tensor(name))
            assert same != name.endswith("o_proj.weight"), name
    config = json.loads((out / "config.json").read_text())
    assert config["seal_fold"]["granularity"] == "channel"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_low_precision_and_shards(tiny_model, tmp_path: Path, dtype: torch.dtype) -> None:
    model_dir = tiny_model("llama", dtype=dtype, max_shard_size="20MB")
    assert len(weight_files(model_dir)) > 1
    values = random_scales(tmp_path / "s.safetensors", model_dir, "head")
    out = tmp_path / "folded"
    result = CliRunner().invoke(cli, ["fold", str(model_dir), str(tmp_path / "s.safetensors"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file()
    layout = model_layout(model_dir)
    for shard in weight_files(model_dir):
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            for layer in range(layout.num_layers):
                name = layout.o_proj_weight(layer)
                if name in a.keys():
                    want = (a.get_tensor(name).float() * values[layer].repeat_interleave(layout.head_dim)).to(dtype)
                    assert torch.equal(b.get_tensor(name), want)
                    assert b.get_tensor(name).dtype == dtype


def test_fold_twice_refused(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    random_scales(tmp_path / "s.safetensors", model_dir, "head")
    runner = CliRunner()
    assert runner.invoke(cli, ["fold", str(model_dir), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "a"), "-q"]).exit_code == 0
    result = runner.invoke(cli, ["fold", str(tmp_path / "a"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 1 and "already has SEAL scales" in result.output
    assert not (tmp_path / "b").exists()
    forced = runner.invoke(cli, ["fold", str(tmp_path / "a"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "b"), "-q", "--force"])
    assert forced.exit_code == 0, forced.output
