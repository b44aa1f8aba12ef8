"""fold-gguf: scales folded into an existing GGUF == fold-and-convert from the HF model."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from helpers import random_scales
from safetensors import safe_open

import seal_gguf.fold.gguf as fold_gguf_module
from seal_gguf.cli.app import cli
from seal_gguf.constants import GGUFKeys
from seal_gguf.convert.quantize import quantize
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.fold.gguf import fold_gguf
from seal_gguf.gguffile.header import read_gguf_header
from seal_gguf.model.architectures import ModelLayout, model_layout
from seal_gguf.model.checkpoint import weight_files
from seal_gguf.scales import read_scales, save_scales

BUNDLED = Path(__file__).resolve().parent.parent / "seal_gguf" / "bundled"
ATTN_OUTPUT = "attn_output.weight"


@pytest.fixture(scope="module")
def models(tiny_model) -> dict[str, Path]:
    # f16 weights for the f16 GGUF: the converter folds them in float32 and stores float16, as fold-gguf does
    return {"f32": tiny_model("llama"), "f16": tiny_model("llama", dtype=torch.float16)}


@pytest.fixture(scope="module")
def scales(models: dict[str, Path], module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    folder = module_tmp("scales")
    for granularity in ("head", "channel"):
        random_scales(folder / f"{granularity}.safetensors", models["f32"], granularity)
    return {g: folder / f"{g}.safetensors" for g in ("head", "channel")}


@pytest.fixture(scope="module")
def ggufs(models: dict[str, Path], scales: dict[str, Path], module_tmp: Callable[[str], Path]):
    """make(outtype, granularity) -> GGUF from llama.cpp's converter: granularity None is the base model,
    else fold-and-convert with those scales. f16 comes from the float16 model, the rest from float32."""
    folder = module_tmp("ggufs")
    made: dict[tuple[str, str | None], Path] = {}

    def make(outtype: str, granularity: str | None = None) -> Path:
        if (outtype, granularity) not in made:
            out = folder / f"{outtype}-{granularity or 'base'}.gguf"
            if outtype == "q4_k_m":  # what convert does for it: the converter's f32, then llama.cpp's quantizer
                quantize(make("f32", granularity), out, outtype, progress=False)
            else:
                model = models["f16" if outtype == "f16" else "f32"]
                convert_to_gguf(model, out, outtype, scales[granularity] if granularity else None, progress=False)
            made[outtype, granularity] = out
        return made[outtype, granularity]

    return make


# GGUFs are read with fold_gguf's header reader: gguf's GGUFReader takes 10-40 s per file here. The
# files it checks against come from llama.cpp's converter, and llama.cpp loads the outputs.

class Tensor(NamedTuple):
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # its bytes, one row per line


@functools.cache
def tensors(path: Path) -> dict[str, Tensor]:
    header, _ = read_gguf_header(path)
    file = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.tensors.items():
        qtype = GGMLQuantizationType(info.raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows, row_bytes = int(np.prod(info.dims[1:])), info.dims[0] // block * type_size
        start = header.data_offset + info.offset
        out[name] = Tensor(qtype, file[start:start + rows * row_bytes].reshape(rows, row_bytes))
    return out


def raw(tensor: Tensor) -> bytes:
    return tensor.data.tobytes()


def fields(path: Path) -> dict[str, bytes]:
    """Every KV pair, and every tensor info, as its bytes in the file."""
    header, data = read_gguf_header(path)
    out = {key: data[e.start:e.end] for key, e in header.kv.items()}
    out.update({f"tensor info {name}": data[e.start:e.end] for name, e in header.tensors.items()})
    return out


def seal_fields(path: Path) -> dict[str, object]:
    return {key: e.value for key, e in read_gguf_header(path)[0].kv.items() if key.startswith("seal.")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_only_attn_output_changed(source: Path, folded: Path) -> None:
    """Every other tensor, every KV pair and tensor info byte-identical; seal.* keys added."""
    before, after = tensors(source), tensors(folded)
    assert list(before) == list(after)
    for name, tensor in before.items():
        assert after[name].tensor_type == tensor.tensor_type, name
        assert (raw(after[name]) == raw(tensor)) != name.endswith(ATTN_OUTPUT), name
    old, new = fields(source), fields(folded)
    assert {k: v for k, v in new.items() if not k.startswith("seal.")} == old
    assert seal_fields(folded)[GGUFKeys.SOURCE_GGUF_SHA256] == sha256(source)


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def llama_scores(path: Path) -> np.ndarray:
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
    try:
        model.eval([1, 200, 300, 400])
        return np.array(model.scores[:4])
    finally:
        model.close()


# fold-gguf(convert_to_gguf(model)) == fold-and-convert_to_gguf(model): exactly where the type holds the folded weights exactly

@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_equals_fold_and_convert(ggufs, scales: dict[str, Path], tmp_path: Path, outtype: str) -> None:
    base, reference = ggufs(outtype), ggufs(outtype, "channel")
    out = tmp_path / "folded.gguf"
    result = invoke("fold-gguf", base, scales["channel"], "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert f"Folded 2 attn_output tensors ({outtype.upper()})" in result.output
    got, want = tensors(out), tensors(reference)
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].tensor_type == tensor.tensor_type and raw(got[name]) == raw(tensor), name
    assert_only_attn_output_changed(base, out)
    # the converter patch's seal.* keys, with the same values
    assert {k: v for k, v in seal_fields(out).items() if k != GGUFKeys.SOURCE_GGUF_SHA256} == seal_fields(reference)
    if outtype == "f32":
        assert np.array_equal(llama_scores(out), llama_scores(reference))


def q8_0_blocks(tensor) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scale factor per block, int8 codes per block) of a Q8_0 tensor: 34-byte blocks."""
    blocks = np.ascontiguousarray(tensor.data).reshape(-1, 34)
    return blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float64), blocks[:, 2:].copy().view(np.int8)


