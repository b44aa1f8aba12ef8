"""PEFT interchange: SEAL scales as an IA3 adapter on o_proj, and an IA3 adapter as SEAL scales.

PEFT's IA3 (Liu et al. 2022), with o_proj among its feedforward_modules, multiplies o_proj's input
features by a vector ia3_l of shape [1, in_features] (peft.tuners.ia3.layer.Linear), and its
merge_and_unload() multiplies input column j of the weight by ia3_l[j]. o_proj's input is the
concatenated head outputs (width heads·head_dim), so that vector is SEAL-C, and the merge is
seal-gguf's fold (fold/hf.py); SEAL-H is the same vector with each head's scale repeated head_dim
times. IA3 on o_proj as a non-feed-forward module scales o_proj's outputs instead, and IA3 on other
modules (k_proj, v_proj, down_proj) scales what SEAL does not: neither is imported.

The adapter folder is PEFT's own format, as peft 0.21.2's save_pretrained writes it:
adapter_config.json and adapter_model.safetensors with one float32 tensor
base_model.model.<o_proj module>.ia3_l per layer. peft itself is not needed to read or write it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from seal_gguf import __version__
from seal_gguf.constants import (
    GGUF_RECIPE_KEYS,
    GGUF_SEAL_PREFIX,
    GRANULARITIES,
    GRANULARITY_CHANNEL,
    GRANULARITY_HEAD,
    ScalesMeta,
)
from seal_gguf.errors import InputError, ScalesError
from seal_gguf.fileio import atomic_dir, check_output_path, read_json_object, require_file
from seal_gguf.model.architectures import ModelLayout, layout_from_config, model_layout, read_config
from seal_gguf.model.checkpoint import (
    check_base_fingerprint,
    check_not_folded,
    locate_o_proj,
    model_fingerprint,
    read_headers,
    read_tensor,
)
from seal_gguf.scales import SealScales, check_values, load_scales, save_scales

# PEFT's file and key names (peft.utils.constants, peft.tuners.ia3)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PeftModel -> the tuner (base_model) -> the transformers model (model)
IA3_SUFFIX = ".ia3_l"
PEFT_TYPE_IA3 = "IA3"
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose save_pretrained this format follows
# Provenance in adapter_model.safetensors' header, beside PEFT's own "format": "pt" (PEFT reads only the tensors):
# seal.<ScalesMeta key> for each field of the scales file exported, and these.
META_SCALES_SHA256 = GGUF_SEAL_PREFIX + "scales_sha256"  # of the scales file exported
META_VALUES_SHA256 = GGUF_SEAL_PREFIX + "values_sha256"  # of the ia3_l vectors as written (values_digest)
META_EXPORTED_BY = GGUF_SEAL_PREFIX + "exported_by"


@dataclass(frozen=True)
class PeftExport:
    """What export_peft wrote: the adapter folder, the layers it adapts, the scales' granularity, PEFT's
    target_modules (a regex over module names), and warnings (a fingerprint mismatch under force)."""

    out_dir: Path
    layers: int
    granularity: str
    target_modules: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeftImport:
    """What import_peft wrote: the scales file, its granularity, how many layers the adapter adapts (the
    others are 1.0), whether every head's vector is constant (then SEAL-H holds it exactly), and whether
    the recipe the adapter recorded (it was exported by seal-gguf and its vectors are unchanged) was kept;
    the layers without a vector, which get scale 1.0 (said in a warning by the CLI)."""

    path: Path
    granularity: str
    layers_adapted: int
    head_constant: bool
    recipe_restored: bool
    layers_missing: tuple[int, ...] = ()


@dataclass(frozen=True)
class IA3Adapter:
    """A PEFT adapter folder as read: adapter_config.json's contents, the tensors of
    adapter_model.safetensors (PEFT's key names) and that file's header metadata."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


# -- pure conversions --

def o_proj_regex(layout: ModelLayout) -> str:
    """A regex that fullmatches each layer's o_proj module name (architectures.json's o_proj template, the
    layer index the one group), e.g. model\\.layers\\.(\\d+)\\.self_attn\\.o_proj. Unlike the name "o_proj"
    it matches no vision-tower module of a multimodal checkpoint."""
    before, _, after = layout.o_proj_template.partition("{layer}")
    return re.escape(before) + r"(\d+)" + re.escape(after)


def ia3_config(layout: ModelLayout, base_model: str) -> dict[str, Any]:
    """adapter_config.json of an IA3 adapter that scales the input features of every layer's o_proj:
    target_modules and feedforward_modules are both the o_proj regex (PEFT fullmatches a string against
    module names); the fields and values are those peft 0.21.2 writes for IA3Config(task_type="CAUSAL_LM")."""
    target = o_proj_regex(layout).replace(r"(\d+)", r"\d+")
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": target,
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "peft_type": PEFT_TYPE_IA3,
        "peft_version": PEFT_FORMAT_VERSION,
        "revision": None,
        "target_modules": target,
        "task_type": "CAUSAL_LM",
    }


