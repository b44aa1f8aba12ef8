"""Reading HF safetensors checkpoints lazily: shard discovery, raw headers, single tensors.

Pickled checkpoints (pytorch_model.bin) are never loaded: unpickling can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seal_gguf.constants import CONFIG_FOLD_KEY
from seal_gguf.errors import AlreadyFoldedError, InputError
from seal_gguf.model.architectures import ModelLayout

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# bits per element of every safetensors dtype, to check that offsets fit shapes
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
INDEX_NAME = "model.safetensors.index.json"
# Files that hold weights in another format: never copied next to folded safetensors.
FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    header_bytes: bytes  # the 8-byte length and the JSON header, exactly as stored
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model folder, in index order when there is an index."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("pytorch_model*.bin")) or any(model_dir.glob("*.pt")):
        raise InputError(
            f"{model_dir}: holds only pickled weights (.bin/.pt), which seal-gguf does not load because "
            "unpickling can run code; save the model with safetensors first"
        )
    raise InputError(f"{model_dir}: no *.safetensors weights found")


def read_header(path: Path) -> ShardHeader:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8 or n > 100 << 20:
                raise InputError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
            header_json = f.read(n)
        header: dict[str, Any] = json.loads(header_json)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape: Python's JSON only
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                metadata = dict(info or {})
                continue
            begin, end = info["data_offsets"]
            entry = TensorEntry(name, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end)
            if not all(type(d) is int and d >= 0 for d in (begin, end, *entry.shape)):
                raise ValueError(f"tensor {name}: offsets and shape must be non-negative integers")
            if entry.end > size or entry.begin > entry.end:
                raise InputError(f"{path}: truncated: tensor {name} lies past the end of the file")
            tensors[name] = entry
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: corrupt safetensors header ({exc})") from None
    # the layout the format requires (safetensors refuses anything else): each tensor as many bytes as
    # its shape and dtype take, back to back from the end of the header to the end of the file
    pos = data_start
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.dtype not in DTYPE_BITS:
            raise InputError(f"{path}: corrupt safetensors header (tensor {entry.name} has unknown dtype {entry.dtype!r})")
        if entry.begin != pos or (entry.end - entry.begin) * 8 != DTYPE_BITS[entry.dtype] * math.prod(entry.shape):
            raise InputError(f"{path}: corrupt safetensors header (the offsets of tensor {entry.name} do not "
                             "fit its shape and dtype, or overlap another tensor)")
        pos = entry.end
    if pos != size:
        raise InputError(f"{path}: corrupt safetensors file ({size - pos} bytes after its last tensor)")
    return ShardHeader(path, raw_len + header_json, tensors, metadata)


def read_headers(model_dir: Path) -> list[ShardHeader]:
    """Every shard's header, each checked to lie within its file: truncated or corrupt weights get
    an error naming the shard before transformers loads them (its safetensors errors name none)."""
    return [read_header(p) for p in weight_files(model_dir)]


def tensor_from_bytes(data: bytes, entry: TensorEntry) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES.get(entry.dtype)
    if dtype is None:
        raise InputError(
            f"tensor {entry.name} is stored as {entry.dtype}; only F32, F16 and BF16 checkpoints can be folded"
        )
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry.shape)


def read_tensor(entry: TensorEntry, path: Path) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(entry.begin)
        return tensor_from_bytes(f.read(entry.end - entry.begin), entry)


def locate_o_proj(headers: list[ShardHeader], layout: ModelLayout) -> dict[int, tuple[ShardHeader, TensorEntry]]:
    """Where each layer's o_proj weight is stored; checks that all exist with the right width."""
    found: dict[int, tuple[ShardHeader, TensorEntry]] = {}
    by_name = {name: (h, e) for h in headers for name, e in h.tensors.items()}
    where = headers[0].path.parent if headers else "the checkpoint"
    for layer in range(layout.num_layers):
        name = layout.o_proj_weight(layer)
        if name not in by_name:
            raise InputError(f"{where}: the weights lack {name}, which config.json's {layout.num_layers} layers "
                             f"need; is the checkpoint complete, and config.json its own?")
        header, entry = by_name[name]
        if len(entry.shape) != 2 or entry.shape[1] != layout.attn_width:
            raise InputError(
                f"{header.path}: {name} has shape {list(entry.shape)}, config.json implies [*, {layout.attn_width}] "
                f"({layout.num_heads} heads x {layout.head_dim})"
            )
        found[layer] = (header, entry)
    return found


def model_fingerprint(model_dir: Path, layout: ModelLayout) -> str:
    """A short id of the weights: sha256 of layer 0's o_proj as stored."""
    headers = [read_header(p) for p in weight_files(model_dir)]
    header, entry = locate_o_proj(headers, layout)[0]
    with open(header.path, "rb") as f:
        f.seek(entry.begin)
        return hashlib.sha256(f.read(entry.end - entry.begin)).hexdigest()[:16]


def check_not_folded(config: dict[str, Any], where: str, force: bool,
                     remedy: str = "fold into the original model, or use --force") -> None:
    if CONFIG_FOLD_KEY in config and not force:
        record = config[CONFIG_FOLD_KEY]
        raise AlreadyFoldedError(
            f"{where} already has SEAL scales folded in ({record.get('granularity')}, scales sha256 "
            f"{str(record.get('scales_sha256'))[:12]}...); {remedy}"
        )