def test_q8_0_equals_fold_and_convert_to_fp16_rounding(ggufs, scales: dict[str, Path], tmp_path: Path) -> None:
    # head scales, head_dim 64: each 32-wide block lies in one head, so folding keeps its codes
    base, reference = ggufs("q8_0"), ggufs("q8_0", "head")
    out = fold_gguf(base, scales["head"], tmp_path / "folded.gguf", progress=False).out_path
    assert_only_attn_output_changed(base, out)
    got, want = tensors(out), tensors(reference)
    for layer in range(2):
        name = f"blk.{layer}.{ATTN_OUTPUT}"
        d_got, q_got = q8_0_blocks(got[name])
        d_want, q_want = q8_0_blocks(want[name])
        # the block scale: fp16(fp16(d) * s) here, fp16(d * s) there
        np.testing.assert_allclose(d_got, d_want, rtol=2.0 ** -10, atol=0)
        differ = q_got != q_want  # only where x / d sits on a rounding tie
        assert np.abs(q_got.astype(int) - q_want).max() <= 1 and differ.mean() < 1e-3
        same = ~differ.reshape(-1, 256)
        values = dequantize(got[name].data, got[name].tensor_type)
        np.testing.assert_allclose(values[same], dequantize(want[name].data, want[name].tensor_type)[same],
                                   rtol=2.0 ** -10, atol=0)
    assert seal_fields(out)[GGUFKeys.GRANULARITY] == "head"