def ia3_key(layout: ModelLayout, layer: int) -> str:
    """PEFT's name for layer's IA3 vector in adapter_model.safetensors."""
    return KEY_PREFIX + layout.o_proj_module(layer) + IA3_SUFFIX


def ia3_vectors(scales: SealScales, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The IA3 vector of every layer's o_proj: float32 [1, heads·head_dim], the scale of each input column
    (SEAL-H: each head's scale repeated head_dim times), under PEFT's key names."""
    return {ia3_key(layout, layer): scales.columns(layer, layout.head_dim).reshape(1, -1).clone()
            for layer in range(layout.num_layers)}


def values_digest(vectors: list[torch.Tensor]) -> str:
    """sha256 of the vectors' float32 bytes, in the order given (layer order)."""
    digest = hashlib.sha256()
    for vector in vectors:
        digest.update(vector.detach().to(torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_feedforward(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT treats `module` as a feed-forward module of this IA3 config (its vector scales the
    module's input): peft.tuners.ia3.IA3Model._check_target_module_feedforward's rule, a string fullmatched
    as a regex, a list matched as name endings."""
    ff = config.get("feedforward_modules")
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return isinstance(ff, list) and any(isinstance(name, str) and module.endswith(name) for name in ff)


def scales_from_ia3(config: dict[str, Any], tensors: dict[str, torch.Tensor], layout: ModelLayout,
                    where: str) -> tuple[torch.Tensor, list[int]]:
    """SEAL-C scales [num_layers, num_heads, head_dim] float32 from an IA3 adapter's config and tensors
    (PEFT's key names), and the layers it adapts (the others stay 1.0, as PEFT leaves them).

    Raises InputError (not IA3; tensors on other modules than o_proj; o_proj not a feed-forward module,
    so the vector scales its outputs; modules_to_save; a vector of the wrong shape; no vectors) or
    ScalesError (a value not finite or not > 0), each naming `where`."""
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE_IA3:
        raise InputError(f"{where}: peft_type {peft_type!r}; seal-gguf imports IA3 adapters only (IA3Config on o_proj "
                         "as a feed-forward module), whose vectors are SEAL scales; other adapters change the weights "
                         "in ways scales cannot hold")
    if config.get("modules_to_save"):
        raise InputError(f"{where}: the adapter also replaces whole modules (modules_to_save: "
                         f"{config['modules_to_save']}), which SEAL scales cannot hold")
    pattern = re.compile(KEY_PREFIX + o_proj_regex(layout) + re.escape(IA3_SUFFIX))
    layers: dict[int, torch.Tensor] = {}
    others: list[str] = []
    for key, tensor in tensors.items():
        found = pattern.fullmatch(key)
        if found is None or int(found.group(1)) >= layout.num_layers:
            others.append(key)
        else:
            layers[int(found.group(1))] = tensor
    if others:
        names = sorted({key.removesuffix(IA3_SUFFIX).rsplit(".", 1)[-1] for key in others})
        raise InputError(f"{where}: holds {len(others)} tensors on other modules than this model's o_proj "
                         f"({', '.join(names)}; e.g. {others[0]}); seal-gguf imports IA3 on o_proj only, whose "
                         "input is the heads' outputs that SEAL scales")
    if not layers:
        raise InputError(f"{where}: holds no IA3 vectors")
    values = torch.ones(layout.num_layers, layout.num_heads, layout.head_dim, dtype=torch.float32)
    for layer, tensor in sorted(layers.items()):
        module = layout.o_proj_module(layer)
        if not is_feedforward(config, module):
            raise InputError(f"{where}: IA3 on {module} is not a feed-forward module (feedforward_modules: "
                             f"{config.get('feedforward_modules')!r}), so it scales o_proj's output features, not "
                             "the heads' outputs SEAL scales; configure o_proj in feedforward_modules")
        if tuple(tensor.shape) != (1, layout.attn_width) or not tensor.is_floating_point():
            raise InputError(f"{where}: {ia3_key(layout, layer)} has shape {list(tensor.shape)} ({tensor.dtype}); "
                             f"IA3 on o_proj's {layout.attn_width} input features "
                             f"({layout.num_heads} heads x {layout.head_dim}) is a float [1, {layout.attn_width}]")
        values[layer] = tensor.to(torch.float32).reshape(layout.num_heads, layout.head_dim)
    check_values(values, where)
    return values, sorted(layers)


def is_head_constant(values: torch.Tensor) -> bool:
    """Whether SEAL-C values [L, H, D] are exactly constant over each head's D channels (SEAL-H holds them)."""
    return bool((values == values[..., :1]).all())


def head_scales(values: torch.Tensor, where: str) -> torch.Tensor:
    """SEAL-H [L, H] from SEAL-C values [L, H, D] constant within every head; raises ScalesError otherwise."""
    if not is_head_constant(values):
        spread = values.amax(dim=-1) - values.amin(dim=-1)
        layer, head = (int(i) for i in (spread == spread.max()).nonzero()[0])
        row = values[layer, head]
        raise ScalesError(f"{where}: layer {layer} head {head}'s vector varies over its {values.shape[-1]} channels "
                          f"({float(row.min()):.6g} .. {float(row.max()):.6g}); SEAL-H keeps one scale per head, "
                          "use --granularity channel")
    return values[..., 0].contiguous()


# -- files --

def export_peft(scales_path: Path, model_dir: Path, out_dir: Path, force: bool = False) -> PeftExport:
    """Write the scales as a PEFT IA3 adapter folder for the HF model in model_dir (atomically: a temporary
    folder beside out_dir, renamed at the end): adapter_config.json (ia3_config, base_model_name_or_path =
    model_dir as given) and adapter_model.safetensors (ia3_vectors, float32, provenance in its header).
    PeftModel.from_pretrained(model, out_dir).merge_and_unload() is then fold_checkpoint's folded model.

    Raises InputError (bad model folder, out_dir is the model), ScalesError (scales that do not fit the model,
    or learned on another checkpoint unless force), AlreadyFoldedError (the model already carries scales,
    unless force), OutputExistsError (out_dir exists, unless force)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    layout = layout_from_config(config, model_dir / "config.json")
    check_not_folded(config, str(model_dir), force, remedy="export for the original model, or use --force")
    scales = load_scales(scales_path, layout)
    check_output_path(out_dir, force, folder=True, inputs=[model_dir, Path(scales_path)])
    header, entry = locate_o_proj(read_headers(model_dir), layout)[0]
    warning = check_base_fingerprint(scales.metadata.get(ScalesMeta.BASE_FINGERPRINT),
                                     read_tensor(entry, header.path), scales_path, model_dir, force)
    vectors = ia3_vectors(scales, layout)
    metadata = {"format": "pt",
                **{GGUF_SEAL_PREFIX + key: value for key, value in scales.metadata.items()},
                META_SCALES_SHA256: scales.sha256 or "",
                META_VALUES_SHA256: values_digest(list(vectors.values())),
                META_EXPORTED_BY: f"seal-gguf {__version__}"}
    adapter_config = ia3_config(layout, str(model_dir))
    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(vectors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
    return PeftExport(out_dir, layout.num_layers, scales.granularity, adapter_config["target_modules"],
                      (warning,) if warning else ())


def read_adapter(adapter_dir: Path) -> IA3Adapter:
    """Read a PEFT adapter folder: adapter_config.json and adapter_model.safetensors (never the pickled
    adapter_model.bin). Raises InputError for a missing folder or file, broken JSON, a pickled-only
    adapter, or a file safetensors cannot read."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir}: no such folder; give a PEFT adapter folder (adapter_config.json, "
                         f"{ADAPTER_WEIGHTS})")
    config_path = require_file(adapter_dir / ADAPTER_CONFIG, "PEFT adapter config")
    config = read_json_object(config_path)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.exists() and (adapter_dir / PICKLED_WEIGHTS).exists():
        raise InputError(f"{adapter_dir}: holds {PICKLED_WEIGHTS}, a pickled checkpoint, which seal-gguf does not "
                         f"load; save the adapter with save_pretrained(..., safe_serialization=True)")
    weights = require_file(weights, "adapter weights file")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{weights}: not a readable safetensors file ({exc})") from None
    return IA3Adapter(adapter_dir, config, tensors, metadata)


def adapter_model_dir(adapter: IA3Adapter) -> Path:
    """The model an adapter is for: its base_model_name_or_path, where that is a local folder; else InputError."""
    base = adapter.config.get("base_model_name_or_path")
    if not isinstance(base, str) or not (Path(base) / "config.json").is_file():
        raise InputError(f"{adapter.path}: its base model {base!r} is not a local model folder; "
                         "give the model with --model MODEL_DIR")
    return Path(base)


def recorded_recipe(adapter: IA3Adapter, vectors: list[torch.Tensor]) -> dict[str, str]:
    """The training recipe (constants.GGUF_RECIPE_KEYS) seal-gguf recorded when it exported the adapter,
    provided its vectors are still the ones exported (META_VALUES_SHA256); else {}."""
    if adapter.metadata.get(META_VALUES_SHA256) != values_digest(vectors):
        return {}
    return {key: adapter.metadata[GGUF_SEAL_PREFIX + key] for key in GGUF_RECIPE_KEYS
            if GGUF_SEAL_PREFIX + key in adapter.metadata}


def import_peft(adapter_dir: Path, out_path: Path, model_dir: Path | None = None,
                granularity: str = GRANULARITY_CHANNEL, force: bool = False,
                command: str | None = None) -> PeftImport:
    """Write the IA3 vectors on o_proj of a PEFT adapter folder as a scales file (scales.save_scales):
    SEAL-C [L, H, D], or with granularity "head" SEAL-H [L, H] where each head's vector is constant.
    model_dir (default: the adapter's base_model_name_or_path, if a local folder) gives the head layout
    and o_proj's module names. Provenance: the recipe seal-gguf recorded on export if the vectors are
    unchanged (it wins), `command`, and the model's base_fingerprint.

    Raises InputError (no adapter, pickled weights, not IA3 on o_proj as a feed-forward module, no model
    folder), ScalesError (a value not finite or not > 0; granularity "head" with a vector that varies within
    a head), OutputExistsError (out_path exists, unless force)."""
    if granularity not in GRANULARITIES:
        raise ScalesError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    adapter = read_adapter(adapter_dir)
    out_path = Path(out_path)
    check_output_path(out_path, force, inputs=[adapter.path / ADAPTER_WEIGHTS, adapter.path / ADAPTER_CONFIG])
    model_dir = adapter_model_dir(adapter) if model_dir is None else Path(model_dir)
    layout = model_layout(model_dir)
    values, layers = scales_from_ia3(adapter.config, adapter.tensors, layout, str(adapter.path))
    head_constant = is_head_constant(values)
    recipe = recorded_recipe(adapter, [values[layer].reshape(1, -1) for layer in layers])
    provenance = {ScalesMeta.BASE_FINGERPRINT: model_fingerprint(model_dir, layout),
                  **({ScalesMeta.COMMAND: command} if command else {}), **recipe}
    written = head_scales(values, str(adapter.path)) if granularity == GRANULARITY_HEAD else values
    save_scales(out_path, written, layout, granularity, provenance, force=force)
    missing = tuple(layer for layer in range(layout.num_layers) if layer not in layers)
    return PeftImport(out_path, granularity, len(layers), head_constant, bool(recipe), missing)

