"""Supported architectures, described as data in architectures.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from seal_gguf.errors import ArchitectureError, InputError
from seal_gguf.fileio import read_json_object


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp's GGUF of this architecture names o_proj and the head layout."""

    architectures: tuple[str, ...]  # general.architecture values the converter writes for it
    o_proj: str  # tensor name template with {layer}, e.g. blk.{layer}.attn_output.weight
    num_layers: str  # metadata keys, with {arch} for the GGUF architecture
    num_heads: str
    head_dim: str
    hidden_size: str

    def key(self, what: str, arch: str) -> str:
        return getattr(self, what).format(arch=arch)


@dataclass(frozen=True)
class ArchSpec:
    """One architectures.json entry, with _defaults filled in."""

    model_type: str
    o_proj: str  # module path template with {layer}
    checkpoint_o_proj: str  # the o_proj weight's name in the safetensors checkpoint
    converter_o_proj: str  # the o_proj weight's name inside llama.cpp's converter (after its renames)
    config_section: str | None  # the config.json key holding the text model's config (multimodal); None: top level
    converter_model_type: str  # the model_type llama.cpp's converter sees
    num_layers: str  # config keys
    num_heads: str
    num_kv_heads: str
    head_dim: str
    hidden_size: str
    sliding_window: str
    use_sliding_window: str
    context: str
    gguf: GGUFSpec
    rope_scaling: tuple[str, ...]  # context extensions checked through llama.cpp
    unsupported_sliding_window: str | None  # why llama.cpp cannot run its sliding window; None: it can
    rope_scaling_refused: str | None  # why the other context extensions cannot be used
    requires: dict[str, tuple[Any, str]]  # config key (dotted: nested) -> (the value llama.cpp assumes, why)
    # config key -> (the values llama.cpp may assume: "key", "key/key", each optionally "... if key=value"
    # or "... if key!=value"; why)
    requires_equal: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    transformers_class: str | None = None  # the transformers class that runs it; None: AutoModelForCausalLM's
    attn_implementation: str = "sdpa"  # the attention transformers runs it with (Gemma 2 has no SDPA in transformers)

    @property
    def gguf_architectures(self) -> tuple[str, ...]:
        return self.gguf.architectures


@dataclass(frozen=True)
class ModelLayout:
    """How one model's attention heads are laid out: what a scales file must match."""

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    o_proj_template: str
    gguf_architectures: tuple[str, ...] = ()
    weight_template: str | None = None  # the weight's name in the checkpoint; None: o_proj_template + ".weight"

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
        if self.weight_template is not None:
            return self.weight_template.format(layer=layer)
        return self.o_proj_module(layer) + ".weight"


def _merged(defaults: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """entry over defaults, nested dicts merged key by key."""
    out = dict(defaults)
    for key, value in entry.items():
        out[key] = _merged(defaults[key], value) if isinstance(value, dict) and isinstance(defaults.get(key), dict) \
            else value
    return out


def _spec(model_type: str, entry: dict[str, Any]) -> ArchSpec:
    where = f"architectures.json: {model_type}"
    if "{layer}" not in entry["o_proj"]:
        raise ValueError(f"{where}: o_proj has no {{layer}} placeholder")
    gguf = entry["gguf"]
    if "{layer}" not in gguf["o_proj"] or not gguf.get("architectures"):
        raise ValueError(f"{where}: gguf needs architectures and an o_proj with a {{layer}} placeholder")
    return ArchSpec(
        model_type=model_type,
        o_proj=entry["o_proj"],
        checkpoint_o_proj=entry.get("checkpoint_o_proj", entry["o_proj"] + ".weight"),
        converter_o_proj=entry.get("converter_o_proj", entry.get("checkpoint_o_proj", entry["o_proj"] + ".weight")),
        config_section=entry.get("config_section"),
        converter_model_type=entry.get("converter_model_type", model_type),
        **entry["config"],
        gguf=GGUFSpec(**{**gguf, "architectures": tuple(gguf["architectures"])}),
        rope_scaling=tuple(entry["rope_scaling"]),
        unsupported_sliding_window=entry.get("unsupported_sliding_window"),
        rope_scaling_refused=entry.get("rope_scaling_refused"),
        requires={key: (value, why) for key, (value, why) in entry.get("requires", {}).items()},
        requires_equal={key: (tuple(values), why) for key, (values, why) in entry.get("requires_equal", {}).items()},
        transformers_class=entry.get("transformers_class"),
        attn_implementation=entry.get("attn_implementation", "sdpa"),
    )


@cache
def _table() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("architectures.json").read_text())


@cache
def arch_specs() -> dict[str, ArchSpec]:
    raw = _table()
    return {model_type: _spec(model_type, _merged(raw["_defaults"], entry))
            for model_type, entry in raw.items() if not model_type.startswith("_")}


def refused_model_types() -> dict[str, str]:
    """model_type -> why seal-gguf cannot fold SEAL scales into it."""
    return dict(_table().get("_refused", {}))


def converter_layout(layout: ModelLayout) -> dict[str, Any]:
    """What llama.cpp's converter, patched by seal-gguf, needs to know to fold scales into this model:
    the o_proj weight's name there ({layer}: the layer index) and the config.json keys of the head
    layout (checked against the scales). Stored in the scales file's metadata."""
    spec = arch_specs().get(layout.model_type)
    if spec is None:  # a layout made by hand (tests): o_proj as given, nothing to check the config with
        return {"o_proj": layout.o_proj_template + ".weight", "config": {}}
    return {"o_proj": spec.converter_o_proj, "model_type": spec.converter_model_type,
            "config": {"num_layers": spec.num_layers, "num_heads": spec.num_heads}}


