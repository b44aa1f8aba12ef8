"""Reading HF safetensors checkpoints lazily: shard discovery, raw headers, single tensors.

Pickled checkpoints (pytorch_model.bin) are never loaded: unpickling can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seal_gguf.constants import CONFIG_FOLD_KEY
from seal_gguf.errors import AlreadyFoldedError, InputError, ScalesError
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


# Weights in other formats that loaders (transformers, llama.cpp's converter) may pick up instead of,
# or beside, the safetensors: a folder that holds them besides safetensors is two models.
OTHER_FORMAT_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "model*.pt", "model*.pth",
                         "consolidated*.pth", "consolidated*.safetensors", "tf_model*.h5", "flax_model*.msgpack",
                         "model.ckpt*")
# What download tools leave for a file still on its way (huggingface_hub, browsers, wget/curl, aria2).
PARTIAL_DOWNLOAD_SUFFIXES = (".incomplete", ".part", ".crdownload", ".partial", ".tmp", ".download", ".aria2")
# transformers' and llama.cpp's name for part k of n of a sharded checkpoint.
PART_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model folder, in index order when there is an index.

    The folder must hold one unambiguous model, the one every loader reads: with an index, exactly the
    shards it lists; without one, exactly one safetensors file; no weights in another format beside
    them, and no file still being downloaded. Anything else is refused, naming the files."""
    model_dir = Path(model_dir)
    partial = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(PARTIAL_DOWNLOAD_SUFFIXES)
                     and ("safetensors" in p.name or p.name.endswith(".incomplete"))) if model_dir.is_dir() else []
    # `huggingface-cli download --local-dir` keeps a file on its way in .cache/huggingface/download/
    partial += sorted(str(p.relative_to(model_dir)) for p in model_dir.glob(".cache/huggingface/download/**/*.incomplete"))
    if partial:
        raise InputError(f"{model_dir}: holds partial downloads ({', '.join(partial)}); finish the download "
                         "(or remove them) first")
    index = model_dir / INDEX_NAME
    present = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
            if not names or not all(isinstance(n, str) and isinstance(k, str) for k, n in weight_map.items()):
                raise ValueError("an empty or malformed weight_map")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index}: not a valid safetensors index ({exc})") from None
        if any(Path(n).name != n for n in names):
            raise InputError(f"{index}: lists shards outside the folder ({', '.join(n for n in names if Path(n).name != n)})")
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        extra = [p.name for p in present if p.name not in set(names)]
        if extra:
            raise InputError(f"{model_dir}: holds {', '.join(extra)} beside the {len(names)} shard(s) that {INDEX_NAME} "
                             "lists: a stale or duplicate copy that some loaders read too; move it out of the folder")
    elif len(present) > 1:
        parts = [PART_NAME.search(p.name) for p in present]
        why = ("the parts of a sharded checkpoint without its index " + INDEX_NAME
               if all(parts) else "several weight files and no index saying which is the model")
        raise InputError(f"{model_dir}: holds {', '.join(p.name for p in present)}: {why}; keep one model per folder")
    elif present and (part := PART_NAME.search(present[0].name)) and part.group(2) != "00001":
        raise InputError(f"{model_dir}: holds only {present[0].name}, part {int(part.group(1))} of "
                         f"{int(part.group(2))} of a sharded checkpoint, and no {INDEX_NAME}; download every part")
    else:
        files = present
    others = sorted({p.name for pattern in OTHER_FORMAT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    if files and others:
        raise InputError(f"{model_dir}: holds weights in another format ({', '.join(others)}) beside the safetensors "
                         f"({files[0].name}{', ...' if len(files) > 1 else ''}); which one a loader reads depends on "
                         "the loader, so keep one format per folder")
    if files:
        return files
    if others or any(model_dir.glob("*.pt")):
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
    model_dir = Path(model_dir)
    headers = [read_header(p) for p in weight_files(model_dir)]
    check_one_model(model_dir, headers)
    return headers


def check_one_model(model_dir: Path, headers: list[ShardHeader]) -> None:
    """Each tensor stored once, and, with an index, in the shard the index names (a stale shard of
    another revision holds other tensors)."""
    seen: dict[str, Path] = {}
    for header in headers:
        for name in header.tensors:
            if name in seen:
                raise InputError(f"{model_dir}: tensor {name} is stored twice ({seen[name].name} and "
                                 f"{header.path.name}); loaders disagree on which copy is the model")
            seen[name] = header.path
    index = Path(model_dir) / INDEX_NAME
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    misplaced = sorted(n for n, shard in weight_map.items() if n in seen and seen[n].name != shard)
    absent = sorted(n for n in weight_map if n not in seen)
    unlisted = sorted(n for n in seen if n not in weight_map)
    for what, names in (("lists tensors that no shard holds", absent),
                        ("puts tensors in another shard than the one that holds them", misplaced),
                        ("does not list tensors that the shards hold", unlisted)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise InputError(f"{index}: {what} ({', '.join(names[:3])}{more}); a shard is stale or from "
                             "another revision: download the checkpoint again")


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
    header, entry = locate_o_proj(read_headers(model_dir), layout)[0]
    with open(header.path, "rb") as f:
        f.seek(entry.begin)
        return hashlib.sha256(f.read(entry.end - entry.begin)).hexdigest()[:16]


def weight_fingerprints(weight: torch.Tensor) -> set[str]:
    """model_fingerprint of this weight as stored in each float type that holds its values exactly: the
    same model saved in another float type (e.g. a bf16 checkpoint upcast to f32, or its f16 GGUF) is
    recognised; only a lossy copy (f32 weights rounded to bf16) is not."""
    out = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cast = weight.to(dtype)
        if torch.equal(cast.float(), weight.float()):
            out.add(hashlib.sha256(cast.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16])
    return out


def check_base_fingerprint(recorded: str | None, weight: torch.Tensor, scales_path: object, where: object,
                           force: bool, certain: bool = True) -> str | None:
    """Compare the base_fingerprint a trained scales file records (ScalesMeta.BASE_FINGERPRINT) with the
    model's layer-0 o_proj weight. A mismatch is refused (ScalesError) unless force, or unless `certain`
    is false (the weight may be a lossy copy of the base): then the message is returned as a warning."""
    if not recorded:
        return None
    found = weight_fingerprints(weight)
    if recorded in found:
        return None
    message = (f"{scales_path} was learned on another checkpoint: its base_fingerprint {recorded} is not the "
               f"fingerprint of {where} (layer 0's o_proj); scales learned on another model of the same shape "
               "fold without error but are not this model's")
    if force or not certain:
        return message + (" (or it is this model rounded to a lower-precision float type)" if not certain else "")
    raise ScalesError(message + "; if it is this model stored in a lower-precision float type, use --force")


def check_not_folded(config: dict[str, Any], where: str, force: bool,
                     remedy: str = "fold into the original model, or use --force") -> None:
    if CONFIG_FOLD_KEY in config and not force:
        record = config[CONFIG_FOLD_KEY]
        raise AlreadyFoldedError(
            f"{where} already has SEAL scales folded in ({record.get('granularity')}, scales sha256 "
            f"{str(record.get('scales_sha256'))[:12]}...); {remedy}"
        )