def test_k_quant_requantized_by_llama_cpp(ggufs, models: dict[str, Path], scales: dict[str, Path],
                                          tmp_path: Path) -> None:
    base, reference = ggufs("q4_k_m"), ggufs("q4_k_m", "channel")
    out = tmp_path / "folded.gguf"
    result = invoke("fold-gguf", base, scales["channel"], "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "requantized by llama.cpp's quantizer" in result.output
    assert_only_attn_output_changed(base, out)
    got, want = tensors(out), tensors(reference)
    layout, values = model_layout(models["f32"]), read_scales(scales["channel"])
    with safe_open(str(weight_files(models["f32"])[0]), "pt") as f:
        for layer in range(layout.num_layers):
            name = f"blk.{layer}.{ATTN_OUTPUT}"
            assert got[name].tensor_type == want[name].tensor_type == GGMLQuantizationType.Q4_K
            exact = (f.get_tensor(layout.o_proj_weight(layer)) * values.columns(layer, layout.head_dim)).numpy()
            error = np.sqrt(np.mean((dequantize(got[name].data, got[name].tensor_type) - exact) ** 2))
            direct = np.sqrt(np.mean((dequantize(want[name].data, want[name].tensor_type) - exact) ** 2))
            # quantizing twice (base, then folded) costs less than twice quantizing once
            assert direct < error < 2 * direct, (name, error, direct)
    assert np.isfinite(llama_scores(out)).all()


@pytest.mark.slow
def test_shipped_smollm2_q4_1(smollm2_gguf: Path, tmp_path: Path) -> None:
    scales_path = BUNDLED / "smollm2-135m-instruct-seal-h.safetensors"
    out = tmp_path / "smol-seal.Q4_1.gguf"
    result = invoke("fold-gguf", smollm2_gguf, scales_path, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "Folded 30 attn_output tensors (Q4_1)" in result.output
    assert_only_attn_output_changed(smollm2_gguf, out)
    values = read_scales(scales_path)
    before, after = tensors(smollm2_gguf), tensors(out)
    for layer in range(30):
        name = f"blk.{layer}.{ATTN_OUTPUT}"
        old = np.ascontiguousarray(before[name].data).reshape(-1, 20)  # Q4_1: fp16 d, fp16 m, 16 bytes of codes
        new = np.ascontiguousarray(after[name].data).reshape(-1, 20)
        assert np.array_equal(old[:, 4:], new[:, 4:])  # head_dim 64: every block keeps its codes
        block_scale = np.tile(values.columns(layer, 64).numpy()[::32], 576).astype(np.float64)
        for at in (0, 2):  # d and m, each rescaled with one fp16 rounding
            was = old[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float64)
            now = new[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float64)
            np.testing.assert_allclose(now, was * block_scale, rtol=2.0 ** -10, atol=2.0 ** -24)
    doc = tmp_path / "memo.txt"
    doc.write_text("Memo for the night shift.\nThe pass key is 48213. Remember it.\nThe meeting is at 3 pm.\n")
    answer = invoke("chat", out, "--file", doc, "--prompt", "What is the pass key?", "--temperature", 0,
                    "--max-tokens", 16)
    assert answer.exit_code == 0 and "48213" in answer.output, answer.output


# bad inputs: one line on stderr, exit 1, no output left, the input unchanged

def refused(*args: object, match: str, out: Path, source: Path | None = None) -> None:
    before = sha256(source) if source is not None else None
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], result.output
    assert not [p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]
    if source is not None:
        assert sha256(source) == before


def synthetic_gguf(path: Path, arch: str = "llama", qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                   layers: int = 2, tensors: int | None = None) -> Path:
    """A GGUF with the tiny llama's head layout and only attn_output tensors (zeros of qtype)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_embedding_length(256)
    block, type_size = GGML_QUANT_SIZES[qtype]
    for layer in range(layers if tensors is None else tensors):
        data = np.zeros((256, 256 // block * type_size), dtype=np.uint8)
        writer.add_tensor(f"blk.{layer}.{ATTN_OUTPUT}", data, raw_shape=data.shape, raw_dtype=qtype)  # bytes of [256, 256]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_synthetic_gguf_is_accepted(scales: dict[str, Path], tmp_path: Path) -> None:
    # the refusals below differ from it in one respect each
    out = fold_gguf(synthetic_gguf(tmp_path / "in.gguf"), scales["head"], tmp_path / "out.gguf", progress=False)
    assert out.types == ("F32",) and out.requantized == ()


def test_already_folded_refused_unless_forced(ggufs, scales: dict[str, Path], tmp_path: Path) -> None:
    folded = fold_gguf(ggufs("f32"), scales["head"], tmp_path / "folded.gguf", progress=False).out_path
    out = tmp_path / "again.gguf"
    for source in (folded, ggufs("f32", "channel")):  # from fold-gguf and from fold-and-convert
        refused("fold-gguf", source, scales["head"], "-o", out, match="already has SEAL scales folded in",
                out=out, source=source)
    result = invoke("fold-gguf", folded, scales["channel"], "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    meta = seal_fields(out)  # replaced, not duplicated (llama.cpp refuses duplicate keys)
    assert meta[GGUFKeys.GRANULARITY] == "channel" and meta[GGUFKeys.SOURCE_GGUF_SHA256] == sha256(folded)
    assert np.isfinite(llama_scores(out)).all()


def test_wrong_shapes(ggufs, models: dict[str, Path], tmp_path: Path) -> None:
    layout = model_layout(models["f32"])
    deeper = ModelLayout(layout.model_type, 3, layout.num_heads, layout.head_dim, layout.o_proj_template)
    save_scales(tmp_path / "deeper.safetensors", torch.ones(3, layout.num_heads), deeper, "head")
    out = tmp_path / "o.gguf"
    refused("fold-gguf", ggufs("f32"), tmp_path / "deeper.safetensors", "-o", out,
            match="scales are for layers x heads x head_dim = 3 x 4 x 64, the model has 2 x 4 x 64", out=out,
            source=ggufs("f32"))
    source = synthetic_gguf(tmp_path / "three.gguf", layers=3, tensors=2)  # metadata and tensors disagree
    refused("fold-gguf", source, tmp_path / "deeper.safetensors", "-o", out,
            match="has no tensor blk.2.attn_output.weight (block_count is 3)", out=out, source=source)


def test_wrong_architecture(ggufs, tiny_model, scales: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    random_scales(tmp_path / "qwen2.safetensors", tiny_model("qwen2"), "head")
    refused("fold-gguf", ggufs("f32"), tmp_path / "qwen2.safetensors", "-o", out,
            match="scales are for model_type 'qwen2', the model is 'llama'", out=out, source=ggufs("f32"))
    source = synthetic_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    refused("fold-gguf", source, scales["head"], "-o", out, match="GGUF architecture 'gpt2' is not supported",
            out=out, source=source)


@pytest.mark.parametrize(("qtype", "match"), [
    (GGMLQuantizationType.IQ2_XXS, "IQ2_XXS, which llama.cpp requantizes only with an importance matrix"),
    (GGMLQuantizationType.F64, "stored as F64, which fold-gguf cannot rewrite"),
])
def test_unsupported_type(scales: dict[str, Path], tmp_path: Path, qtype: GGMLQuantizationType, match: str) -> None:
    source = synthetic_gguf(tmp_path / "in.gguf", qtype=qtype)
    out = tmp_path / "o.gguf"
    refused("fold-gguf", source, scales["head"], "-o", out, match=match, out=out, source=source)


def test_output_exists_not_a_gguf_same_file(ggufs, scales: dict[str, Path], tmp_path: Path) -> None:
    source = ggufs("f32")
    out = tmp_path / "o.gguf"
    out.write_bytes(b"an older file")
    result = invoke("fold-gguf", source, scales["head"], "-o", out, "-q")
    assert result.exit_code == 1 and "already exists (use --force" in result.output
    assert out.read_bytes() == b"an older file"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    refused("fold-gguf", not_gguf, scales["head"], "-o", tmp_path / "n.gguf", match="not a GGUF file",
            out=tmp_path / "n.gguf", source=not_gguf)
    refused("fold-gguf", source, scales["head"], "-o", source, "--force", match="is also an input",
            out=tmp_path / "none.gguf", source=source)


def test_f16_overflow_and_interrupt_leave_nothing(ggufs, models: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    layout = model_layout(models["f32"])
    huge = tmp_path / "huge.safetensors"
    save_scales(huge, torch.full((2, 4), 1e6), layout, "head")
    out = tmp_path / "o.gguf"
    refused("fold-gguf", ggufs("f16"), huge, "-o", out, "-q", match="beyond float16's range", out=out,
            source=ggufs("f16"))

    def interrupted(*args: object) -> None:  # Ctrl-C while the data section is being written
        raise KeyboardInterrupt

    monkeypatch.setattr(fold_gguf_module, "fold_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fold_gguf(ggufs("f16"), huge, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.safetensors"]
