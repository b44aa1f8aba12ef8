"""Property-based tests: the scales loader, the fold and the GGUF metadata reader on random input.

- the scales loader takes every valid file and refuses every invalid one with ScalesError, never
  with another exception (an independent oracle says which is which);
- fold_weight computes what the hook computes, x @ (W*s).T == (x*s) @ W.T, within the rounding of
  one multiplication in the weight's dtype; the streaming shard rewrite equals an in-memory fold
  and leaves every other byte as it was;
- the GGUF reader returns the seal.* keys written by gguf's own GGUFWriter, and a truncated GGUF
  gives InputError, never a traceback.
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from seal_gguf.constants import (
    CONFIG_FOLD_KEY,
    GRANULARITIES,
    REQUIRED_SCALES_META,
    SCALES_FORMAT,
    SCALES_TENSOR,
)
from seal_gguf.errors import InputError, ScalesError
from seal_gguf.fold.hf import fold_checkpoint, fold_weight
from seal_gguf.gguffile.metadata import gguf_seal_metadata
from seal_gguf.model.architectures import ModelLayout
from seal_gguf.model.checkpoint import INDEX_NAME, read_header, weight_files
from seal_gguf.model.hooks import attach_scales
from seal_gguf.scales import read_scales, save_scales


def examples(n: int) -> settings:
    """n random cases per property (about 10 s for the whole file on 2 busy cores)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# unit roundoff of each dtype, and half the spacing of its subnormals (the absolute error floor)
ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TINIEST = {torch.float32: 2.0 ** -150, torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}

# printable text a safetensors header or a GGUF string can hold (no lone surrogates)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


# -- the scales loader --

def valid_scales_oracle(name: str, meta: dict[str, str], values: torch.Tensor) -> bool:
    """The scales-file rules, written out independently of seal_gguf.scales."""
    if name != SCALES_TENSOR or any(k not in meta for k in REQUIRED_SCALES_META):
        return False
    if meta["format"] != SCALES_FORMAT or meta["granularity"] not in GRANULARITIES:
        return False
    try:
        layers, heads, head_dim = (int(meta[k]) for k in ("num_layers", "num_heads", "head_dim"))
    except ValueError:
        return False
    if min(layers, heads, head_dim) <= 0:
        return False
    want = (layers, heads) if meta["granularity"] == "head" else (layers, heads, head_dim)
    if tuple(values.shape) != want or values.dtype != torch.float32:
        return False
    return bool(torch.isfinite(values).all() and (values > 0).all())


@st.composite
def scales_files(draw: st.DrawFn) -> tuple[str, dict[str, str], torch.Tensor]:
    """Mostly near-valid files: a valid one with a few things changed."""
    layers, heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    granularity = draw(st.sampled_from(GRANULARITIES))
    meta = {"format": SCALES_FORMAT, "granularity": granularity, "model_type": draw(st.sampled_from(["llama", "qwen2"])),
            "num_layers": str(layers), "num_heads": str(heads), "head_dim": str(head_dim)}
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=2, unique=True)):
        change = draw(st.sampled_from(["drop", "number", "text"]))
        if change == "drop":
            del meta[key]
        elif change == "number":
            meta[key] = draw(st.sampled_from(["0", "-1", "2", "4", " 3 ", "2.0", "1e3", ""]))
        else:
            meta[key] = draw(text)
    meta.update(draw(st.dictionaries(st.sampled_from(["task", "seed", "note"]), text, max_size=2)))
    shape = (layers, heads) if granularity == "head" else (layers, heads, head_dim)
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    values = torch.exp(torch.empty(shape).uniform_(-2, 2, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))))
    if values.numel() and draw(st.booleans()):
        flat = values.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.5, 1e-30, 3e38]))
    values = values.to(draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.float64, torch.bfloat16])))
    name = draw(st.sampled_from([SCALES_TENSOR, SCALES_TENSOR, "scales", "seal_scales.weight"]))
    return name, meta, values


@examples(150)
@given(scales_files())
def test_scales_loader_takes_valid_and_refuses_invalid(case: tuple[str, dict[str, str], torch.Tensor]) -> None:
    name, meta, values = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.safetensors"
        save_file({name: values}, str(path), metadata=meta)
        if valid_scales_oracle(name, meta, values):
            scales = read_scales(path)
            assert torch.equal(scales.values, values)
            assert scales.granularity == meta["granularity"] and scales.model_type == meta["model_type"]
            assert scales.metadata == meta
        else:
            with pytest.raises(ScalesError, match=re.escape(str(path))):
                read_scales(path)


