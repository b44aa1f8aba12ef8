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
A split GGUF (given by its first part) is folded part by part into the same parts, the seal.* keys
in the first; --split-max-size re-splits the folded model (seal_gguf.gguffile.split).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    Keys,
    LlamaFileType,
)
from gguf.quants import dequantize, quantize
from tqdm import tqdm

from seal_gguf import __version__
from seal_gguf.constants import (
    F16_MAX,
    GGUF_RECIPE_KEYS,
    GGUF_SEAL_PREFIX,
    SCALES_FORMAT,
    GGUFKeys,
    ScalesMeta,
)
from seal_gguf.errors import AlreadyFoldedError, ArchitectureError, EngineError, InputError, ScalesError
from seal_gguf.fileio import atomic_file, check_output_path, require_gguf
from seal_gguf.gguffile.header import FIXED_HEADER, GGUFHeader, kv_pair, read_gguf_header
from seal_gguf.gguffile.split import (
    COPY_BLOCK,
    GGUFPart,
    atomic_outputs,
    check_no_parts,
    copy_range,
    part_paths,
    plan_split,
    read_gguf_parts,
    remove_replaced,
    split_gguf,
)
from seal_gguf.model.architectures import ModelLayout, arch_specs
from seal_gguf.model.checkpoint import check_base_fingerprint
from seal_gguf.scales import SealScales, check_against, read_scales


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

    part: int  # which file of the input holds it (0 unless the input is split)
    layer: int
    name: str
    qtype: GGMLQuantizationType
    rows: int  # ne1: the hidden size
    columns: int  # ne0: head_count * head_dim, the heads' outputs
    start: int  # absolute offset of its data in the file
    n_bytes: int


@dataclass(frozen=True)
class FoldGGUFResult:
    out_path: Path  # the GGUF, or the first of its parts
    layers: int
    types: tuple[str, ...]  # the attn_output tensors' types, e.g. ("Q4_1",)
    requantized: tuple[str, ...]  # those requantized by llama.cpp's quantizer (lossy)
    max_abs_weight: float
    parts: tuple[Path, ...]  # every file written, out_path first
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


def attn_output_targets(parts: list[GGUFPart], layout: ModelLayout, path: Path) -> list[Target]:
    """Every layer's attn_output tensor (in whichever part of the input holds it), checked to fit the
    layout and to be of a type fold-gguf can write."""
    file_type = parts[0].header.kv.get(Keys.General.FILE_TYPE)
    q2_k_s = file_type is not None and file_type.value == LlamaFileType.MOSTLY_Q2_K_S
    where = {name: index for index, part in enumerate(parts) for name in part.header.tensors}
    targets = []
    for layer in range(layout.num_layers):
        name = layout.o_proj_weight(layer)
        part = where.get(name)
        if part is None:
            raise InputError(f"{path}: has no tensor {name} (block_count is {layout.num_layers})")
        info = parts[part].header.tensors[name]
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
        targets.append(Target(part, layer, name, qtype, info.dims[1], info.dims[0],
                              parts[part].header.data_offset + info.offset, n_bytes))
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


def fold_record_pairs(record: dict[str, str], layout: ModelLayout) -> list[bytes]:
    """The seal.* keys of a GGUF converted from a checkpoint folded by `seal-gguf fold` (config.json's
    record, seal_gguf.fold.hf.fold_record): those fold-and-convert writes for the same scales."""
    return [
        kv_pair(GGUFKeys.FORMAT, SCALES_FORMAT),
        kv_pair(GGUFKeys.GRANULARITY, str(record.get("granularity", ""))),
        kv_pair(GGUFKeys.SCALES_SHA256, str(record.get("scales_sha256", ""))),
        kv_pair(GGUFKeys.NUM_LAYERS, layout.num_layers),
        kv_pair(GGUFKeys.NUM_HEADS, layout.num_heads),
        kv_pair(GGUFKeys.HEAD_DIM, layout.head_dim),
        kv_pair(GGUFKeys.VERSION, str(record.get("seal_gguf_version", __version__))),
        *(kv_pair(GGUF_SEAL_PREFIX + key, str(record[key])) for key in GGUF_RECIPE_KEYS if record.get(key)),
    ]


def add_seal_pairs(path: Path, seal: list[bytes]) -> None:
    """Rewrite the GGUF at `path` (a plain GGUF, or a split GGUF's first part, which holds the metadata)
    with `seal` as its seal.* keys; KV pairs, tensor infos and tensor data otherwise byte for byte."""
    header, raw = read_gguf_header(path)
    with atomic_file(path, force=True) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(output_header(header, raw, seal))
        src.seek(header.data_offset)
        shutil.copyfileobj(src, dst, COPY_BLOCK)


def output_header(header: GGUFHeader, raw: bytes, seal: list[bytes]) -> bytes:
    """The input's header (raw: its bytes) with its KV pairs and tensor infos byte for byte, any old
    seal.* pairs replaced by `seal`, padded to the file's alignment (tensor offsets count from there)."""
    kept = [raw[e.start:e.end] for key, e in header.kv.items() if not key.startswith(GGUF_SEAL_PREFIX)]
    infos = [raw[e.start:e.end] for e in header.tensors.values()]
    magic, version = struct.unpack_from("<4sI", raw, 0)
    out = FIXED_HEADER.pack(magic, version, len(infos), len(kept) + len(seal))
    out += b"".join(kept) + b"".join(seal) + b"".join(infos)
    return out + bytes(-len(out) % header.alignment)


