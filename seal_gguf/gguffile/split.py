"""Split GGUFs: llama.cpp's parts NAME-00001-of-0000N.gguf ... NAME-0000N-of-0000N.gguf, read and written.

As llama.cpp's gguf-split and convert_hf_to_gguf.py --split-max-size write them and as llama.cpp
loads them from the first part: every part is a GGUF of its own holding a run of the tensors, in
order; the first part holds all the metadata; every part holds split.no (uint16, from 0),
split.count (uint16) and split.tensors.count (int32, the tensors of all parts). A new part starts
where the next tensor would take the current one's tensor data past the size limit, as gguf-py's
GGUFWriter decides; a tensor larger than the limit gets a part of its own (llama.cpp does the same).
A model that fits in one part is written as one plain GGUF named NAME.gguf, as the converter does.

Rewriting copies every KV pair byte for byte and every tensor's data as is, read with seal-gguf's
header reader (gguf-py's GGUFReader takes 10-40 s per file here on the vocabulary alone).
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFValueType, Keys
from tqdm import tqdm

from seal_gguf.errors import InputError, OutputExistsError
from seal_gguf.fileio import atomic_file, check_output_path
from seal_gguf.gguffile.header import (
    FIXED_HEADER,
    PART_NAME,
    GGUFHeader,
    kv_pair,
    part_paths,
    read_gguf_header,
    read_model_header,
    split_position,
    split_stem,
    tensor_bytes,
    tensor_info,
)

# sizes as convert_hf_to_gguf.py reads --split-max-size (gguf-split takes the M and G forms): 1000-based
SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}
MAX_PARTS = 99999  # five digits in the part names
COPY_BLOCK = 16 << 20
SPLIT_PREFIX = "split."


@dataclass(frozen=True)
class GGUFPart:
    """One file of a GGUF: its header, and the header's bytes."""

    path: Path
    header: GGUFHeader
    raw: bytes


@dataclass(frozen=True)
class SplitPlan:
    groups: tuple[tuple[str, ...], ...]  # the tensor names of each part, in order
    warnings: tuple[str, ...]  # tensors larger than the limit; a model that fits in one part


@dataclass(frozen=True)
class SplitResult:
    paths: tuple[Path, ...]  # the parts written, first part first (one path: a plain GGUF)
    warnings: tuple[str, ...]


def parse_split_size(text: str) -> int:
    """Bytes of a size as llama.cpp's tools spell it: 4G, 500M, 100K (1000-based) or a number of bytes.
    Raises InputError for anything else, or for zero."""
    match = SIZE.fullmatch(text.strip())
    if match is None:
        raise InputError(f"split size {text!r}: expected a number of bytes, optionally followed by K, M or G "
                         "(1000-based, as llama.cpp's gguf-split): 4G, 500M")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if size <= 0:
        raise InputError(f"split size {text!r}: must be more than 0 bytes")
    return size


def format_size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def written_files(path: Path) -> tuple[Path, ...]:
    """The files of the GGUF just written whose first file is `path` (gguf_output, split_gguf): all the parts
    when `path` is a first part NAME-00001-of-0000N.gguf and every part is there, else `path` alone. Read from
    the names, as llama.cpp finds parts, not from the headers (their vocabulary takes seconds to walk)."""
    path = Path(path)
    match = PART_NAME.search(path.name)
    if match is None or int(match.group(1)) != 1:
        return (path,)
    parts = part_paths(path, int(match.group(2)))
    return tuple(parts) if all(part.is_file() for part in parts) else (path,)


def _split_value(header: GGUFHeader, key: str) -> int | None:
    entry = header.kv.get(key)
    return entry.value if entry is not None and isinstance(entry.value, int) else None


