"""seal-gguf imatrix: the importance matrix of the SEAL model, read by llama.cpp's real quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from helpers import one_line_error, scales_file

from seal_gguf.cli import cli
from seal_gguf.convert.imatrix import (
    COUNTS_SUFFIX,
    KEY_CHUNK_COUNT,
    KEY_CHUNK_SIZE,
    KEY_DATASETS,
    SUMS_SUFFIX,
    ImatrixData,
    collect_imatrix,
    expert_weights,
    gguf_weight_names,
    write_imatrix,
)
from seal_gguf.convert.quantize import quantize, read_imatrix
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.errors import EngineError
from seal_gguf.model.loading import load_model
from seal_gguf.scales import read_scales
from seal_gguf.texts import Chunk


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def chunks(n: int = 2, length: int = 40) -> list[Chunk]:
    rng = np.random.default_rng(0)
    return [Chunk(f"random-{i}", rng.integers(3, 1000, length).tolist()) for i in range(n)]


def test_add_sums_squares_and_counts_tokens() -> None:
    data = ImatrixData()
    data.add("blk.0.attn_q.weight", torch.tensor([[[1.0, -2.0], [3.0, 0.5]]]))
    data.add("blk.0.attn_q.weight", torch.tensor([[2.0, 2.0]], dtype=torch.bfloat16))
    assert np.array_equal(data.sums["blk.0.attn_q.weight"], [14.0, 8.25])
    assert data.counts["blk.0.attn_q.weight"] == 3


def test_sums_equal_a_direct_computation(tiny_model) -> None:
    model, layout = load_model(tiny_model("llama"), torch.device("cpu"), "float32", progress=False)
    data = collect_imatrix(model, layout, chunks(), None, progress=False)
    layer = model.model.layers[0]
    want = np.zeros(model.config.hidden_size)
    with torch.no_grad():
        for chunk in chunks():
            x = layer.input_layernorm(model.model.embed_tokens(torch.tensor([chunk.ids])))
            want += x.pow(2).sum(dim=(0, 1)).double().numpy()
    np.testing.assert_allclose(data.sums["blk.0.attn_q.weight"], want, rtol=1e-5)
    assert data.counts["blk.0.attn_q.weight"] == 80 and (data.chunk_count, data.chunk_size) == (2, 40)
    assert set(data.sums) == {f"blk.{i}.{w}.weight" for i in range(2) for w in
                              ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}


def test_scales_change_later_inputs_only(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    values = read_scales(scales_file(tmp_path / "s.safetensors", model_dir, "channel")).values
    model, layout = load_model(model_dir, torch.device("cpu"), "float32", progress=False)
    base = collect_imatrix(model, layout, chunks(), None, progress=False)
    seal = collect_imatrix(model, layout, chunks(), values, progress=False)
    # attn_output's input is the heads' unscaled output: the folded weight sees it
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        assert np.array_equal(base.sums[f"blk.0.{name}.weight"], seal.sums[f"blk.0.{name}.weight"]), name
    for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.1.attn_output.weight"):
        assert not np.allclose(base.sums[name], seal.sums[name], rtol=1e-3), name


def test_multimodal_and_fused_weights_get_gguf_names(tiny_model) -> None:
    model, layout = load_model(tiny_model("gemma3"), torch.device("cpu"), "float32", progress=False)
    assert gguf_weight_names(model, layout)["model.language_model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"
    model, layout = load_model(tiny_model("phi3"), torch.device("cpu"), "float32", progress=False)
    names = set(gguf_weight_names(model, layout).values())
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names
    assert expert_weights(model, layout) == []
    model, layout = load_model(tiny_model("qwen3_moe"), torch.device("cpu"), "float32", progress=False)
    assert "blk.1.attn_output.weight" in gguf_weight_names(model, layout).values()
    assert len(expert_weights(model, layout)) == 2 * 2  # gate_up and down, per layer


def test_llama_cpp_quantizes_with_it(tiny_model, converter: Path, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    scales = scales_file(tmp_path / "s.safetensors", model_dir, "head")
    out = tmp_path / "seal.imatrix.gguf"
    result = invoke("imatrix", model_dir, scales, "-o", out, "--length", 400, "--chunks", 3, "-q")
    assert result.exit_code == 0, result.output
    reader = GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields[KEY_CHUNK_COUNT].contents() == 3 and reader.fields[KEY_CHUNK_SIZE].contents() >= 400
    assert "lines-400" in reader.fields[KEY_DATASETS].contents()
    tensors = {t.name: np.asarray(t.data).reshape(-1) for t in reader.tensors}
    entries = read_imatrix(out)  # the package's reader: in_sum2 / counts, as llama-quantize computes it
    for name, values in entries.items():
        np.testing.assert_allclose(values, tensors[name + SUMS_SUFFIX] / tensors[name + COUNTS_SUFFIX][0])

    gguf = convert_to_gguf(model_dir, tmp_path / "seal-f32.gguf", "f32", scales, llama_cpp=converter, progress=False)
    weights = {t.name for t in GGUFReader(str(gguf)).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert set(entries) == weights  # every matrix llama.cpp looks up
    iq2 = quantize(gguf, tmp_path / "iq2_xxs.gguf", "iq2_xxs", imatrix=out, progress=False)
    assert {t.name: t.tensor_type.name for t in GGUFReader(str(iq2)).tensors}["blk.1.ffn_up.weight"] == "IQ2_XXS"
    quantize(gguf, tmp_path / "iq4_xs.gguf", "iq4_xs", imatrix=out, progress=False)

    data = ImatrixData({n: v for n, v in entries.items() if n != "blk.1.ffn_up.weight"},
                       {n: 1 for n in entries if n != "blk.1.ffn_up.weight"}, 1, 400)
    lacking = write_imatrix(tmp_path / "lacking.gguf", data, "llama")
    with pytest.raises(EngineError, match="Missing importance matrix for tensor blk.1.ffn_up.weight"):
        quantize(gguf, tmp_path / "refused.gguf", "iq2_xxs", imatrix=lacking, progress=False)
    assert not (tmp_path / "refused.gguf").exists()


def test_bad_input_is_one_line(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    one_line_error(invoke("imatrix", model_dir, tmp_path / "none.safetensors", "-o", tmp_path / "a.gguf"),
                   "none.safetensors")
    one_line_error(invoke("imatrix", model_dir, "-o", tmp_path / "a.gguf", "--chunks", 2, "--tokens", 100),
                   "not both")
    (tmp_path / "a.gguf").write_bytes(b"old")
    one_line_error(invoke("imatrix", model_dir, "-o", tmp_path / "a.gguf"), "already exists")
    assert (tmp_path / "a.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]
