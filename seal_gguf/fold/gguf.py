"""`seal-gguf fold-gguf`: fold SEAL scales into an existing GGUF, for users who have no HF checkpoint.

Only the blk.N.attn_output.weight tensors change (their input columns are the heads, in HF order:
llama.cpp's converter permutes only q/k rows). Adding the seal.* keys changes only the header's
length; the tensor infos and their offsets, which count from the start of the data section, stay
as they are. So the output is: the input's header with the seal.* keys appended, then its data
section copied in blocks, each attn_output byte range replaced by its folded bytes of the same
length and type:
- f32, f16, bf16: scaled exactly (in float32, stored as before, as the converter patch does);
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: dequantized, scaled and quantized back by gguf.quants. With head
  scales and head_dim a multiple of 32, each block lies inside one head and keeps its codes: only
  its fp16 block scale changes;
- K-quants, IQ4_NL, IQ4_XS, IQ3_S: requantized from the dequantized values by llama.cpp's own
  quantizer (ggml_quantize_chunk, as llama-quantize runs it without an importance matrix): lossy;
- the IQ types that llama.cpp quantizes only with an importance matrix are refused.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)
from gguf.quants import dequantize, quantize
from tqdm import tqdm

from seal_gguf import __version__
from seal_gguf.constants import F16_MAX, GGUF_RECIPE_KEYS, GGUF_SEAL_PREFIX, GGUFKeys, ScalesMeta
from seal_gguf.errors import AlreadyFoldedError, ArchitectureError, EngineError, InputError, ScalesError
from seal_gguf.fileio import atomic_file, check_output_path, require_gguf
from seal_gguf.gguffile.header import FIXED_HEADER, GGUFHeader, read_gguf_header
from seal_gguf.model.architectures import ModelLayout, arch_specs
from seal_gguf.model.checkpoint import check_base_fingerprint
from seal_gguf.scales import SealScales, check_against, read_scales

# The one seal.* key of this route (it belongs beside the others in constants.GGUFKeys): the sha256
# of the GGUF the scales were folded into, which says that fold-gguf made the file, and from what.
COPY_BLOCK = 16 << 20
def _ggml_types(*names: str) -> frozenset[GGMLQuantizationType]:
    return frozenset(GGMLQuantizationType[name] for name in names)


# Written by gguf.quants (bit-exact with llama.cpp's reference quantizers for these types).
GGUF_PY_TYPES = _ggml_types("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Requantized by llama.cpp's quantizer (gguf.quants can only dequantize them).
LLAMA_CPP_TYPES = _ggml_types("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S")
# llama.cpp quantizes these only with an importance matrix ("the result will be garbage"):
# tensor_requires_imatrix in llama-quant.cpp, which adds Q2_K in a Q2_K_S file.
NEEDS_IMATRIX = _ggml_types("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")


@dataclass(frozen=True)
class Target:
    """One blk.N.attn_output.weight tensor of the input."""

    layer: int
    name: str
    qtype: GGMLQuantizationType
    rows: int  # ne1: the hidden size
    columns: int  # ne0: head_count * head_dim, the heads' outputs
    start: int  # absolute offset of its data in the file
    n_bytes: int


@dataclass(frozen=True)
class FoldGGUFResult:
    out_path: Path
    layers: int
    types: tuple[str, ...]  # the attn_output tensors' types, e.g. ("Q4_1",)
    requantized: tuple[str, ...]  # those requantized by llama.cpp's quantizer (lossy)
    max_abs_weight: float
    warnings: tuple[str, ...] = ()


# -- reading the input (the header: seal_gguf.gguffile.header) --

def _count(header: GGUFHeader, key: str, path: Path) -> int | None:
    """A positive integer key (a per-layer array only if every layer agrees); None if absent."""
    value = header.kv[key].value if key in header.kv else None
    if isinstance(value, list) and value:
        if len(set(value)) != 1:
            raise InputError(f"{path}: {key} differs between layers ({value}); fold-gguf needs one value")
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{path}: {key} is {value!r}, expected a positive integer")
    return value


def check_not_folded_gguf(header: GGUFHeader, path: Path, force: bool) -> None:
    """Refuse a GGUF that already carries folded scales (from fold-and-convert or fold-gguf)."""
    if GGUFKeys.SCALES_SHA256 in header.kv and not force:
        granularity = header.kv[GGUFKeys.GRANULARITY].value if GGUFKeys.GRANULARITY in header.kv else None
        raise AlreadyFoldedError(
            f"{path} already has SEAL scales folded in ({granularity}, scales sha256 "
            f"{str(header.kv[GGUFKeys.SCALES_SHA256].value)[:12]}...); fold into the original GGUF, or use --force")


def gguf_layout(header: GGUFHeader, path: Path, model_type: str) -> ModelLayout:
    """The head layout a scales file must match, from the GGUF's own metadata.

    model_type (the scales file's) picks among the model types that convert to this GGUF
    architecture (a "llama" GGUF may come from llama or mistral); otherwise the first one.
    """
    entry = header.kv.get(Keys.General.ARCHITECTURE)
    arch = "" if entry is None else str(entry.value)
    candidates = [name for name, spec in arch_specs().items() if arch in spec.gguf_architectures]
    if not candidates:
        known = sorted({a for spec in arch_specs().values() for a in spec.gguf_architectures})
        raise ArchitectureError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(known)}")
    if (_count(header, Keys.Split.LLM_KV_SPLIT_COUNT, path) or 1) > 1:
        raise InputError(f"{path}: one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
    model = model_type if model_type in candidates else candidates[0]
    spec = arch_specs()[model].gguf  # the GGUF-side names, from architectures.json

    def count(what: str) -> int | None:
        return _count(header, spec.key(what, arch), path)

    layers, heads = count("num_layers"), count("num_heads")
    if layers is None or heads is None:
        raise InputError(f"{path}: lacks {spec.key('num_layers', arch)} or {spec.key('num_heads', arch)}")
    head_dim = count("head_dim")
    if head_dim is None:
        hidden = count("hidden_size")
        if hidden is None or hidden % heads:
            raise InputError(f"{path}: has no {spec.key('head_dim', arch)}, and {spec.key('hidden_size', arch)} "
                             f"{hidden} is not a multiple of the {heads} heads")
        head_dim = hidden // heads
    template = spec.o_proj.removesuffix(".weight")
    return ModelLayout(model, layers, heads, head_dim, template, spec.architectures, spec.o_proj)


def attn_output_targets(header: GGUFHeader, layout: ModelLayout, path: Path) -> list[Target]:
    """Every layer's attn_output tensor, checked to fit the layout and to be of a type fold-gguf can write."""
    file_type = header.kv.get(Keys.General.FILE_TYPE)
    q2_k_s = file_type is not None and file_type.value == LlamaFileType.MOSTLY_Q2_K_S
    targets = []
    for layer in range(layout.num_layers):
        name = layout.o_proj_weight(layer)
        info = header.tensors.get(name)
        if info is None:
            raise InputError(f"{path}: has no tensor {name} (block_count is {layout.num_layers})")
        if len(info.dims) != 2 or info.dims[0] != layout.attn_width:
            raise InputError(f"{path}: {name} has shape {list(info.dims)}, expected [{layout.attn_width}, *]: "
                             f"{layout.num_heads} heads x {layout.head_dim} (from the GGUF's metadata)")
        try:
            qtype = GGMLQuantizationType(info.raw_type)
        except ValueError:
            raise InputError(f"{path}: {name} has ggml type {info.raw_type}, unknown to the gguf package") from None
        if qtype in NEEDS_IMATRIX or (qtype == GGMLQuantizationType.Q2_K and q2_k_s):
            raise InputError(
                f"{path}: {name} is {qtype.name}, which llama.cpp requantizes only with an importance matrix; "
                "fold-and-convert the HF model, or fold-gguf an f16 GGUF and quantize it with "
                "`seal-gguf quantize ... --imatrix FILE`")
        if qtype not in GGUF_PY_TYPES | LLAMA_CPP_TYPES:
            supported = ", ".join(sorted(t.name for t in GGUF_PY_TYPES | LLAMA_CPP_TYPES))
            raise InputError(f"{path}: {name} is stored as {qtype.name}, which fold-gguf cannot rewrite "
                             f"(it handles {supported}); fold-and-convert the HF model instead")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if info.dims[0] % block:
            raise InputError(f"{path}: {name} has rows of {info.dims[0]}, not whole {qtype.name} blocks of {block}")
        n_bytes = info.dims[0] // block * type_size * info.dims[1]
        targets.append(Target(layer, name, qtype, info.dims[1], info.dims[0], header.data_offset + info.offset,
                              n_bytes))
    return targets


# -- folding one tensor --

def llama_cpp_quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """values [rows, n] in qtype by llama.cpp's quantizer (ggml_quantize_chunk, no importance matrix)."""
    try:
        from llama_cpp._ggml import libggml
    except (ImportError, OSError) as exc:
        raise EngineError(f"llama-cpp-python is needed to requantize {qtype.name} tensors ({exc})") from None
    quantize_chunk = libggml.ggml_quantize_chunk
    quantize_chunk.restype = ctypes.c_size_t
    quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_void_p]
    src = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = src.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty((rows, n_per_row // block * type_size), dtype=np.uint8)
    step = -(-rows // (os.cpu_count() or 1))

    def rows_from(first: int) -> int:  # ctypes releases the GIL: slabs of rows run in parallel
        n = min(step, rows - first)
        return int(quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, first * n_per_row, n, n_per_row,
                                  None))

    with ThreadPoolExecutor() as pool:
        written = sum(pool.map(rows_from, range(0, rows, step)))
    if written != out.nbytes:
        raise EngineError(f"llama.cpp's quantizer wrote {written} bytes of {qtype.name}, expected {out.nbytes}")
    return out


def fold_tensor(raw: bytes, target: Target, columns: np.ndarray) -> tuple[bytes, float]:
    """The tensor's bytes with input column j times columns[j], in its own type; and max |folded weight|."""
    weights = dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(target.rows, -1), target.qtype)
    folded = weights * columns.astype(np.float32)[None, :]
    peak = float(np.abs(folded).max()) if folded.size else 0.0
    if not np.isfinite(peak):
        raise ScalesError(f"{target.name}: folding produced non-finite weights")
    # f16 weights, and the fp16 block scales of every quantized type, hold at most F16_MAX
    if target.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.BF16) and peak > F16_MAX:
        raise ScalesError(f"{target.name}: folded weights reach |w| = {peak:.6g}, beyond float16's range "
                          f"({F16_MAX:g}) that {target.qtype.name} stores; fold into an f32 or bf16 GGUF")
    packed = quantize(folded, target.qtype) if target.qtype in GGUF_PY_TYPES else llama_cpp_quantize(folded,
                                                                                                     target.qtype)
    data = np.ascontiguousarray(packed).tobytes()
    if len(data) != target.n_bytes:
        raise EngineError(f"{target.name}: {target.qtype.name} came back as {len(data)} bytes, not {target.n_bytes}")
    return data, peak