def write_folded(parts: list[GGUFPart], outs: list[Path], targets: list[Target],
                 fold: Callable[[bytes, Target], bytes], header: Callable[[str], bytes], progress: bool) -> None:
    """Stream each part's data section into its out behind its header, each target's bytes replaced by
    fold(raw, target). The first out gets header(sha256), written first with a placeholder and again
    at the end with the sha256 of the whole input (its parts in order), hashed on the way; the other
    parts keep their headers."""
    digest = hashlib.sha256()
    placeholder = header("0" * digest.digest_size * 2)
    total = sum(part.path.stat().st_size - len(part.raw) for part in parts)
    with tqdm(total=total, unit="B", unit_scale=True, desc="fold-gguf", disable=not progress) as bar:
        for index, (part, out) in enumerate(zip(parts, outs, strict=True)):
            digest.update(part.raw)
            size = part.path.stat().st_size
            with open(part.path, "rb") as src, open(out, "wb") as dst:
                dst.write(placeholder if index == 0 else part.raw)
                src.seek(len(part.raw))
                for target in sorted((t for t in targets if t.part == index), key=lambda t: t.start):
                    if target.start < src.tell():
                        raise InputError(f"{part.path}: {target.name} overlaps another tensor; the file is corrupt")
                    copy_range(src, dst, target.start - src.tell(), bar, digest)
                    data = src.read(target.n_bytes)
                    if len(data) != target.n_bytes:
                        raise InputError(f"{part.path}: ends inside {target.name}; the file is truncated")
                    digest.update(data)
                    dst.write(fold(data, target))
                    bar.update(len(data))
                copy_range(src, dst, size - src.tell(), bar, digest)
    final = header(digest.hexdigest())
    if len(final) != len(placeholder):  # cannot happen: the sha256 has a fixed width
        raise RuntimeError("the header changed length")
    with open(outs[0], "r+b") as dst:
        dst.write(final)


def fold_gguf(in_path: Path, scales_path: Path, out_path: Path, force: bool = False,
              progress: bool = True, split_max_size: int | None = None) -> FoldGGUFResult:
    """Write a copy of the GGUF in_path to out_path (atomically) with the scales folded into attn_output.

    Every blk.N.attn_output.weight (ne0 = heads·head_dim input columns, HF order) has column j
    multiplied by the scale of column j; f32/f16/bf16 exactly, legacy quants requantized by gguf-py,
    K / IQ types by llama.cpp's quantizer (lossy; see the module docstring). The seal.* keys record
    the scales and the source GGUF's sha256 (of its parts in order, for a split GGUF).
    in_path may be the first part of a split GGUF (NAME-00001-of-0000N.gguf): the output has the same
    parts, named after out_path (OUT-00001-of-0000N.gguf ...). split_max_size (bytes) writes the output
    as parts of at most that much tensor data instead (seal_gguf.gguffile.split). With force, once the
    output is complete, what an earlier run left under out_path's name is removed (remove_replaced).
    Raises InputError (not a GGUF, a split GGUF's part missing or not the first, truncated),
    ArchitectureError (an architecture or layout seal-gguf cannot fold), ScalesError (scales that do not
    fit, or from another checkpoint on an F32 GGUF unless force), AlreadyFoldedError (the GGUF already
    carries scales, unless force), OutputExistsError, EngineError (llama.cpp's quantizer)."""
    in_path, scales_path, out_path = Path(in_path), Path(scales_path), Path(out_path)
    parts = read_gguf_parts(require_gguf(in_path))
    header, raw_header = parts[0].header, parts[0].raw
    check_not_folded_gguf(header, in_path, force)
    scales = read_scales(scales_path)
    plan = None if split_max_size is None else plan_split(parts, split_max_size)  # folding keeps every size
    outs = part_paths(out_path, len(parts) if plan is None else len(plan.groups))
    inputs = [*(part.path for part in parts), scales_path]
    for out in outs:
        check_output_path(out, force, inputs=inputs)
    check_no_parts(out_path, force, inputs)
    layout = gguf_layout(header, in_path, scales.model_type)
    check_against(scales, layout, str(scales_path))
    targets = attn_output_targets(parts, layout, in_path)
    warnings = [w for w in [check_gguf_fingerprint(parts[targets[0].part].path, targets[0], scales, scales_path,
                                                   force)] if w]

    peak = 0.0

    def fold(data: bytes, target: Target) -> bytes:
        nonlocal peak
        folded, tensor_peak = fold_tensor(data, target, scales.columns(target.layer, layout.head_dim).numpy())
        peak = max(peak, tensor_peak)
        return folded

    def new_header(sha256: str) -> bytes:
        return output_header(header, raw_header, seal_pairs(scales, layout, sha256))

    if split_max_size is None or plan is None:
        with atomic_outputs(outs, force=force) as tmps:
            write_folded(parts, tmps, targets, fold, new_header, progress)
    else:  # folded into the input's parts in a temporary folder, then split from there
        with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as folder:
            folded = part_paths(Path(folder) / out_path.name, len(parts))
            write_folded(parts, folded, targets, fold, new_header, progress)
            outs = list(split_gguf(folded[0], out_path, split_max_size, force=force, progress=progress).paths)
        warnings += plan.warnings
    if force:
        remove_replaced(out_path, outs, inputs)
    types = sorted({t.qtype for t in targets})
    return FoldGGUFResult(outs[0], layout.num_layers, tuple(t.name for t in types),
                          tuple(t.name for t in types if t in LLAMA_CPP_TYPES), peak, tuple(outs), tuple(warnings))


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
