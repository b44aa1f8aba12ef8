"""Fold SEAL scales into an HF checkpoint: column j of every o_proj weight times s[j].

W_o · concat_h(s_h ⊙ o_h) = (W_o · diag(s)) · concat_h(o_h), so the folded model computes
exactly what the hooked one does. Each shard is rewritten by streaming: its header and every
other tensor are copied byte for byte, and only o_proj byte ranges are replaced.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seal_gguf import __version__
from seal_gguf.constants import CONFIG_FOLD_KEY, F16_MAX, GGUF_RECIPE_KEYS, ScalesMeta
from seal_gguf.errors import ScalesError
from seal_gguf.fileio import atomic_dir, check_output_path
from seal_gguf.model.architectures import ModelLayout, layout_from_config, read_config
from seal_gguf.model.checkpoint import (
    FOREIGN_WEIGHT_SUFFIXES,
    ShardHeader,
    TensorEntry,
    check_base_fingerprint,
    check_not_folded,
    locate_o_proj,
    read_headers,
    read_tensor,
    tensor_from_bytes,
)
from seal_gguf.scales import SealScales, load_scales

COPY_BLOCK = 16 << 20


@dataclass(frozen=True)
class FoldResult:
    out_dir: Path
    layers: int
    max_abs_weight: float
    warnings: tuple[str, ...] = ()


def fold_weight(weight: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """o_proj weight [hidden, H*d] with column j multiplied by column_scales[j], in float32."""
    return (weight.float() * column_scales.float()[None, :]).to(weight.dtype)


def fold_record(scales: SealScales) -> dict[str, str]:
    """config.json's record of a fold: the scales' granularity and sha256, and their training recipe
    (constants.GGUF_RECIPE_KEYS), which `convert` writes into the GGUF as fold-and-convert does."""
    return {
        "granularity": scales.granularity,
        "scales_sha256": scales.sha256 or "",
        "seal_gguf_version": __version__,
        **{key: scales.metadata[key] for key in GGUF_RECIPE_KEYS if scales.metadata.get(key)},
    }


def _folded_bytes(raw: bytes, entry: TensorEntry, columns: torch.Tensor) -> tuple[bytes, float]:
    folded = fold_weight(tensor_from_bytes(raw, entry), columns)
    if not torch.isfinite(folded).all():
        if folded.dtype == torch.float16:
            raise ScalesError(
                f"{entry.name}: folded weights leave float16's range (|w| > {F16_MAX:g}); "
                "convert the checkpoint to bfloat16 or float32 first"
            )
        raise ScalesError(f"{entry.name}: folding produced non-finite weights")
    return folded.contiguous().view(torch.uint8).numpy().tobytes(), float(folded.float().abs().max())


def _rewrite_shard(
    header: ShardHeader, out_path: Path, targets: dict[str, torch.Tensor], bar: tqdm
) -> float:
    """Copy one shard, replacing the tensors named in `targets` by their folded bytes."""
    peak = 0.0
    with open(header.path, "rb") as src, open(out_path, "wb") as dst:
        dst.write(header.header_bytes)
        # read_header guarantees the tensors lie back to back after the header; in offset order,
        # an empty tensor comes before the one that starts where it does
        for entry in sorted(header.tensors.values(), key=lambda e: (e.begin, e.end)):
            src.seek(entry.begin)
            if entry.name in targets:
                data, tensor_peak = _folded_bytes(src.read(entry.end - entry.begin), entry, targets[entry.name])
                dst.write(data)
                peak = max(peak, tensor_peak)
            else:
                _copy_range(src, dst, entry.end - entry.begin)
            bar.update(1)
    return peak


def _copy_range(src: Any, dst: Any, length: int) -> None:
    while length > 0:
        block = src.read(min(length, COPY_BLOCK))
        if not block:
            raise OSError("unexpected end of file")
        dst.write(block)
        length -= len(block)


def fold_checkpoint(
    model_dir: Path,
    scales_path: Path,
    out_dir: Path,
    force: bool = False,
    progress: bool = True,
) -> FoldResult:
    """Write a folded copy of the HF checkpoint model_dir to out_dir (atomically); model_dir is only read.

    Column j of every layer's o_proj weight ([hidden, heads·head_dim]) is multiplied by the scale of
    column j (SEAL-H: s[layer, head] repeated over the head's head_dim columns; SEAL-C: s[layer, head,
    channel]) in float32 and stored back in the checkpoint's dtype: W_o·diag(s), the paper's offline
    fold (arXiv 2501.15225; DESIGN.md section 2). Every other tensor is copied byte for byte;
    config.json records the fold (constants.CONFIG_FOLD_KEY). progress: a bar on stderr.
    Raises InputError (bad folder), ScalesError (scales that do not fit, learned on another
    checkpoint unless force, or weights out of the dtype's range), AlreadyFoldedError (model_dir
    already folded, unless force), OutputExistsError (out_dir exists, unless force)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    layout = layout_from_config(config, model_dir / "config.json")
    check_not_folded(config, str(model_dir), force)
    scales = load_scales(scales_path, layout)
    check_output_path(out_dir, force, folder=True, inputs=[model_dir])
    headers = read_headers(model_dir)
    located = locate_o_proj(headers, layout)
    warning = check_base_fingerprint(scales.metadata.get(ScalesMeta.BASE_FINGERPRINT),
                                     read_tensor(located[0][1], located[0][0].path), scales_path, model_dir, force)
    targets: dict[Path, dict[str, torch.Tensor]] = {h.path: {} for h in headers}
    for layer, (header, entry) in located.items():
        targets[header.path][entry.name] = scales.columns(layer, layout.head_dim)

    peak = 0.0
    with atomic_dir(out_dir, force=force) as tmp:
        total = sum(len(h.tensors) for h in headers)
        with tqdm(total=total, unit="tensor", desc="fold", disable=not progress) as bar:
            for header in headers:
                peak = max(peak, _rewrite_shard(header, tmp / header.path.name, targets[header.path], bar))
        _copy_side_files(model_dir, tmp, {h.path.name for h in headers})
        config[CONFIG_FOLD_KEY] = fold_record(scales)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return FoldResult(out_dir, layout.num_layers, peak, (warning,) if warning else ())


def _copy_side_files(model_dir: Path, out: Path, written: set[str]) -> None:
    """Tokenizer, chat template, generation config, index, README...: everything but weights."""
    for item in model_dir.iterdir():
        if item.name in written or item.name == "config.json" or item.name.endswith(FOREIGN_WEIGHT_SUFFIXES):
            continue
        if item.is_file():
            shutil.copy2(item, out / item.name)


def max_folded_abs(model_dir: Path, layout: ModelLayout, scales: SealScales) -> float:
    """Largest |weight| the folded o_proj tensors would hold (for the f16 range check)."""
    headers = read_headers(Path(model_dir))
    peak = 0.0
    for layer, (header, entry) in locate_o_proj(headers, layout).items():
        with open(header.path, "rb") as f:
            f.seek(entry.begin)
            weight = tensor_from_bytes(f.read(entry.end - entry.begin), entry)
        peak = max(peak, float((weight.float() * scales.columns(layer, layout.head_dim)[None, :]).abs().max()))
    return peak