# -- writing the output --

def kv_pair(key: str, value: str | int) -> bytes:
    """One GGUF KV pair: a string, or an int stored as uint32 (as the converter patch writes seal.*)."""
    name = key.encode("utf-8")
    out = struct.pack("<Q", len(name)) + name
    if isinstance(value, str):
        data = value.encode("utf-8")
        return out + struct.pack("<IQ", GGUFValueType.STRING, len(data)) + data
    return out + struct.pack("<II", GGUFValueType.UINT32, value)


def seal_pairs(scales: SealScales, layout: ModelLayout, source_sha256: str) -> list[bytes]:
    """The seal.* keys of the converter patch (the training recipe included), with the same meaning,
    and the source GGUF's sha256."""
    return [
        kv_pair(GGUFKeys.FORMAT, scales.metadata[ScalesMeta.FORMAT]),
        kv_pair(GGUFKeys.GRANULARITY, scales.granularity),
        kv_pair(GGUFKeys.SCALES_SHA256, scales.sha256 or ""),
        kv_pair(GGUFKeys.NUM_LAYERS, layout.num_layers),
        kv_pair(GGUFKeys.NUM_HEADS, layout.num_heads),
        kv_pair(GGUFKeys.HEAD_DIM, layout.head_dim),
        kv_pair(GGUFKeys.VERSION, __version__),
        kv_pair(GGUFKeys.SOURCE_GGUF_SHA256, source_sha256),
        *(kv_pair(GGUF_SEAL_PREFIX + key, scales.metadata[key]) for key in GGUF_RECIPE_KEYS
          if scales.metadata.get(key)),
    ]