def read_gguf_parts(path: Path) -> list[GGUFPart]:
    """Every file of the GGUF at path: [path] for a plain GGUF; for the first part of a split GGUF,
    all its parts, found by their names as llama.cpp finds them. Raises InputError (a part other
    than the first, a part missing, parts that disagree: from different splits)."""
    path = Path(path)
    header, raw = read_model_header(path)
    _, count = split_position(header)
    if count <= 1:
        return [GGUFPart(path, header, raw)]
    names = part_paths(path, count)
    if names[0].name != path.name:
        raise InputError(f"{path}: the first of {count} parts of a split GGUF, but not named "
                         f"{names[0].name}, so its other parts cannot be found (llama.cpp finds them by name)")
    parts = [GGUFPart(path, header, raw)]
    seen = {name: 1 for name in header.tensors}
    for number, part_path in enumerate(names[1:], start=2):
        if not part_path.is_file():
            raise InputError(f"{path}: part {number} of {count} of this split GGUF, {part_path.name}, is missing")
        part_header, part_raw = read_gguf_header(part_path)
        says = (_split_value(part_header, Keys.Split.LLM_KV_SPLIT_NO), _split_value(part_header,
                                                                                   Keys.Split.LLM_KV_SPLIT_COUNT))
        if says != (number - 1, count):
            raise InputError(f"{part_path}: says it is part {'?' if says[0] is None else says[0] + 1} of "
                             f"{says[1] or '?'}, expected part {number} of {count}: the parts are from different splits")
        for name in part_header.tensors:
            if name in seen:
                raise InputError(f"{part_path}: holds {name}, which part {seen[name]} holds too: "
                                 "the parts are from different splits")
            seen[name] = number
        parts.append(GGUFPart(part_path, part_header, part_raw))
    expected = _split_value(header, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if expected != len(seen):
        raise InputError(f"{path}: its {count} parts hold {len(seen)} tensors, split.tensors.count says {expected}: "
                         "the parts are from different splits")
    return parts


def plan_split(parts: list[GGUFPart], max_size: int) -> SplitPlan:
    """The tensors of each part when their data is split at max_size bytes (GGUFWriter's rule)."""
    groups: list[list[str]] = [[]]
    used = 0
    oversized: list[tuple[int, str]] = []
    for name, info in ((n, i) for part in parts for n, i in part.header.tensors.items()):
        n_bytes = tensor_bytes(info)
        if n_bytes > max_size:
            oversized.append((n_bytes, name))
        if groups[-1] and used + n_bytes > max_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n_bytes
    if len(groups) > MAX_PARTS:
        raise InputError(f"a split size of {max_size:,} bytes makes {len(groups):,} parts, more than the "
                         f"{MAX_PARTS:,} that part names can number; give a larger size")
    warnings = []
    if oversized:
        largest = ", ".join(f"{name} ({format_size(n)})" for n, name in sorted(oversized, key=lambda t: -t[0])[:3])
        more = f" and {len(oversized) - 3} more" if len(oversized) > 3 else ""
        warnings.append(f"{len(oversized)} tensors are larger than the split size of {format_size(max_size)}, "
                        f"{largest}{more}: each gets a part of its own, larger than that size (as llama.cpp splits)")
    if len(groups) == 1:
        warnings.append(f"the model fits in one part of {format_size(max_size)}: written as one GGUF, not split")
    return SplitPlan(tuple(tuple(g) for g in groups), tuple(warnings))


def copy_range(src: BinaryIO, dst: BinaryIO, length: int, bar: tqdm, digest: Any = None) -> None:
    """Copy length bytes from src to dst in blocks (hashed into digest, if given); raises InputError if
    src ends first."""
    while length > 0:
        block = src.read(min(length, COPY_BLOCK))
        if not block:
            raise InputError(f"{src.name}: ends before its last tensor; the file is truncated")
        if digest is not None:
            digest.update(block)
        dst.write(block)
        length -= len(block)
        bar.update(len(block))


def _part_header(first: GGUFPart, kv: list[bytes], names: tuple[str, ...], where: dict[str, GGUFPart]) -> bytes:
    alignment = first.header.alignment
    infos, offset = [], 0
    for name in names:
        info = where[name].header.tensors[name]
        infos.append(tensor_info(name, info, offset))
        offset += tensor_bytes(info) + -tensor_bytes(info) % alignment
    magic, version = struct.unpack_from("<4sI", first.raw, 0)
    out = FIXED_HEADER.pack(magic, version, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    return out + bytes(-len(out) % alignment)


def write_parts(parts: list[GGUFPart], groups: tuple[tuple[str, ...], ...], outs: list[Path],
                progress: bool, desc: str = "split") -> None:
    """Write the tensors of `parts` grouped as `groups` into the files `outs` (one per group), with
    the first part's metadata (old split.* keys replaced) in the first file."""
    first = parts[0]
    where = {name: part for part in parts for name in part.header.tensors}
    metadata = [first.raw[e.start:e.end] for key, e in first.header.kv.items() if not key.startswith(SPLIT_PREFIX)]
    alignment = first.header.alignment
    total = sum(tensor_bytes(part.header.tensors[n]) for part in parts for n in part.header.tensors)
    with ExitStack() as files, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                    disable=not progress) as bar:
        sources = {part.path: files.enter_context(open(part.path, "rb")) for part in parts}
        for number, (names, out) in enumerate(zip(groups, outs, strict=True)):
            kv = list(metadata) if number == 0 else []
            if number and alignment != GGUF_DEFAULT_ALIGNMENT:  # every part is read with its own alignment
                kv.append(kv_pair(Keys.General.ALIGNMENT, alignment))
            if len(groups) > 1:
                kv += [kv_pair(Keys.Split.LLM_KV_SPLIT_NO, number, GGUFValueType.UINT16),
                       kv_pair(Keys.Split.LLM_KV_SPLIT_COUNT, len(groups), GGUFValueType.UINT16),
                       kv_pair(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(where), GGUFValueType.INT32)]
            with open(out, "wb") as dst:
                dst.write(_part_header(first, kv, names, where))
                for name in names:
                    part = where[name]
                    info = part.header.tensors[name]
                    src = sources[part.path]
                    src.seek(part.header.data_offset + info.offset)
                    copy_range(src, dst, tensor_bytes(info), bar)
                    dst.write(bytes(-tensor_bytes(info) % alignment))


@contextmanager
def atomic_outputs(paths: list[Path], force: bool = False) -> Iterator[list[Path]]:
    """Temporary paths beside `paths`; they become `paths` only when the block succeeds, all at the end
    (an error or Ctrl-C removes every one of them)."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_file(path, force=force)) for path in paths]


def split_gguf(path: Path, out_path: Path, max_size: int, *, force: bool = False,
               progress: bool = True) -> SplitResult:
    """Rewrite the GGUF at path (a plain GGUF, or the first part of a split one) as llama.cpp's split
    parts of out_path's name (NAME-00001-of-0000N.gguf ...), at most max_size bytes of tensor data
    each except for tensors larger than that, written atomically; return the paths written.

    Raises InputError (an unreadable GGUF, parts missing or from different splits, more parts than
    names can number), OutputExistsError (a part exists, unless force)."""
    parts = read_gguf_parts(Path(path))
    plan = plan_split(parts, max_size)
    outs = part_paths(Path(out_path), len(plan.groups))
    for out in outs:
        check_output_path(out, force, inputs=[part.path for part in parts])
    with atomic_outputs(outs, force=force) as tmps:
        write_parts(parts, plan.groups, tmps, progress)
    return SplitResult(tuple(outs), plan.warnings)


@contextmanager
def single_gguf(path: Path, folder: Path, progress: bool = True) -> Iterator[Path]:
    """path itself for a plain GGUF; for the first part of a split GGUF, all its parts merged into one
    temporary GGUF in `folder`, removed when the block ends. Raises InputError as read_gguf_parts."""
    parts = read_gguf_parts(Path(path))
    if len(parts) == 1:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=f".{Path(path).name}.", dir=folder) as tmp:
        merged = Path(tmp) / PART_NAME.sub(".gguf", Path(path).name)
        write_parts(parts, (tuple(n for part in parts for n in part.header.tensors),), [merged], progress,
                    desc="merge parts")
        yield merged


@dataclass
class PendingGGUF:
    """A GGUF being written: write it to `path`; once the block of gguf_output ends without error,
    `written` holds the files it became (one GGUF, or its parts, first part first)."""

    path: Path
    written: tuple[Path, ...] = field(default=())


def _parts_of_name(out_path: Path) -> list[Path]:
    """The files in out_path's folder named as split parts of out_path's GGUF, of any count: exactly
    NAME-0000k-of-0000N.gguf, NAME as part_paths makes it."""
    name = re.compile(re.escape(split_stem(out_path)) + r"-\d{5}-of-\d{5}\.gguf")
    folder = out_path.parent
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if name.fullmatch(path.name) and path.is_file())


def _input_files(inputs: Iterable[Path | None]) -> set[str]:
    """Every file of the inputs, a split input's parts found by their names: what is never replaced."""
    files: set[str] = set()
    for given in (Path(p) for p in inputs if p is not None):
        match = PART_NAME.search(given.name)
        files.update(os.path.realpath(p) for p in part_paths(given, int(match.group(2)) if match else 1))
    return files


def check_no_parts(out_path: Path, force: bool, inputs: Iterable[Path | None] = ()) -> None:
    """Refuse, before any work, split parts of out_path's name left by an earlier run, of any count (their
    count is known only once the GGUF is written). Raises OutputExistsError unless force; the inputs' files
    do not count."""
    out_path = Path(out_path)
    keep = _input_files(inputs)
    found = [p for p in _parts_of_name(out_path) if p != out_path and os.path.realpath(p) not in keep]
    if found and not force:
        raise OutputExistsError(f"{found[0]} exists (a part of an earlier split output); use --force to replace it")


def remove_replaced(out_path: Path, written: Sequence[Path], inputs: Iterable[Path | None] = ()) -> None:
    """Once out_path's GGUF is complete as `written` (--force): remove what an earlier run left under
    out_path's name that it replaces, so that no set of another count, or plain file beside new parts, is
    taken for it: out_path and parts of its name that are not `written`. The inputs' files stay."""
    out_path = Path(out_path)
    keep = _input_files(inputs) | {os.path.realpath(p) for p in written}
    for path in [out_path, *_parts_of_name(out_path)]:
        if path.is_file() and os.path.realpath(path) not in keep:
            path.unlink(missing_ok=True)


@contextmanager
def gguf_output(out_path: Path, split_max_size: int | None = None, *, force: bool = False, progress: bool = True,
                warn: Callable[[str], None] | None = None,
                inputs: Iterable[Path | None] = ()) -> Iterator[PendingGGUF]:
    """Where a GGUF is written before it is kept: a temporary file that becomes out_path (atomic_file), or
    with split_max_size (bytes) a temporary file in a temporary folder beside out_path that is then
    written as llama.cpp's parts of out_path's name (split_gguf; `warn` is told of its warnings). An
    error or Ctrl-C leaves neither. With force, once the output is complete, what an earlier run left under
    out_path's name is removed (remove_replaced; `inputs` are kept). Raises OutputExistsError (out_path or
    a part of its name exists, unless force)."""
    out_path = Path(out_path)
    check_no_parts(out_path, force, inputs)
    if split_max_size is None:
        with atomic_file(out_path, force=force) as tmp:
            pending = PendingGGUF(tmp)
            yield pending
        pending.written = (out_path,)
        warnings: tuple[str, ...] = ()
    else:
        with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent or ".") as folder:
            pending = PendingGGUF(Path(folder) / out_path.name)
            yield pending
            result = split_gguf(pending.path, out_path, split_max_size, force=force, progress=progress)
        pending.written, warnings = result.paths, result.warnings
    if force:
        remove_replaced(out_path, pending.written, inputs)
    if warn is not None:
        for message in warnings:
            warn(message)