@pytest.fixture(scope="module")
def valid_scales_bytes(module_tmp: Callable[[str], Path]) -> bytes:
    layout = ModelLayout("llama", 2, 3, 4, "model.layers.{layer}.self_attn.o_proj")
    path = module_tmp("scales") / "s.safetensors"
    save_scales(path, torch.full((2, 3, 4), 1.25), layout, "channel", provenance={"task": "lines"})
    return path.read_bytes()


@examples(150)
@given(data=st.data())
def test_damaged_scales_files_give_scales_error(valid_scales_bytes: bytes, data: st.DataObject) -> None:
    """A truncated, bit-flipped or random file loads (if still valid) or raises ScalesError, nothing else."""
    damage = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if damage == "truncate":
        content = valid_scales_bytes[: data.draw(st.integers(1, len(valid_scales_bytes) - 1))]
    elif damage == "flip":
        at = data.draw(st.integers(0, len(valid_scales_bytes) - 1))
        content = bytearray(valid_scales_bytes)
        content[at] ^= data.draw(st.integers(1, 255))
        content = bytes(content)
    else:
        content = data.draw(st.binary(min_size=1, max_size=400))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.safetensors"
        path.write_bytes(content)
        try:
            scales = read_scales(path)
        except ScalesError:
            return
        assert damage == "flip"  # only a flip can leave a valid file (a changed value or letter)
        assert torch.isfinite(scales.values).all() and (scales.values > 0).all()


# -- the fold --

def random_weight(generator: torch.Generator, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype)


