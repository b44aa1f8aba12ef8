"""The scales file: one float32 tensor `seal_scales` in a safetensors file, with metadata.

Shape [num_layers, num_heads] for SEAL-H (granularity "head"), [num_layers, num_heads, head_dim]
for SEAL-C (granularity "channel"). Every value is finite and > 0; 1.0 is the identity.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from seal_gguf import __version__
from seal_gguf.constants import (
    GRANULARITIES,
    GRANULARITY_HEAD,
    REQUIRED_SCALES_META,
    SCALES_FORMAT,
    SCALES_TENSOR,
    ScalesMeta,
)
from seal_gguf.errors import ScalesError
from seal_gguf.fileio import atomic_file, require_file, sha256_file
from seal_gguf.model.architectures import ModelLayout, converter_layout


@dataclass
class SealScales:
    """A scales file in memory (read_scales / load_scales): values float32, [L, H] for granularity
    "head" (SEAL-H) or [L, H, D] for "channel" (SEAL-C), 1.0 the identity; metadata all strings
    (ScalesMeta keys); sha256 of the file it was read from."""

    values: torch.Tensor  # float32, [L, H] or [L, H, D]
    granularity: str
    model_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None  # of the file it was read from

    @property
    def num_layers(self) -> int:
        return self.values.shape[0]

    @property
    def num_heads(self) -> int:
        return self.values.shape[1]

    def columns(self, layer: int, head_dim: int) -> torch.Tensor:
        """The scale of each input column of layer's o_proj: width num_heads * head_dim."""
        s = self.values[layer]
        if self.granularity == GRANULARITY_HEAD:
            s = s.repeat_interleave(head_dim)
        return s.reshape(-1)

    def per_head(self) -> torch.Tensor:
        """[L, H]: the head scale, or the mean of a head's channel scales."""
        return self.values if self.values.dim() == 2 else self.values.mean(dim=-1)


def expected_shape(layout: ModelLayout, granularity: str) -> tuple[int, ...]:
    if granularity == GRANULARITY_HEAD:
        return (layout.num_layers, layout.num_heads)
    return (layout.num_layers, layout.num_heads, layout.head_dim)


def identity_scales(layout: ModelLayout, granularity: str) -> torch.Tensor:
    if granularity not in GRANULARITIES:
        raise ScalesError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    return torch.ones(expected_shape(layout, granularity), dtype=torch.float32)


def check_values(values: torch.Tensor, where: str) -> None:
    if values.dtype != torch.float32:
        raise ScalesError(f"{where}: scales must be float32, found {values.dtype}")
    bad = ~torch.isfinite(values)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ScalesError(f"{where}: scale at {idx} is {values[idx].item()}; every scale must be finite")
    nonpos = values <= 0
    if nonpos.any():
        idx = tuple(int(i) for i in nonpos.nonzero()[0])
        raise ScalesError(f"{where}: scale at {idx} is {values[idx].item()}; every scale must be > 0")


def scales_metadata(layout: ModelLayout, granularity: str, provenance: dict[str, str] | None) -> dict[str, str]:
    meta = {
        ScalesMeta.FORMAT: SCALES_FORMAT,
        ScalesMeta.GRANULARITY: granularity,
        ScalesMeta.MODEL_TYPE: layout.model_type,
        ScalesMeta.NUM_LAYERS: str(layout.num_layers),
        ScalesMeta.NUM_HEADS: str(layout.num_heads),
        ScalesMeta.HEAD_DIM: str(layout.head_dim),
        ScalesMeta.LAYOUT: json.dumps(converter_layout(layout), sort_keys=True),
        ScalesMeta.SEAL_GGUF_VERSION: __version__,
    }
    for key, value in (provenance or {}).items():
        meta[key] = str(value)
    return meta


def save_scales(
    path: Path,
    values: torch.Tensor,
    layout: ModelLayout,
    granularity: str,
    provenance: dict[str, str] | None = None,
    force: bool = False,
) -> None:
    """Write `values` as a scales file at `path` (atomically; an existing file only with force).

    values: float32-convertible, [num_layers, num_heads] for granularity "head" (SEAL-H) or
    [num_layers, num_heads, head_dim] for "channel" (SEAL-C); every value finite and > 0, 1.0 the
    identity (the scale multiplies a head's output before o_proj, arXiv 2501.15225). provenance:
    extra string metadata (ScalesMeta keys: task, samples, length, lr, ...). Raises ScalesError for
    a wrong shape or a non-finite / non-positive value, OutputExistsError for an existing path.
    """
    values = values.detach().to("cpu", torch.float32).contiguous()
    if tuple(values.shape) != expected_shape(layout, granularity):
        raise ScalesError(
            f"scales of shape {tuple(values.shape)} do not fit {granularity} granularity; "
            f"expected {expected_shape(layout, granularity)}"
        )
    check_values(values, str(path))
    with atomic_file(Path(path), force=force) as tmp:
        save_file({SCALES_TENSOR: values}, str(tmp), metadata=scales_metadata(layout, granularity, provenance))