def transformers_class(model_type: str) -> Any:
    """The transformers class that runs this model type from input ids to logits (its from_pretrained and
    from_config): AutoModelForCausalLM, or the class architectures.json names where that one maps no class."""
    import transformers

    spec = arch_specs().get(model_type)
    name = spec.transformers_class if spec is not None else None
    return getattr(transformers, name) if name else transformers.AutoModelForCausalLM


def attn_implementation(model_type: str) -> str:
    """The attention implementation transformers runs this model type with (SDPA unless it has none)."""
    spec = arch_specs().get(model_type)
    return spec.attn_implementation if spec is not None else "sdpa"


def supported_model_types() -> list[str]:
    return sorted(arch_specs())


def layout_from_config(config: dict[str, Any], where: Path | str = "config.json") -> ModelLayout:
    """The head layout of a model, from its config.json contents (`where` names that file in errors)."""
    model_type = config.get("model_type")
    specs = arch_specs()
    if isinstance(model_type, str) and model_type in refused_model_types():
        raise ArchitectureError(f"{where}: model_type {model_type!r} is not supported: {refused_model_types()[model_type]}")
    if not isinstance(model_type, str) or model_type not in specs:
        raise ArchitectureError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    spec = specs[model_type]
    config = text_config(config, spec)
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
    for key, (value, why) in spec.requires.items():
        given = config_value(config, key)
        if given is not MISSING and given != value:
            raise ArchitectureError(f"{where}: {key} is {given!r}; seal-gguf converts {model_type} models "
                                    f"with {key} = {value!r} only: {why}")
    known = {**config, spec.head_dim: head_dim}
    for key, (values, why) in spec.requires_equal.items():
        wanted = [v for v in (_assumed(known, value) for value in values) if v is not None]
        if key in config and wanted and config[key] not in wanted:
            raise ArchitectureError(f"{where}: {key} is {config[key]!r}, not {' or '.join(f'{v:g}' for v in wanted)}; "
                                    f"seal-gguf converts {model_type} models only where llama.cpp runs them as "
                                    f"transformers does: {why}")
    window = sliding_window(config, spec)
    if window is not None and spec.unsupported_sliding_window:
        raise ArchitectureError(f"{where}: this {model_type} model attends within a sliding window of {window} tokens, "
                                f"shorter than its context; {spec.unsupported_sliding_window}")
    layout = ModelLayout(model_type, num_layers, num_heads, head_dim, spec.o_proj, spec.gguf_architectures,
                         spec.checkpoint_o_proj)
    if min(layout.num_layers, layout.num_heads, layout.head_dim) <= 0:
        raise InputError(f"{where}: gives a non-positive head layout: {layout}")
    return layout


MISSING = object()


def config_value(config: dict[str, Any], key: str) -> Any:
    """config[key], where a dotted key ("rope_parameters.truncate") reads nested sections; MISSING if absent."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def _assumed(config: dict[str, Any], rule: str) -> float | None:
    """The value a requires_equal rule ("key", "key/key", each optionally "... if key=value" or
    "... if key!=value") gives for this config; None when its condition does not hold or a key is missing."""
    expr, _, condition = rule.partition(" if ")
    if condition:
        negate = "!=" in condition
        key, value = condition.split("!=" if negate else "=")
        if (str(config.get(key.strip())) == value.strip()) == negate:
            return None
    try:
        parts = [float(config[k.strip()]) for k in expr.split("/")]
    except (KeyError, TypeError, ValueError):
        return None
    return parts[0] / parts[1] if len(parts) == 2 and parts[1] else parts[0] if len(parts) == 1 else None


def text_config(config: dict[str, Any], spec: ArchSpec) -> dict[str, Any]:
    """The part of config.json that describes the text model (all of it, but for multimodal checkpoints)."""
    if spec.config_section is None:
        return config
    section = config.get(spec.config_section)
    return section if isinstance(section, dict) else {}


def sliding_window(config: dict[str, Any], spec: ArchSpec) -> int | None:
    """The model's attention window in tokens when it is shorter than its context; None otherwise."""
    window, context = config.get(spec.sliding_window), config.get(spec.context)
    if not isinstance(window, int) or config.get(spec.use_sliding_window) is False:
        return None
    return window if not isinstance(context, int) or window < context else None


def rope_scaling_refusal(config: dict[str, Any], kind: str) -> str | None:
    """Why this model cannot be extended by `kind` RoPE scaling (seal_gguf.model.rope); None if it can."""
    spec = arch_specs().get(config.get("model_type"))  # type: ignore[arg-type]
    if spec is None or kind in spec.rope_scaling:
        return None
    why = f": {spec.rope_scaling_refused}" if spec.rope_scaling_refused else ""
    return (f"{kind} RoPE scaling is not available for {spec.model_type} models{why}; "
            f"use {' or '.join(spec.rope_scaling) or 'none'}")


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF model folder, with clear errors for the usual mistakes."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InputError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        hint = (f"; to start from this GGUF, turn it into one with `seal-gguf import-gguf {model_dir} "
                f"{model_dir.with_suffix('')}-hf/`" if model_dir.suffix.lower() == ".gguf" else "")
        raise InputError(f"{model_dir}: expected a model folder (with config.json), found a file{hint}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; is {model_dir} a Hugging Face model folder?")
    return read_json_object(path)


def model_layout(model_dir: Path) -> ModelLayout:
    """The head layout of the HF model in `model_dir` (from its config.json, no weights read).

    Raises InputError (no folder, no or broken config.json) or ArchitectureError (a model_type
    seal-gguf does not support, or a layout the config contradicts)."""
    return layout_from_config(read_config(model_dir), Path(model_dir) / "config.json")
