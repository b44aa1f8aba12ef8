"""The GGUF header, read with struct: every KV pair and tensor info, with its byte range; and the
bytes of a KV pair or tensor info to write (fold-gguf, split parts).

The one metadata reader of seal-gguf (inspect, card, Ollama, serve, RoPE checks, import, validate,
fold-gguf). gguf-py's GGUFReader makes a numpy view of every vocabulary entry: 10-40 s for
SmolLM2's 49K tokens and merges on two busy cores. This walks the same layout (GGUF versions 2 and
3, little-endian; gguf-py's constants) and keeps each entry's byte range and value; arrays of
strings are kept only when short (tags, languages), the vocabulary is read on demand.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    SHARD_NAME_FORMAT,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from seal_gguf.errors import InputError
from seal_gguf.fileio import GGUF_MAGIC

# Arrays of strings up to this long are read with the header (tags, languages); longer ones (the
# vocabulary, merges) only on demand, by string_array.
SHORT_STRING_ARRAY = 64
# magic, version, tensor count, KV count
FIXED_HEADER = struct.Struct("<4sIQQ")
GGUF_VERSIONS = (2, 3)  # version 1 stored lengths as uint32
# NAME-00001-of-00003.gguf: part 1 of 3 of a split GGUF (gguf-py's SHARD_NAME_FORMAT, llama.cpp's llama_split_path)
PART_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# GGUF scalar types -> struct formats (little-endian)
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class Entry:
    """A KV pair or a tensor info: where its bytes are in the file, and what it holds."""

    start: int
    end: int
    value: Any = None  # a KV pair's value (None for an array of more than SHORT_STRING_ARRAY strings)
    dims: tuple[int, ...] = ()  # a tensor's shape, ne0 (the row length) first
    raw_type: int = -1  # a tensor's ggml type
    offset: int = 0  # a tensor's data offset, from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    kv: dict[str, Entry]  # in file order
    tensors: dict[str, Entry]  # tensor infos, in file order
    data_offset: int  # where the data section starts (aligned)
    alignment: int


def _string(buf: Any, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise ValueError("a string runs past the end of the file")
    return buf[pos + 8:end].decode("utf-8"), end


def _value_at(buf: Any, pos: int, vtype: int) -> tuple[Any, int]:
    """The value of GGUF type vtype at pos, and the position after it."""
    if vtype == GGUFValueType.STRING:
        return _string(buf, pos)
    if vtype in SCALAR_FORMATS:
        fmt = "<" + SCALAR_FORMATS[GGUFValueType(vtype)]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype != GGUFValueType.ARRAY:
        raise ValueError(f"unknown value type {vtype}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in SCALAR_FORMATS:
        fmt = f"<{count}{SCALAR_FORMATS[GGUFValueType(item_type)]}"
        return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
    if item_type == GGUFValueType.STRING and count <= SHORT_STRING_ARRAY:
        items = []
        for _ in range(count):
            item, pos = _string(buf, pos)
            items.append(item)
        return items, pos
    for _ in range(count):  # long string arrays, or arrays of arrays: only their extent is needed
        if item_type == GGUFValueType.STRING:
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            pos = _value_at(buf, pos, item_type)[1]
    return None, pos


def parse_header(buf: Any) -> GGUFHeader:
    """The header of a little-endian GGUF, version 2 or 3, in buf (bytes or a memory map)."""
    magic, version, n_tensors, n_kv = FIXED_HEADER.unpack_from(buf, 0)
    if magic != GGUF_MAGIC:
        raise ValueError(f"it starts with {magic!r}, not {GGUF_MAGIC!r}")
    if version not in GGUF_VERSIONS:
        raise ValueError(f"version field {version}: seal-gguf reads little-endian GGUF versions 2 and 3")
    pos = FIXED_HEADER.size
    kv: dict[str, Entry] = {}
    for _ in range(n_kv):
        start = pos
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        value, pos = _value_at(buf, pos + 4, vtype)
        if key in kv:
            raise ValueError(f"the key {key} appears twice")
        kv[key] = Entry(start, pos, value)
    tensors: dict[str, Entry] = {}
    for _ in range(n_tensors):
        start = pos
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        raw_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        if name in tensors:
            raise ValueError(f"the tensor {name} appears twice")
        tensors[name] = Entry(start, pos, dims=dims, raw_type=raw_type, offset=offset)
    entry = kv.get(Keys.General.ALIGNMENT)
    alignment = GGUF_DEFAULT_ALIGNMENT if entry is None else entry.value
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment!r}, not a power of two")
    data_offset = pos + -pos % alignment
    for name, info in tensors.items():  # a truncated file: a tensor's data runs past its end
        end = data_offset + info.offset + tensor_bytes(info)
        if end > len(buf):
            raise ValueError(f"the data of {name} ends at byte {end:,}, the file at {len(buf):,} (truncated?)")
    return GGUFHeader(kv, tensors, data_offset, alignment)


def tensor_bytes(info: Entry) -> int:
    """The size of a tensor's data: its element count in blocks of its ggml type (gguf-py's table)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.raw_type)]
    except ValueError:
        raise ValueError(f"unknown ggml type {info.raw_type}") from None
    count = math.prod(info.dims)
    if count % block:
        raise ValueError(f"{count} elements do not fill blocks of {block} (ggml type {info.raw_type})")
    return count // block * size


