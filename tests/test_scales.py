"""The scales file: round trip, self-checks, checks against a model, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from seal_gguf.cli.app import cli
from seal_gguf.errors import ArchitectureError, InputError, OutputExistsError, ScalesError
from seal_gguf.model.architectures import ModelLayout, arch_specs, layout_from_config, supported_model_types
from seal_gguf.scales import check_against, load_scales, read_scales, save_scales, scales_metadata

LAYOUT = ModelLayout("llama", num_layers=3, num_heads=4, head_dim=8, o_proj_template="model.layers.{layer}.self_attn.o_proj")


def write_raw(path: Path, values: torch.Tensor, granularity: str = "head", **meta_overrides: str) -> Path:
    meta = scales_metadata(LAYOUT, granularity, None)
    meta.update(meta_overrides)
    save_file({"seal_scales": values}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("granularity,shape", [("head", (3, 4)), ("channel", (3, 4, 8))])
def test_round_trip(tmp_path: Path, granularity: str, shape: tuple[int, ...]) -> None:
    values = torch.rand(shape) + 0.5
    save_scales(tmp_path / "s.safetensors", values, LAYOUT, granularity, {"task": "lines", "seed": "3"})
    scales = load_scales(tmp_path / "s.safetensors", LAYOUT)
    assert torch.equal(scales.values, values)
    assert scales.granularity == granularity
    assert scales.metadata["task"] == "lines" and scales.metadata["format"] == "seal-scales/1"
    assert len(scales.sha256 or "") == 64
    with pytest.raises(OutputExistsError):
        save_scales(tmp_path / "s.safetensors", values, LAYOUT, granularity)


@settings(max_examples=40, deadline=None)
@given(value=st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -1.0, -1e-9]),
       layer=st.integers(0, 2), head=st.integers(0, 3))
def test_invalid_values_rejected(tmp_path_factory: pytest.TempPathFactory, value: float, layer: int, head: int) -> None:
    values = torch.ones(3, 4)
    values[layer, head] = value
    path = write_raw(tmp_path_factory.mktemp("s") / "bad.safetensors", values)
    with pytest.raises(ScalesError, match=rf"\({layer}, {head}\)"):
        read_scales(path)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 6), heads=st.integers(1, 6), head_dim=st.sampled_from([4, 8, 16]),
       channel=st.booleans())
def test_loader_checks_layout(tmp_path_factory: pytest.TempPathFactory, layers: int, heads: int, head_dim: int,
                              channel: bool) -> None:
    layout = ModelLayout("llama", layers, heads, head_dim, LAYOUT.o_proj_template)
    granularity = "channel" if channel else "head"
    shape = (layers, heads, head_dim) if channel else (layers, heads)
    path = tmp_path_factory.mktemp("s") / "s.safetensors"
    save_scales(path, torch.rand(shape) + 0.1, layout, granularity)
    scales = read_scales(path)
    if (layers, heads, head_dim) == (3, 4, 8):
        check_against(scales, LAYOUT, "x")
    else:
        with pytest.raises(ScalesError, match="the model has 3 x 4 x 8"):
            check_against(scales, LAYOUT, "x")


def test_shape_disagrees_with_metadata(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.safetensors", torch.ones(3, 4, 8), granularity="head")
    with pytest.raises(ScalesError, match=r"does not match its metadata \(head granularity, expected \(3, 4\)\)"):
        read_scales(path)


def test_other_model_type(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.safetensors", torch.ones(3, 4), model_type="qwen2")
    with pytest.raises(ScalesError, match="for model_type 'qwen2', the model is 'llama'"):
        load_scales(path, LAYOUT)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.safetensors"
    path.write_bytes(content)
    with pytest.raises(ScalesError if content else InputError):
        read_scales(path)


def test_missing_metadata_and_tensor(tmp_path: Path) -> None:
    save_file({"seal_scales": torch.ones(3, 4)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ScalesError, match="not a seal-gguf scales file"):
        read_scales(tmp_path / "a.safetensors")
    save_file({"other": torch.ones(3, 4)}, str(tmp_path / "b.safetensors"), metadata=scales_metadata(LAYOUT, "head", None))
    with pytest.raises(ScalesError, match="no tensor named 'seal_scales'"):
        read_scales(tmp_path / "b.safetensors")


def test_every_architecture_loads() -> None:
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    for model_type in supported_model_types():
        section = arch_specs()[model_type].config_section  # multimodal checkpoints: the text model's config
        config = {"model_type": model_type, **({section: shape} if section else shape)}
        layout = layout_from_config(config)
        assert layout.head_dim == 16 and layout.o_proj_weight(1).endswith("layers.1.self_attn.o_proj.weight")
    explicit = layout_from_config({"model_type": "mistral", "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "hidden_size": 64, "head_dim": 32})
    assert explicit.attn_width == 128
    with pytest.raises(ArchitectureError, match="supported: .*llama"):
        layout_from_config({"model_type": "gpt2"})


def test_inspect_cli(tmp_path: Path) -> None:
    values = torch.ones(3, 4)
    values[1, 2], values[2, 0] = 2.5, 0.25
    save_scales(tmp_path / "s.safetensors", values, LAYOUT, "head", {"task": "lines"})
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    assert "head granularity, shape [3, 4]" in result.output
    assert "most amplified: L1.H2=2.500" in result.output and "most suppressed: L2.H0=0.250" in result.output
    as_json = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(tmp_path / "s.safetensors")]).output)
    assert as_json["max"] == 2.5 and as_json["metadata"]["task"] == "lines"