def read_scales(path: Path) -> SealScales:
    """Read and self-check a scales file (format, metadata, shape, values), without a model.

    Returns SealScales: .values float32 [L, H] or [L, H, D], .granularity, .model_type, .metadata
    (all strings), .sha256 of the file. Raises InputError (missing file) or ScalesError (not a
    safetensors file, not a seal-gguf scales file, a shape that contradicts its metadata, a value
    that is not finite or not > 0)."""
    path = require_file(Path(path), "scales file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            if SCALES_TENSOR not in keys:
                raise ScalesError(f"{path}: no tensor named {SCALES_TENSOR!r} (found: {', '.join(keys) or 'none'})")
            values = f.get_tensor(SCALES_TENSOR)
    except SafetensorError as exc:
        raise ScalesError(f"{path}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise ScalesError(f"{path}: cannot read ({exc})") from None
    missing = [k for k in REQUIRED_SCALES_META if k not in meta]
    if missing:
        raise ScalesError(f"{path}: metadata lacks {', '.join(missing)}; not a seal-gguf scales file")
    if meta[ScalesMeta.FORMAT] != SCALES_FORMAT:
        raise ScalesError(f"{path}: format {meta[ScalesMeta.FORMAT]!r}, expected {SCALES_FORMAT!r}")
    granularity = meta[ScalesMeta.GRANULARITY]
    if granularity not in GRANULARITIES:
        raise ScalesError(f"{path}: granularity {granularity!r}, expected one of {', '.join(GRANULARITIES)}")
    try:
        declared = [int(meta[k]) for k in (ScalesMeta.NUM_LAYERS, ScalesMeta.NUM_HEADS, ScalesMeta.HEAD_DIM)]
    except ValueError:
        raise ScalesError(f"{path}: num_layers / num_heads / head_dim metadata are not integers") from None
    if min(declared) <= 0:
        raise ScalesError(f"{path}: num_layers / num_heads / head_dim metadata must be positive, found {declared}")
    want = tuple(declared[:2]) if granularity == GRANULARITY_HEAD else tuple(declared)
    if tuple(values.shape) != want:
        raise ScalesError(
            f"{path}: tensor shape {tuple(values.shape)} does not match its metadata "
            f"({granularity} granularity, expected {want})"
        )
    check_values(values, str(path))
    return SealScales(values, granularity, meta[ScalesMeta.MODEL_TYPE], meta, sha256_file(path))


def check_against(scales: SealScales, layout: ModelLayout, where: str) -> None:
    """Raise ScalesError unless the scales fit this model's layout."""
    meta = scales.metadata
    if scales.model_type != layout.model_type:
        raise ScalesError(f"{where}: scales are for model_type {scales.model_type!r}, the model is {layout.model_type!r}")
    found = (int(meta[ScalesMeta.NUM_LAYERS]), int(meta[ScalesMeta.NUM_HEADS]), int(meta[ScalesMeta.HEAD_DIM]))
    want = (layout.num_layers, layout.num_heads, layout.head_dim)
    if found != want:
        raise ScalesError(
            f"{where}: scales are for layers x heads x head_dim = {found[0]} x {found[1]} x {found[2]}, "
            f"the model has {want[0]} x {want[1]} x {want[2]}"
        )


def load_scales(path: Path, layout: ModelLayout) -> SealScales:
    """read_scales, then check the file against the model's layout (model_type, layers, heads,
    head_dim); raises ScalesError naming what was expected and what was found."""
    scales = read_scales(path)
    check_against(scales, layout, str(path))
    return scales


def summarize_scales(scales: SealScales, top: int = 5) -> dict[str, object]:
    """Figures for `seal-gguf inspect`: range, mean, most amplified and most suppressed heads."""
    v = scales.values
    heads = scales.per_head()
    flat = heads.flatten()
    order = torch.argsort(flat)
    def at(i: int) -> tuple[int, int, float]:
        layer, head = divmod(int(i), scales.num_heads)
        return layer, head, float(flat[i])
    return {
        "granularity": scales.granularity,
        "shape": list(v.shape),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "geomean": math.exp(float(v.log().mean())),
        "amplified": [at(i) for i in order.flip(0)[:top]],
        "suppressed": [at(i) for i in order[:top]],
    }
