"""Supported architectures, described as data in architectures.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from seal_gguf.errors import ArchitectureError, InputError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    o_proj: str  # module path template with {layer}
    num_layers: str  # config keys
    num_heads: str
    head_dim: str
    hidden_size: str
    gguf_architectures: tuple[str, ...]  # general.architecture values of its GGUFs


@dataclass(frozen=True)
class ModelLayout:
    """How one model's attention heads are laid out: what a scales file must match."""

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    o_proj_template: str
    gguf_architectures: tuple[str, ...] = ()

    @property
    def attn_width(self) -> int:
        """Width of the concatenated head outputs: the input width of o_proj."""
        return self.num_heads * self.head_dim

    def o_proj_module(self, layer: int) -> str:
        return self.o_proj_template.format(layer=layer)

    @property
    def layers_prefix(self) -> str:
        """Module path of the decoder-layer list, e.g. "model.layers" (layer i is "model.layers.i")."""
        return self.o_proj_template.split(".{layer}")[0]

    def layer_module(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}"

    def o_proj_weight(self, layer: int) -> str:
        return self.o_proj_module(layer) + ".weight"


@cache
def arch_specs() -> dict[str, ArchSpec]:
    raw = json.loads(resources.files(__package__).joinpath("architectures.json").read_text())
    specs: dict[str, ArchSpec] = {}
    for model_type, entry in raw.items():
        if model_type.startswith("_"):
            continue
        if "{layer}" not in entry["o_proj"]:
            raise ValueError(f"architectures.json: {model_type}: o_proj has no {{layer}} placeholder")
        specs[model_type] = ArchSpec(model_type=model_type, **{**entry, "gguf_architectures": tuple(entry["gguf_architectures"])})
    return specs


def supported_model_types() -> list[str]:
    return sorted(arch_specs())


def layout_from_config(config: dict[str, Any], where: Path | str = "config.json") -> ModelLayout:
    """The head layout of a model, from its config.json contents (`where` names that file in errors)."""
    model_type = config.get("model_type")
    specs = arch_specs()
    if not isinstance(model_type, str) or model_type not in specs:
        raise ArchitectureError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    spec = specs[model_type]
    try:
        num_layers = int(config[spec.num_layers])
        num_heads = int(config[spec.num_heads])
        head_dim = config.get(spec.head_dim)
        head_dim = None if head_dim is None else int(head_dim)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: this {model_type} model's config lacks a valid "
                         f"{spec.num_layers} / {spec.num_heads} / {spec.head_dim} ({exc})") from None
    if head_dim is None:
        hidden = config.get(spec.hidden_size)
        if not isinstance(hidden, int) or num_heads <= 0 or hidden % num_heads:
            raise InputError(f"{where}: cannot derive head_dim from {spec.hidden_size}={hidden!r}")
        head_dim = hidden // num_heads
    layout = ModelLayout(model_type, num_layers, num_heads, head_dim, spec.o_proj, spec.gguf_architectures)
    if min(layout.num_layers, layout.num_heads, layout.head_dim) <= 0:
        raise InputError(f"{where}: gives a non-positive head layout: {layout}")
    return layout


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF model folder, with clear errors for the usual mistakes."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: expected a model folder (with config.json), found a file")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; is {model_dir} a Hugging Face model folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config


def model_layout(model_dir: Path) -> ModelLayout:
    """The head layout of the HF model in `model_dir` (from its config.json, no weights read).

    Raises InputError (no folder, no or broken config.json) or ArchitectureError (a model_type
    seal-gguf does not support, or a layout the config contradicts)."""
    return layout_from_config(read_config(model_dir), Path(model_dir) / "config.json")