def output_header(header: GGUFHeader, raw: bytes, seal: list[bytes]) -> bytes:
    """The input's header (raw: its bytes) with its KV pairs and tensor infos byte for byte, any old
    seal.* pairs replaced by `seal`, padded to the file's alignment (tensor offsets count from there)."""
    kept = [raw[e.start:e.end] for key, e in header.kv.items() if not key.startswith(GGUF_SEAL_PREFIX)]
    infos = [raw[e.start:e.end] for e in header.tensors.values()]
    magic, version = struct.unpack_from("<4sI", raw, 0)
    out = FIXED_HEADER.pack(magic, version, len(infos), len(kept) + len(seal))
    out += b"".join(kept) + b"".join(seal) + b"".join(infos)
    return out + bytes(-len(out) % header.alignment)


def _copy(src: BinaryIO, dst: BinaryIO, length: int, digest: Any, bar: tqdm) -> None:
    while length > 0:
        block = src.read(min(length, COPY_BLOCK))
        if not block:
            raise InputError(f"{src.name}: ends before its last tensor; the file is truncated")
        digest.update(block)
        dst.write(block)
        length -= len(block)
        bar.update(len(block))


def write_folded(path: Path, raw_header: bytes, out: Path, targets: list[Target],
                 fold: Callable[[bytes, Target], bytes], header: Callable[[str], bytes], progress: bool) -> None:
    """Stream path's data section into out behind the new header, each target's bytes replaced by
    fold(raw, target). header(sha256) is written first with a placeholder, and again at the end
    with the sha256 of the whole input, hashed on the way."""
    digest = hashlib.sha256(raw_header)
    placeholder = header("0" * digest.digest_size * 2)
    size = path.stat().st_size
    with open(path, "rb") as src, open(out, "wb") as dst, \
            tqdm(total=size - len(raw_header), unit="B", unit_scale=True, desc="fold-gguf",
                 disable=not progress) as bar:
        dst.write(placeholder)
        src.seek(len(raw_header))
        for target in sorted(targets, key=lambda t: t.start):
            if target.start < src.tell():
                raise InputError(f"{path}: {target.name} overlaps another tensor; the file is corrupt")
            _copy(src, dst, target.start - src.tell(), digest, bar)
            data = src.read(target.n_bytes)
            if len(data) != target.n_bytes:
                raise InputError(f"{path}: ends inside {target.name}; the file is truncated")
            digest.update(data)
            dst.write(fold(data, target))
            bar.update(len(data))
        _copy(src, dst, size - src.tell(), digest, bar)
        final = header(digest.hexdigest())
        if len(final) != len(placeholder):  # cannot happen: the sha256 has a fixed width
            raise RuntimeError("the header changed length")
        dst.seek(0)
        dst.write(final)


