"""fold-and-convert / convert / quantize with llama.cpp's real converter and quantizer."""

from __future__ import annotations

import ast
import functools
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize
from helpers import random_scales
from safetensors import safe_open
from safetensors.torch import save_file

import seal_gguf.convert.to_gguf as convert_module
from seal_gguf import __version__
from seal_gguf.cli.app import cli
from seal_gguf.constants import GGUF_RECIPE_KEYS, GGUF_SEAL_PREFIX, SCALES_TENSOR, GGUFKeys, ScalesMeta
from seal_gguf.convert.quantize import quantize, read_imatrix
from seal_gguf.convert.to_gguf import convert_to_gguf, lossless_outtype
from seal_gguf.errors import InputError
from seal_gguf.fold.hf import fold_checkpoint
from seal_gguf.model.architectures import ModelLayout, model_layout
from seal_gguf.model.checkpoint import model_fingerprint, read_header, weight_files
from seal_gguf.scales import read_scales, save_scales, scales_metadata


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")  # head_dim 64: Q8_0 blocks lie inside one head


@pytest.fixture(scope="module")
def scales(llama: Path, module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    folder = module_tmp("scales")
    for granularity in ("head", "channel"):
        random_scales(folder / f"{granularity}.safetensors", llama, granularity)
    return {g: folder / f"{g}.safetensors" for g in ("head", "channel")}


@pytest.fixture(scope="module")
def folded(llama: Path, scales: dict[str, Path], module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """The tiny llama folded by the Foundation's fold_checkpoint, per granularity."""
    folder = module_tmp("folded")
    return {g: fold_checkpoint(llama, scales[g], folder / g, progress=False).out_dir for g in ("head", "channel")}


@pytest.fixture(scope="module")
def ggufs(llama: Path, scales: dict[str, Path], folded: dict[str, Path], converter: Path,
          module_tmp: Callable[[str], Path]):
    """make(route, outtype, granularity) -> GGUF; route: 'patch' (--seal-scales), 'fold' (the folded
    checkpoint, converted without scales) or 'base' (no scales). Each is converted once per module."""
    folder = module_tmp("ggufs")
    made: dict[tuple[str, str, str | None], Path] = {}

    def make(route: str, outtype: str, granularity: str | None = None) -> Path:
        key = (route, outtype, granularity)
        if key not in made:
            out = folder / f"{route}-{outtype}-{granularity}.gguf"
            if route == "patch":
                convert_to_gguf(llama, out, outtype, scales[granularity], llama_cpp=converter, progress=False)
            elif route == "fold":
                convert_to_gguf(folded[granularity], out, outtype, progress=False)
            else:
                convert_to_gguf(llama, out, outtype, progress=False)
            made[key] = out
        return made[key]

    return make


@functools.cache
def reader(path: Path) -> GGUFReader:
    return GGUFReader(str(path), "r")


def tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in reader(path).tensors}


def seal_fields(path: Path) -> dict[str, object]:
    return {name: f.contents() for name, f in reader(path).fields.items() if name.startswith("seal.")}


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# (a) one pass through the patched converter == fold the checkpoint, then convert it

@pytest.mark.parametrize(("outtype", "granularity"), [("f32", "channel"), ("q8_0", "head")])
def test_patch_equals_fold_then_convert(ggufs, outtype: str, granularity: str) -> None:
    patched, folded = tensors(ggufs("patch", outtype, granularity)), tensors(ggufs("fold", outtype, granularity))
    base = tensors(ggufs("base", "q8_0")) if outtype == "q8_0" else None
    assert patched.keys() == folded.keys()
    for name, tensor in patched.items():
        assert tensor.tensor_type == folded[name].tensor_type, name
        assert np.array_equal(tensor.data, folded[name].data), name
        if base is not None:  # and the scales changed exactly the attn_output tensors
            assert np.array_equal(tensor.data, base[name].data) != name.endswith("attn_output.weight"), name


def test_patch_scales_o_proj_columns_exactly(ggufs, llama: Path, scales: dict[str, Path]) -> None:
    layout = model_layout(llama)
    values = read_scales(scales["channel"])
    got = tensors(ggufs("patch", "f32", "channel"))
    with safe_open(str(weight_files(llama)[0]), "pt") as f:
        for layer in range(layout.num_layers):
            want = f.get_tensor(layout.o_proj_weight(layer)) * values.columns(layer, layout.head_dim)
            assert np.array_equal(got[f"blk.{layer}.attn_output.weight"].data, want.numpy())


# (c) head-wise scales, head_dim a multiple of 32: each Q8_0 block lies in one head, so folding
# rescales the block's fp16 scale factor and keeps its 8-bit codes

def q8_0_blocks(tensor) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scale factor d per block, int8 codes per block) of a Q8_0 tensor: 34-byte blocks."""
    raw = np.ascontiguousarray(tensor.data).reshape(-1, 34)
    return raw[:, :2].copy().view(np.float16)[:, 0].astype(np.float64), raw[:, 2:].copy().view(np.int8)


def test_q8_0_commutes_with_head_scales(ggufs, llama: Path, scales: dict[str, Path]) -> None:
    layout = model_layout(llama)
    values = read_scales(scales["head"])
    folded, base = tensors(ggufs("patch", "q8_0", "head")), tensors(ggufs("base", "q8_0"))
    for layer in range(layout.num_layers):
        name = f"blk.{layer}.attn_output.weight"
        assert folded[name].tensor_type.name == base[name].tensor_type.name == "Q8_0"
        columns = values.columns(layer, layout.head_dim).numpy()
        d_folded, q_folded = q8_0_blocks(folded[name])
        d_base, q_base = q8_0_blocks(base[name])
        block_scale = np.tile(columns[::32], 256)  # 256 rows, one head scale per 32-column block
        # d: two fp16 roundings (folded and unfolded), 2 x 2^-11 relative
        np.testing.assert_allclose(d_folded, d_base * block_scale, rtol=2.0 ** -10, atol=0)
        # codes: identical, but where x/d sits on a rounding tie (float rounding of x*s/(d*s))
        changed = q_folded != q_base
        assert np.abs(q_folded.astype(int) - q_base).max() <= 1 and changed.mean() < 1e-3
        got = dequantize(folded[name].data, folded[name].tensor_type)
        want = dequantize(base[name].data, base[name].tensor_type) * columns
        same = ~changed.reshape(got.shape)
        np.testing.assert_allclose(got[same], want[same], rtol=2.0 ** -10, atol=0)
        assert not np.allclose(columns, 1.0)


# (d) provenance

def test_seal_keys_in_gguf(ggufs, llama: Path, scales: dict[str, Path]) -> None:
    layout = model_layout(llama)
    meta = seal_fields(ggufs("patch", "f32", "channel"))
    assert meta[GGUFKeys.FORMAT] == "seal-scales/1"
    assert meta[GGUFKeys.GRANULARITY] == "channel"
    assert meta[GGUFKeys.SCALES_SHA256] == read_scales(scales["channel"]).sha256
    assert (meta[GGUFKeys.NUM_LAYERS], meta[GGUFKeys.NUM_HEADS], meta[GGUFKeys.HEAD_DIM]) == (
        layout.num_layers, layout.num_heads, layout.head_dim)
    assert meta[GGUFKeys.VERSION] == __version__
    assert not any(key.removeprefix("seal.") in GGUF_RECIPE_KEYS for key in meta)  # these scales record none
    assert seal_fields(ggufs("base", "q8_0")) == {}


@pytest.mark.parametrize(("outtype", "granularity"), [("f32", "channel"), ("q8_0", "head")])
def test_fold_then_convert_records_the_fold(ggufs, scales: dict[str, Path], outtype: str, granularity: str,
                                           tmp_path: Path) -> None:
    """A checkpoint folded by `fold`, then converted: its GGUF carries the seal.* keys fold-and-convert
    writes for the same scales, so it describes itself and is never folded a second time."""
    patched, folded = ggufs("patch", outtype, granularity), ggufs("fold", outtype, granularity)
    assert seal_fields(folded) == seal_fields(patched) and seal_fields(folded)[GGUFKeys.GRANULARITY] == granularity
    refused("fold-gguf", folded, scales[granularity], "-o", tmp_path / "twice.gguf",
            match="already has SEAL scales folded in", out=tmp_path / "twice.gguf")


def test_gguf_records_the_training_recipe(llama: Path, converter: Path, tmp_path: Path) -> None:
    layout = model_layout(llama)
    recipe = {key: f"value of {key}" for key in GGUF_RECIPE_KEYS} | {ScalesMeta.LENGTH: "320"}
    # the fingerprint is compared with the model's (another model's scales are refused): the real one
    recipe[ScalesMeta.BASE_FINGERPRINT] = model_fingerprint(llama, layout)
    path = tmp_path / "trained.safetensors"
    save_scales(path, torch.full((layout.num_layers, layout.num_heads), 1.25), layout, "head", provenance=recipe)
    out = convert_to_gguf(llama, tmp_path / "trained.gguf", "f32", path, llama_cpp=converter, progress=False)
    meta = seal_fields(out)
    assert {key: meta.get(GGUF_SEAL_PREFIX + key) for key in GGUF_RECIPE_KEYS} == recipe
    folded = fold_checkpoint(llama, path, tmp_path / "folded", progress=False).out_dir
    assert seal_fields(convert_to_gguf(folded, tmp_path / "folded.gguf", "f32", progress=False)) == meta
    # the converter-side module is standalone: its copy of the key list must stay the same as ours
    patch = Path(convert_module.__file__).parent / "patches" / "0001-convert-seal-scales.patch"
    found = re.search(r"^\+RECIPE_KEYS = (\(.*?\))$", patch.read_text(), re.S | re.M)
    assert found is not None
    assert ast.literal_eval("".join(line.lstrip("+") for line in found.group(1).splitlines())) == GGUF_RECIPE_KEYS


# llama-quantize types, through the CLI

def test_fold_and_convert_q4_k_m_cli(llama: Path, scales: dict[str, Path], converter: Path, tmp_path: Path) -> None:
    out = tmp_path / "smol-q4.gguf"
    out.write_bytes(b"an older file")
    refused = invoke("fold-and-convert", llama, scales["head"], "-o", out, "--outtype", "q4_k_m", "-q")
    assert refused.exit_code == 1 and "already exists" in refused.output and out.read_bytes() == b"an older file"
    result = invoke("fold-and-convert", llama, scales["head"], "-o", out, "--outtype", "Q4_K_M",
                    "--attn-output-type", "q8_0", "--llama-cpp", converter, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-q4.gguf"]  # the intermediate is gone
    types = {name: t.tensor_type.name for name, t in tensors(out).items()}
    assert {types[f"blk.{i}.attn_output.weight"] for i in range(2)} == {"Q8_0"}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert seal_fields(out)[GGUFKeys.GRANULARITY] == "head"  # the quantizer keeps seal.* keys

    import llama_cpp

    model = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    model.eval([1, 200, 300, 400])
    assert np.isfinite(np.asarray(model.scores[:4])).all()


def test_quantize_with_imatrix(ggufs, tmp_path: Path) -> None:
    source = ggufs("patch", "f32", "channel")
    weights = {n: t for n, t in tensors(source).items() if len(t.shape) == 2 and n.startswith("blk.")}
    rng = np.random.default_rng(0)
    imatrix = tmp_path / "imatrix.gguf"
    writer = GGUFWriter(str(imatrix), "llama")
    writer.add_array("imatrix.datasets", ["random"])
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, t in weights.items():
        writer.add_tensor(f"{name}.in_sum2", (rng.random((1, int(t.shape[0]))) * 2048).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([[2048.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_imatrix(imatrix).keys() == weights.keys()

    result = invoke("quantize", source, tmp_path / "iq2.gguf", "iq2_xxs", "-q")
    assert result.exit_code == 1 and "needs an importance matrix" in result.output
    assert invoke("quantize", source, tmp_path / "iq2.gguf", "iq2_xxs", "--imatrix", imatrix, "-q").exit_code == 0
    assert tensors(tmp_path / "iq2.gguf")["blk.0.attn_q.weight"].tensor_type.name == "IQ2_XXS"


def test_legacy_imatrix_reads_like_llama_quantize(tmp_path: Path) -> None:
    sums = np.arange(1, 9, dtype=np.float32)
    path = tmp_path / "imatrix.dat"
    name = b"blk.0.attn_q.weight"
    path.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 4, 8) + sums.tobytes()
                     + struct.pack("<ii", 10, 4) + b"wiki")
    assert np.array_equal(read_imatrix(path)["blk.0.attn_q.weight"], sums / 4)


# other architectures: qwen2 needs a SentencePiece tokenizer for the converter (see tiny_models)

@pytest.mark.parametrize(("arch", "extra"), [("qwen2", {"spm_tokenizer": True}), ("gemma3_text", {})])
def test_other_architectures(tiny_model, converter: Path, tmp_path: Path, arch: str, extra: dict) -> None:
    model_dir = tiny_model(arch, **extra)
    layout = model_layout(model_dir)
    random_scales(tmp_path / "s.safetensors", model_dir, "channel")
    out = convert_to_gguf(model_dir, tmp_path / "out.gguf", "f32", tmp_path / "s.safetensors", progress=False)
    values = read_scales(tmp_path / "s.safetensors")
    got = tensors(out)
    with safe_open(str(weight_files(model_dir)[0]), "pt") as f:
        for layer in range(layout.num_layers):
            want = f.get_tensor(layout.o_proj_weight(layer)) * values.columns(layer, layout.head_dim)
            assert np.array_equal(got[f"blk.{layer}.attn_output.weight"].data, want.numpy())
    import llama_cpp

    model = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    model.eval([1, 200, 300])
    assert np.isfinite(np.asarray(model.scores[:3])).all()


def test_lossless_intermediate_type(tiny_model) -> None:
    for dtype, want in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        headers = [read_header(p) for p in weight_files(tiny_model("llama", dtype=dtype))]
        assert lossless_outtype(headers) == want


# (e) bad inputs: one line, exit 1, nothing written

def refused(*args: str, match: str, out: Path | None = None) -> None:
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert match in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def bad_scales(path: Path, values: torch.Tensor, layout: ModelLayout, granularity: str = "head") -> Path:
    save_file({SCALES_TENSOR: values}, str(path), metadata=scales_metadata(layout, granularity, None))
    return path


def test_missing_model_dir(scales: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    refused("fold-and-convert", tmp_path / "nope", scales["head"], "-o", out, match="no such folder", out=out)
    refused("convert", tmp_path / "nope", "-o", out, match="no such folder", out=out)


def test_missing_and_corrupt_scales(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    refused("fold-and-convert", llama, tmp_path / "none.safetensors", "-o", out, match="no such scales file", out=out)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    refused("fold-and-convert", llama, corrupt, "-o", out, match="not a readable safetensors file", out=out)


@pytest.mark.parametrize(("value", "match"), [(float("nan"), "must be finite"), (0.0, "must be > 0")])
def test_nan_and_zero_scales(llama: Path, tmp_path: Path, value: float, match: str) -> None:
    layout = model_layout(llama)
    values = torch.ones(layout.num_layers, layout.num_heads)
    values[1, 2] = value
    out = tmp_path / "o.gguf"
    refused("fold-and-convert", llama, bad_scales(tmp_path / "s.safetensors", values, layout), "-o", out,
            match=match, out=out)


def test_mismatched_scales(llama: Path, tiny_model, tmp_path: Path) -> None:
    layout = model_layout(llama)
    deeper = ModelLayout(layout.model_type, layout.num_layers + 1, layout.num_heads, layout.head_dim,
                         layout.o_proj_template)
    out = tmp_path / "o.gguf"
    save_scales(tmp_path / "deeper.safetensors", torch.ones(3, layout.num_heads), deeper, "head")
    refused("fold-and-convert", llama, tmp_path / "deeper.safetensors", "-o", out, match="3 x 4 x 64", out=out)
    random_scales(tmp_path / "mistral.safetensors", tiny_model("mistral"), "head")
    refused("fold-and-convert", llama, tmp_path / "mistral.safetensors", "-o", out, match="model_type 'mistral'",
            out=out)


def test_unsupported_outtype_and_options(llama: Path, scales: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    refused("fold-and-convert", llama, scales["head"], "-o", out, "--outtype", "q9_9", match="unsupported outtype",
            out=out)
    refused("convert", llama, "-o", out, "--outtype", "f16", "--attn-output-type", "q8_0",
            match="apply to quantized types", out=out)
    refused("convert", llama, "-o", out, "--outtype", "q4_k_m", "--attn-output-type", "q7", match="q6_k", out=out)
    refused("convert", llama, "-o", out, "--outtype", "iq2_xs", match="needs an importance matrix", out=out)
    garbage = tmp_path / "imatrix.dat"
    garbage.write_bytes(b"\x01\x00\x00\x00\xff\xff")
    refused("convert", llama, "-o", out, "--outtype", "q4_k_m", "--imatrix", garbage,
            match="not a readable importance matrix", out=out)


def test_existing_output_without_force(llama: Path, scales: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    refused("fold-and-convert", llama, scales["head"], "-o", out, match="already exists")
    assert out.read_bytes() == b"keep me"
    # -o FOLDER (one type): the GGUF goes inside, named after the model and type; --force never touches the folder
    result = invoke("convert", llama, "-o", tmp_path, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model-f16.gguf").is_file() and out.read_bytes() == b"keep me"


def test_already_folded_model(folded: dict[str, Path], scales: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    refused("fold-and-convert", folded["channel"], scales["head"], "-o", out, match="already has SEAL scales",
            out=out)


def test_f16_overflow_advises_bf16(llama: Path, tmp_path: Path) -> None:
    layout = model_layout(llama)
    huge = bad_scales(tmp_path / "huge.safetensors", torch.full((2, 4), 1e6), layout)
    out = tmp_path / "o.gguf"
    refused("fold-and-convert", llama, huge, "-o", out, "--outtype", "f16", match="use --outtype bf16", out=out)


def test_converter_failure_is_one_line(tiny_model, converter: Path, tmp_path: Path) -> None:
    # a qwen2 model with SmolLM2's BPE tokenizer: the converter does not recognize its pre-tokenizer
    out = tmp_path / "o.gguf"
    refused("convert", tiny_model("qwen2"), "-o", out, "--outtype", "f32", "-q",
            match="llama.cpp's converter failed: NotImplementedError: BPE pre-tokenizer was not recognized", out=out)


def test_llama_cpp_checkout_checks(llama: Path, scales: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    checkout = tmp_path / "llama.cpp"
    (checkout / "gguf-py" / "gguf").mkdir(parents=True)
    refused("convert", llama, "-o", out, "--llama-cpp", checkout, match="not a llama.cpp checkout", out=out)
    (checkout / "convert_hf_to_gguf.py").write_text("# an upstream converter, without the patch\n")
    refused("fold-and-convert", llama, scales["head"], "-o", out, "--llama-cpp", checkout,
            match="lacks --seal-scales; apply seal-gguf's patch there", out=out)


def test_interrupt_removes_intermediate(llama: Path, scales: dict[str, Path], converter: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:  # Ctrl-C while the quantizer runs
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "run_quantizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_to_gguf(llama, tmp_path / "o.gguf", "q4_0", scales["head"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_quantize_bad_inputs(tmp_path: Path) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(InputError, match="bad magic"):
        quantize(not_gguf, tmp_path / "y.gguf", "q4_0")
    with pytest.raises(InputError, match="unknown quantization type"):
        quantize(not_gguf, tmp_path / "y.gguf", "q4_z")


def test_quantized_input_refused_up_front(smollm2_gguf: Path, tmp_path: Path) -> None:
    # SmolLM2 ships as Q4_1: llama.cpp would refuse to requantize it; said before the quantizer runs
    with pytest.raises(InputError, match="a q4_1 GGUF; llama.cpp's quantizer starts from f32, f16 or bf16"):
        quantize(smollm2_gguf, tmp_path / "y.gguf", "q4_0", progress=False)
    assert list(tmp_path.iterdir()) == []