def read_gguf_header(path: Path) -> tuple[GGUFHeader, bytes]:
    """The header of the GGUF at path, and its bytes up to the data section."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = parse_header(buf)
            return header, buf[:header.data_offset]
    except struct.error:  # a read past the end: the file stops inside its header
        raise InputError(f"{path}: not a readable GGUF file (it ends at byte {Path(path).stat().st_size:,}, "
                         "inside its header: truncated?)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def split_position(header: GGUFHeader) -> tuple[int, int]:
    """(part number from 1, part count) of a GGUF written as llama.cpp's split parts (split.no, split.count);
    (1, 1) for a plain GGUF."""
    def number(key: str) -> int | None:
        entry = header.kv.get(key)
        return entry.value if entry is not None and isinstance(entry.value, int) else None

    count = number(Keys.Split.LLM_KV_SPLIT_COUNT) or 1
    return (number(Keys.Split.LLM_KV_SPLIT_NO) or 0) + 1 if count > 1 else 1, count


def split_stem(path: Path) -> str:
    """NAME in the part names NAME-0000k-of-0000N.gguf of a GGUF named `path` (a part's name gives its own)."""
    return PART_NAME.sub("", path.name).removesuffix(".gguf")


def part_paths(path: Path, count: int) -> list[Path]:
    """The files of a GGUF named `path` written in `count` parts: [path] for one, else
    NAME-00001-of-0000N.gguf ... (a path that is already a part's name gives its own NAME)."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(SHARD_NAME_FORMAT.format(split_stem(path), k, count)) for k in range(1, count + 1)]


def read_model_header(path: Path) -> tuple[GGUFHeader, bytes]:
    """read_gguf_header of a GGUF given as a model. Raises InputError for a split GGUF's part other than
    the first: the model's metadata is in the first part, and llama.cpp loads a split GGUF only from there."""
    header, raw = read_gguf_header(path)
    number, count = split_position(header)
    if number != 1:
        if PART_NAME.search(Path(path).name) is None:  # renamed: the first part's name cannot be told
            raise InputError(f"{path}: part {number} of {count} of a split GGUF, renamed; give the first part, "
                             f"with the parts named NAME-00001-of-{count:05d}.gguf ... as llama.cpp finds them")
        raise InputError(f"{path}: part {number} of {count} of a split GGUF; give the first part, "
                         f"{part_paths(Path(path), count)[0].name}")
    return header, raw


def read_metadata(path: Path) -> dict[str, Any]:
    """{key: value} of the GGUF's KV pairs: scalars, numeric arrays and short string arrays
    (long string arrays, such as the vocabulary, are left out: see string_array). Raises InputError
    (read_model_header) for a split GGUF's later part."""
    header, _ = read_model_header(path)
    return {key: entry.value for key, entry in header.kv.items() if entry.value is not None}


def kv_pair(key: str, value: str | int, vtype: GGUFValueType | None = None) -> bytes:
    """One GGUF KV pair: a string, or an int stored as vtype (a scalar type; uint32 unless given, as
    the converter patch writes seal.*)."""
    name = key.encode("utf-8")
    out = struct.pack("<Q", len(name)) + name
    if isinstance(value, str):
        data = value.encode("utf-8")
        return out + struct.pack("<IQ", GGUFValueType.STRING, len(data)) + data
    vtype = GGUFValueType.UINT32 if vtype is None else vtype
    return out + struct.pack("<I" + SCALAR_FORMATS[vtype], vtype, value)


def tensor_info(name: str, info: Entry, offset: int) -> bytes:
    """The tensor info of `info` (its shape and type) with its data at `offset` in the data section."""
    data = name.encode("utf-8")
    return (struct.pack("<Q", len(data)) + data + struct.pack(f"<I{len(info.dims)}Q", len(info.dims), *info.dims)
            + struct.pack("<IQ", info.raw_type, offset))


def string_array(raw: bytes, entry: Entry) -> list[str]:
    """The strings of the array KV pair `entry` (e.g. tokenizer.ggml.tokens) in the header bytes `raw`."""
    (key_len,) = struct.unpack_from("<Q", raw, entry.start)
    pos = entry.start + 8 + key_len + 4  # the key, then the value type (array)
    item_type, count = struct.unpack_from("<IQ", raw, pos)
    if item_type != GGUFValueType.STRING:
        raise ValueError(f"the array at byte {entry.start} holds type {item_type}, not strings")
    pos += 12
    out = []
    for _ in range(count):
        (length,) = struct.unpack_from("<Q", raw, pos)
        out.append(bytes(raw[pos + 8:pos + 8 + length]).decode("utf-8", errors="replace"))
        pos += 8 + length
    return out