def fold_gguf(in_path: Path, scales_path: Path, out_path: Path, force: bool = False,
              progress: bool = True) -> FoldGGUFResult:
    """Write a copy of the GGUF in_path to out_path (atomically) with the scales folded into attn_output.

    Every blk.N.attn_output.weight (ne0 = heads·head_dim input columns, HF order) has column j
    multiplied by the scale of column j; f32/f16/bf16 exactly, legacy quants requantized by gguf-py,
    K / IQ types by llama.cpp's quantizer (lossy; see the module docstring). The seal.* keys record
    the scales and the source GGUF's sha256. Raises InputError (not a GGUF, split part, truncated),
    ArchitectureError (an architecture or layout seal-gguf cannot fold), ScalesError (scales that do
    not fit, or from another checkpoint on an F32 GGUF unless force), AlreadyFoldedError (the GGUF
    already carries scales, unless force), OutputExistsError, EngineError (llama.cpp's quantizer)."""
    in_path, scales_path, out_path = Path(in_path), Path(scales_path), Path(out_path)
    header, raw_header = read_gguf_header(require_gguf(in_path))
    check_not_folded_gguf(header, in_path, force)
    scales = read_scales(scales_path)
    check_output_path(out_path, force, inputs=[in_path, scales_path])
    layout = gguf_layout(header, in_path, scales.model_type)
    check_against(scales, layout, str(scales_path))
    targets = attn_output_targets(header, layout, in_path)
    warning = check_gguf_fingerprint(in_path, targets[0], scales, scales_path, force)

    peak = 0.0

    def fold(data: bytes, target: Target) -> bytes:
        nonlocal peak
        folded, tensor_peak = fold_tensor(data, target, scales.columns(target.layer, layout.head_dim).numpy())
        peak = max(peak, tensor_peak)
        return folded

    def new_header(sha256: str) -> bytes:
        return output_header(header, raw_header, seal_pairs(scales, layout, sha256))

    with atomic_file(out_path, force=force) as tmp:
        write_folded(in_path, raw_header, tmp, targets, fold, new_header, progress)
    types = sorted({t.qtype for t in targets})
    return FoldGGUFResult(out_path, layout.num_layers, tuple(t.name for t in types),
                          tuple(t.name for t in types if t in LLAMA_CPP_TYPES), peak, (warning,) if warning else ())


def check_gguf_fingerprint(path: Path, target: Target, scales: SealScales, scales_path: Path,
                           force: bool) -> str | None:
    """The scales' base_fingerprint against layer 0's attn_output, where a float GGUF lets it be
    compared: an F32 GGUF holds any checkpoint's weights exactly (a mismatch is another model: refused
    without --force); an F16 or BF16 one may be a rounded copy of an f32 checkpoint (a mismatch is a
    warning); quantized weights cannot be compared."""
    import torch

    if target.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return None
    with open(path, "rb") as f:
        f.seek(target.start)
        raw = f.read(target.n_bytes)
    weight = dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(target.rows, -1), target.qtype)
    return check_base_fingerprint(scales.metadata.get(ScalesMeta.BASE_FINGERPRINT), torch.from_numpy(np.array(weight)),
                                  scales_path, path, force, certain=target.qtype == GGMLQuantizationType.F32)