def random_scales(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    # log-uniform over [e^-3, e^3]: strong suppression to strong amplification
    return torch.exp(torch.empty(shape).uniform_(-3, 3, generator=generator))


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.o_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.o_proj.weight.copy_(weight.double())


class Stack(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([OneLayer(weight)])


@examples(100)
@given(out_features=st.integers(1, 8), heads=st.integers(1, 4), head_dim=st.integers(1, 8),
       dtype=st.sampled_from(sorted(DTYPES)), granularity=st.sampled_from(GRANULARITIES), seed=st.integers(0, 10_000))
def test_fold_weight_equals_the_hook(out_features: int, heads: int, head_dim: int, dtype: str, granularity: str,
                                     seed: int) -> None:
    """x @ fold(W).T == hook(x) @ W.T, up to rounding W*s once into W's dtype."""
    g = torch.Generator().manual_seed(seed)
    weight = random_weight(g, (out_features, heads * head_dim), DTYPES[dtype])
    values = random_scales(g, (1, heads) if granularity == "head" else (1, heads, head_dim))
    x = torch.randn(3, heads * head_dim, generator=g, dtype=torch.float64)
    layout = ModelLayout("test", 1, heads, head_dim, "layers.{layer}.o_proj")

    model = Stack(weight)  # float64 holds every dtype's weights and every product exactly
    with attach_scales(model, layout, values):
        hooked = model.layers[0].o_proj(x)
    columns = values[0].repeat_interleave(head_dim) if granularity == "head" else values[0].reshape(-1)
    folded_weight = fold_weight(weight, columns)
    assert folded_weight.dtype == weight.dtype and folded_weight.shape == weight.shape
    folded = x @ folded_weight.double().T

    exact = weight.double() * columns.double()  # what the fold would store with infinite precision
    rel = ROUNDOFF[DTYPES[dtype]] + 2.0 ** -24  # into float32, then into the dtype
    bound = (x.abs() @ (exact.abs().T * rel + TINIEST[DTYPES[dtype]])) * 1.001 + 1e-12 * (x.abs() @ exact.abs().T)
    assert ((folded - hooked).abs() <= bound).all(), (folded - hooked).abs().max()
    # and the rounding is the dtype's own: the fold is exact where W*s fits the dtype
    assert torch.equal(folded_weight, exact.float().to(weight.dtype))


@st.composite
def checkpoints(draw: st.DrawFn) -> dict:
    """A random llama-layout checkpoint: o_proj weights, other tensors of any dtype, 1-3 shards."""
    layers, heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"] = random_weight(
            g, (draw(st.integers(1, 6)), heads * head_dim), dtype)
        # a neighbour whose name extends the o_proj's: must be copied, not folded
        tensors[f"model.layers.{layer}.self_attn.o_proj.bias"] = torch.randn(3, generator=g).to(dtype)
    for i in range(draw(st.integers(0, 4))):
        other = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        tensors[f"model.extra.{i}"] = (torch.randn(shape, generator=g) * 50).to(other)
    shards = draw(st.integers(1, 3))
    placement = {name: draw(st.integers(0, shards - 1)) for name in tensors}
    granularity = draw(st.sampled_from(GRANULARITIES))
    shape = (layers, heads) if granularity == "head" else (layers, heads, head_dim)
    return {"layers": layers, "heads": heads, "head_dim": head_dim, "tensors": tensors, "shards": shards,
            "placement": placement, "granularity": granularity, "scales": random_scales(g, shape),
            "metadata": draw(st.dictionaries(st.sampled_from(["format", "note"]), text, max_size=2)),
            "header_order": draw(st.randoms(use_true_random=False))}


def write_checkpoint(folder: Path, spec: dict) -> Path:
    model = folder / "model"
    model.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"],
              "head_dim": spec["head_dim"], "hidden_size": 7}
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text('{"side": "file"}')
    # as transformers writes them: every shard holds at least one tensor (an empty one would be a stray file)
    used = sorted(set(spec["placement"].values())) if spec["shards"] > 1 else [0]
    names = {i: f"model-{k + 1:05d}-of-{len(used):05d}.safetensors" for k, i in enumerate(used)}
    for i, name in names.items():
        shard = {k: v for k, v in spec["tensors"].items() if spec["placement"][k] == i}
        save_file(shard, str(model / name), metadata=spec["metadata"] or None)
        reorder_header(model / name, spec["header_order"])
    if spec["shards"] > 1:
        weight_map = {k: names[i] for k, i in spec["placement"].items()}
        (model / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def reorder_header(path: Path, rng: random.Random) -> None:
    """List the tensors in the JSON header in another order (the format leaves it free; safetensors
    itself writes layout order, other writers need not): same tensors, same offsets, same data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    keys = list(header)
    rng.shuffle(keys)
    encoded = json.dumps({k: header[k] for k in keys}).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:])


def write_checkpoint_and_scales(folder: Path, spec: dict) -> Path:
    """The checkpoint of `spec` and its scales (folder / "s.safetensors"); returns the model folder."""
    model = write_checkpoint(folder, spec)
    layout = ModelLayout("llama", spec["layers"], spec["heads"], spec["head_dim"],
                         "model.layers.{layer}.self_attn.o_proj")
    save_scales(folder / "s.safetensors", spec["scales"], layout, spec["granularity"])
    return model


@examples(60)
@given(checkpoints())
def test_streaming_fold_equals_an_in_memory_fold(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_checkpoint_and_scales(folder, spec)
        before = {p.name: p.read_bytes() for p in model.iterdir()}
        out = fold_checkpoint(model, folder / "s.safetensors", folder / "folded", progress=False).out_dir

        assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # the input is only read
        assert sorted(p.name for p in out.iterdir()) == sorted(before)
        assert (out / "tokenizer.json").read_bytes() == before["tokenizer.json"]
        assert CONFIG_FOLD_KEY in json.loads((out / "config.json").read_text())
        head_wise = spec["granularity"] == "head"
        for name in before:
            if not name.endswith(".safetensors"):
                continue
            source, folded = read_header(model / name), read_header(out / name)
            assert folded.header_bytes == source.header_bytes and (out / name).stat().st_size == len(before[name])
            with safe_open(str(out / name), framework="pt") as f:
                assert f.metadata() == (spec["metadata"] or None)
                for key in f.keys():
                    got, original = f.get_tensor(key), spec["tensors"][key]
                    layer = key.split(".")[2]
                    if key.endswith("o_proj.weight"):
                        s = spec["scales"][int(layer)]
                        columns = s.repeat_interleave(spec["head_dim"]) if head_wise else s.reshape(-1)
                        assert torch.equal(got, fold_weight(original, columns))
                    else:  # copied byte for byte
                        entry = source.tensors[key]
                        assert (out / name).read_bytes()[entry.begin:entry.end] == before[name][entry.begin:entry.end]
                        assert torch.equal(got, original)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@examples(100)
@given(spec=checkpoints(), data=st.data())
def test_damaged_shard_is_refused_or_folded_exactly(spec: dict, data: st.DataObject) -> None:
    """A shard cut short, bit-flipped or padded: the fold refuses it with one of seal-gguf's errors, or
    safetensors itself reads the shard and the output is exactly its fold (nothing garbled is written)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_checkpoint_and_scales(folder, spec)
        shards = weight_files(model)  # the ones the index lists
        shard = data.draw(st.sampled_from(shards))
        raw = bytearray(shard.read_bytes())
        damage = data.draw(st.sampled_from(["cut", "flip", "flip", "pad"]))
        if damage == "cut":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif damage == "flip":
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        else:
            raw += data.draw(st.binary(min_size=1, max_size=16))
        shard.write_bytes(bytes(raw))
        try:
            out = fold_checkpoint(model, folder / "s.safetensors", folder / "folded", progress=False).out_dir
        except (InputError, ScalesError):
            assert not (folder / "folded").exists() and not list(folder.glob(".folded*"))
            return
        source = {}
        for path in shards:
            with safe_open(str(path), framework="pt") as f:  # safetensors accepts what the fold accepted
                source |= {(path.name, k): f.get_tensor(k) for k in f.keys()}
        head_wise = spec["granularity"] == "head"
        for (name, key), original in source.items():
            with safe_open(str(out / name), framework="pt") as f:
                got = f.get_tensor(key)
            if key.endswith("o_proj.weight") and key.startswith("model.layers."):
                s = spec["scales"][int(key.split(".")[2])]
                columns = s.repeat_interleave(spec["head_dim"]) if head_wise else s.reshape(-1)
                assert torch.equal(got, fold_weight(original, columns))
            else:
                assert got.dtype == original.dtype and as_bytes(got) == as_bytes(original)


# -- the GGUF metadata reader --

SEAL_VALUE_KINDS = ("string", "uint32", "int64", "float32", "bool", "strings")


@st.composite
def seal_fields(draw: st.DrawFn) -> dict[str, tuple[str, object]]:
    keys = draw(st.lists(st.from_regex(r"seal\.[a-z_][a-z0-9_.]{0,15}", fullmatch=True), max_size=6, unique=True))
    fields = {}
    for key in keys:
        kind = draw(st.sampled_from(SEAL_VALUE_KINDS))
        # GGUFWriter drops an empty string value (add_string returns early): never written, never read
        value = {"string": text.filter(bool), "uint32": st.integers(0, 2**32 - 1), "int64": st.integers(-2**63, 2**63 - 1),
                 "float32": st.floats(width=32, allow_nan=False), "bool": st.booleans(),
                 "strings": st.lists(text, min_size=1, max_size=3)}[kind]
        fields[key] = (kind, draw(value))
    return fields


def write_gguf(path: Path, arch: str, fields: dict[str, tuple[str, object]], others: dict[str, str],
               tensor: np.ndarray | None = None) -> None:
    writer = GGUFWriter(str(path), arch)
    for key, (kind, value) in fields.items():
        {"string": writer.add_string, "uint32": writer.add_uint32, "int64": writer.add_int64,
         "float32": writer.add_float32, "bool": writer.add_bool, "strings": writer.add_array}[kind](key, value)
    for key, value in others.items():
        writer.add_string(key, value)
    if tensor is not None:
        writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@examples(60)
@given(arch=st.sampled_from(["llama", "qwen2", "gemma3"]), fields=seal_fields(),
       others=st.dictionaries(st.from_regex(r"(general|tokenizer)\.x_[a-z]{1,8}", fullmatch=True), text, max_size=3),
       with_tensor=st.booleans())
def test_gguf_seal_metadata_round_trips(arch: str, fields: dict, others: dict, with_tensor: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.gguf"
        write_gguf(path, arch, fields, others, np.arange(32, dtype=np.float32).reshape(4, 8) if with_tensor else None)
        read = gguf_seal_metadata(path)
    assert set(read) == {"general.architecture", *fields}  # seal.* and the architecture, nothing else
    assert read["general.architecture"] == arch
    for key, (kind, value) in fields.items():
        if kind == "float32":
            assert read[key] == float(np.float32(value))
        else:
            assert read[key] == value


@pytest.fixture(scope="module")
def gguf_bytes(module_tmp: Callable[[str], Path]) -> tuple[bytes, int]:
    """A small GGUF with seal.* keys and two tensors, and where its tensor data starts."""
    path = module_tmp("gguf") / "m.gguf"
    fields = {"seal.format": ("string", "seal-scales/1"), "seal.granularity": ("string", "head"),
              "seal.num_layers": ("uint32", 2), "seal.names": ("strings", ["a", "bc"])}
    writer_tensor = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    write_gguf(path, "llama", fields, {"general.name": "tiny"}, writer_tensor)
    return path.read_bytes(), GGUFReader(str(path), "r").data_offset


@examples(100)
@given(data=st.data())
def test_truncated_gguf_gives_input_error(gguf_bytes: tuple[bytes, int], data: st.DataObject) -> None:
    content, data_offset = gguf_bytes
    cut = data.draw(st.integers(0, len(content) - 1))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cut.gguf"
        path.write_bytes(content[:cut])
        try:
            read = gguf_seal_metadata(path)
        except InputError as exc:
            assert str(path) in str(exc)
            return
        # only a cut inside the tensor data can go unnoticed by a reader of the metadata
        assert cut >= data_offset, f"a GGUF cut at byte {cut} of {len(content)} was read: {read}"
        assert read["seal.num_layers"] == 2
