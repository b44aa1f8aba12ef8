"""Training-free context extension, written into config.json so that every engine runs the same model.

A RopeScaling says how the rotary position embedding is stretched to run a model F times beyond
the context it was trained for:
- linear: position interpolation (every position divided by F);
- yarn: YaRN (NTK-by-parts interpolation plus an attention temperature);
- ntk: NTK-aware scaling, which is nothing but a raised RoPE base, theta * F^(d / (d - 2)) with d
  the rotary dimension: no rope type at all, so both engines only see another base.

extend_config turns a config.json into the extended one. PyTorch loads the model with it, and
llama.cpp's converter reads it from a shadow folder (the model's files linked, config.json
replaced) and writes the matching GGUF keys itself: rope.freq_base, rope.scaling.type / factor /
original_context_length and the yarn parameters, and the extended context_length. llama.cpp then
runs the GGUF as it is, with no runtime flag.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal_gguf.errors import EngineError, InputError
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.model.architectures import read_config, rope_scaling_refusal

KINDS = ("linear", "yarn", "ntk")
# llama.cpp reads no yarn beta from a GGUF (it always uses 32 / 1, its defaults) and transformers
# defaults to the same; written explicitly so that a change of either default cannot split them.
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
# transformers 5 nests per-layer-type RoPE parameters under these keys (Gemma 3: sliding layers
# keep their own local base); the extension applies to the full-attention layers, as in llama.cpp.
FULL_ATTENTION = "full_attention"
UNSCALED_TYPES = (None, "default")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of KINDS
    factor: float  # > 1: the model runs up to factor x original_context tokens
    original_context: int | None = None  # the trained context; None: the config's max_position_embeddings

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown RoPE scaling {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise InputError(f"the RoPE scaling factor must be a number > 1 (the context grows that many times), "
                             f"not {self.factor:g}")
        if self.original_context is not None and self.original_context < 1:
            raise InputError(f"the original context must be a positive number of tokens, not {self.original_context}")

    @property
    def extended_context(self) -> int:
        if self.original_context is None:
            raise ValueError("resolve() the scaling against a config first")
        return round(self.original_context * self.factor)

    def resolved(self, config: dict[str, Any], where: str = "config.json") -> RopeScaling:
        """This scaling with original_context filled in from the config where it was left out."""
        if self.original_context is not None:
            return self
        native = config.get("max_position_embeddings")
        if not isinstance(native, int) or native < 1:
            raise InputError(f"{where}: has no max_position_embeddings to extend; give the original context "
                             "(--rope-original-context)")
        return RopeScaling(self.kind, self.factor, native)

    def spec(self) -> str:
        """The compact form kept in metadata: kind:factor:original_context (e.g. yarn:4:8192)."""
        return ":".join([self.kind, f"{self.factor:g}", *([str(self.original_context)] if self.original_context else [])])

    def __str__(self) -> str:
        return self.spec()


def parse_rope_scaling(text: str) -> RopeScaling:
    """The inverse of RopeScaling.spec(): 'yarn:4:8192' (or 'yarn:4', original context unknown)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3):
        raise InputError(f"{text!r} is not a RoPE scaling (kind:factor:original_context, e.g. yarn:4:8192)")
    try:
        factor = float(parts[1])
        original = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise InputError(f"{text!r} is not a RoPE scaling (kind:factor:original_context, e.g. yarn:4:8192)") from None
    return RopeScaling(parts[0], factor, original)


def rope_from_options(kind: str | None, factor: float | None, original_context: int | None = None,
                      config: dict[str, Any] | None = None, where: str = "config.json") -> RopeScaling | None:
    """The scaling the command-line options ask for (None: no extension), resolved against config if given."""
    if kind is None and factor is None:
        if original_context is not None:
            raise InputError("--rope-original-context needs --rope-scaling and --rope-factor")
        return None
    if kind is None or factor is None:
        raise InputError("--rope-scaling and --rope-factor go together: give both (e.g. --rope-scaling yarn "
                         "--rope-factor 2) or neither")
    scaling = RopeScaling(kind, factor, original_context)
    return scaling if config is None else scaling.resolved(config, where)


def rope_for_model(model_dir: Path, kind: str | None, factor: float | None,
                   original_context: int | None = None) -> RopeScaling | None:
    """rope_from_options resolved against the model folder's config.json."""
    model_dir = Path(model_dir)
    if kind is None and factor is None and original_context is None:
        return None
    return rope_from_options(kind, factor, original_context, read_config(model_dir), str(model_dir / "config.json"))


# -- config.json --

def _is_nested(params: dict[str, Any]) -> bool:
    return bool(params) and all(isinstance(v, dict) or v is None for v in params.values())


def _rope_tables(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every RoPE parameter dict of a config: transformers 5's rope_parameters (flat or per layer
    type) and the older rope_scaling."""
    tables = []
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if isinstance(value, dict):
            tables += [v for v in value.values() if isinstance(v, dict)] if _is_nested(value) else [value]
    return tables


def _existing_scaling(config: dict[str, Any]) -> str | None:
    for table in _rope_tables(config):
        kind = table.get("rope_type", table.get("type"))
        if kind not in UNSCALED_TYPES:
            return str(kind)
    return None


def _rotary_dim(config: dict[str, Any], target: dict[str, Any], where: str) -> int:
    head_dim = config.get("head_dim")
    if not isinstance(head_dim, int):
        hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
        if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0):
            raise InputError(f"{where}: cannot tell the rotary dimension (no head_dim, hidden_size / "
                             "num_attention_heads) needed for ntk scaling")
        head_dim = hidden // heads
    partial = target.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    dim = int(head_dim * float(partial))
    if dim <= 2:
        raise InputError(f"{where}: a rotary dimension of {dim} cannot be NTK-scaled")
    return dim


def ntk_theta(theta: float, factor: float, rotary_dim: int) -> float:
    """NTK-aware scaling's base: the lowest frequency is interpolated by factor, the highest kept."""
    return theta * factor ** (rotary_dim / (rotary_dim - 2))


def extend_config(config: dict[str, Any], scaling: RopeScaling, where: str = "config.json") -> dict[str, Any]:
    """A new config.json dict for the model extended by `scaling` (the input is not modified).

    Written in the config's own layout: transformers 5's rope_parameters, or rope_scaling with a
    top-level rope_theta (transformers 4); llama.cpp's converter reads both.
    """
    refusal = rope_scaling_refusal(config, scaling.kind)
    if refusal is not None:
        raise InputError(f"{where}: {refusal}")
    existing = _existing_scaling(config)
    if existing is not None:
        raise InputError(f"{where}: the model already has {existing} RoPE scaling; seal-gguf does not stack a "
                         "second context extension on it")
    scaling = scaling.resolved(config, where)
    new = copy.deepcopy(config)
    new["max_position_embeddings"] = scaling.extended_context
    target = _rope_target(new, where)
    if scaling.kind == "ntk":
        theta = (target or {}).get("rope_theta", config.get("rope_theta"))
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise InputError(f"{where}: gives no rope_theta (the RoPE base) to raise for ntk scaling")
        raised = ntk_theta(float(theta), scaling.factor, _rotary_dim(config, target or {}, where))
        if target is not None:
            target["rope_theta"] = raised
        if target is None or "rope_theta" in new:
            new["rope_theta"] = raised
        return new
    if target is None:  # transformers 4 layout: rope_scaling, null when unscaled
        target = new["rope_scaling"] = {}
    target["rope_type"] = scaling.kind
    target["factor"] = float(scaling.factor)
    if scaling.kind == "yarn":
        target["original_max_position_embeddings"] = scaling.original_context
        target["beta_fast"] = YARN_BETA_FAST
        target["beta_slow"] = YARN_BETA_SLOW
        if "original_max_position_embeddings" in new:  # Phi-3 keeps it at the top level, and transformers prefers that
            new["original_max_position_embeddings"] = scaling.original_context
    return new


def _rope_target(config: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The dict (inside config) where transformers 5 keeps the full-attention RoPE parameters; None
    for a transformers 4 config (rope_theta at the top level)."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return None
    if not _is_nested(params):
        return params
    if not isinstance(params.get(FULL_ATTENTION), dict):
        raise InputError(f"{where}: its RoPE parameters are given per layer type ({', '.join(params)}), "
                         f"with none for {FULL_ATTENTION}")
    return params[FULL_ATTENTION]


def transformers_config(config: dict[str, Any], scaling: RopeScaling, where: str = "config.json") -> Any:
    """The transformers config object of the extended model, for from_pretrained(..., config=...)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extended = extend_config(config, scaling, where)
    try:
        return CONFIG_MAPPING[extended["model_type"]].from_dict(extended)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{where}: transformers cannot build the extended config ({exc})") from None


@contextmanager
def extended_model_dir(model_dir: Path, scaling: RopeScaling | None) -> Iterator[Path]:
    """model_dir itself, or (with a scaling) a temporary folder of the same name holding links to
    every file of model_dir and the extended config.json; removed afterwards whatever happens.

    The name is kept because the converter derives the GGUF's general.name from it."""
    if scaling is None:
        yield model_dir
        return
    extended = extend_config(read_config(model_dir), scaling, str(model_dir / "config.json"))
    with tempfile.TemporaryDirectory(prefix="seal-gguf-rope-") as work:
        shadow = Path(work) / model_dir.resolve().name
        shadow.mkdir()
        for entry in model_dir.iterdir():
            if entry.name != "config.json":
                os.symlink(entry.resolve(), shadow / entry.name)
        (shadow / "config.json").write_text(json.dumps(extended, indent=2) + "\n", encoding="utf-8")
        yield shadow


# -- what the GGUF must say --

def expected_gguf_keys(config: dict[str, Any], scaling: RopeScaling) -> dict[str, Any]:
    """The GGUF keys (after the '{arch}.' prefix) that carry the extension, with their values."""
    extended = extend_config(config, scaling)
    scaling = scaling.resolved(config)
    keys: dict[str, Any] = {"context_length": scaling.extended_context}
    if scaling.kind == "ntk":
        target = _rope_target(extended, "config.json")
        keys["rope.freq_base"] = (target or {}).get("rope_theta", extended.get("rope_theta"))
        return keys
    keys["rope.scaling.type"] = scaling.kind
    keys["rope.scaling.factor"] = float(scaling.factor)
    if scaling.kind == "yarn":
        keys["rope.scaling.original_context_length"] = scaling.original_context
        keys["rope.scaling.yarn_beta_fast"] = YARN_BETA_FAST
        keys["rope.scaling.yarn_beta_slow"] = YARN_BETA_SLOW
    return keys


def read_gguf_keys(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """{name: value} for the given '{arch}.'-relative keys that the GGUF has (absent ones left out)."""
    metadata = read_metadata(Path(path))
    arch = metadata.get("general.architecture", "")
    return {name: metadata[f"{arch}.{name}"] for name in names if f"{arch}.{name}" in metadata}


def _same(want: Any, got: Any) -> bool:
    if isinstance(want, float) and isinstance(got, (int, float)):
        return math.isclose(want, float(got), rel_tol=1e-6)  # stored as float32
    return bool(want == got)


def check_gguf_extension(path: Path, config: dict[str, Any], scaling: RopeScaling) -> None:
    """Raise EngineError unless the GGUF carries exactly the extension's keys (some converters write
    their own RoPE keys and drop the scaling: the GGUF would then run unextended)."""
    want = expected_gguf_keys(config, scaling)
    got = read_gguf_keys(path, list(want))
    wrong = [f"{name} = {got.get(name, 'missing')} (expected {value})" for name, value in want.items()
             if not _same(value, got.get(name))]
    if wrong:
        raise EngineError(f"llama.cpp's converter did not write the {scaling} RoPE extension for this "
                          f"architecture: {'; '.join(wrong)}")


def extension_mismatch(recorded: str | None, given: RopeScaling | None) -> str | None:
    """A warning when scales learned under one context extension (recorded in the scales file;
    None: none) are used with another (None: none); None when they agree."""
    try:
        learned = parse_rope_scaling(recorded) if recorded else None
    except InputError:
        return f"the scales file records an unreadable RoPE scaling {recorded!r}; cannot check it against this model"
    if learned is None and given is None:
        return None
    if learned is not None and given is not None:
        same = (learned.kind, learned.factor) == (given.kind, given.factor) and (
            learned.original_context is None or given.original_context is None
            or learned.original_context == given.original_context)
        if same:
            return None
    what = f"under {learned} RoPE scaling" if learned else "without RoPE scaling"
    now = f"with {given}" if given else "without RoPE scaling"
    return (f"the scales were learned {what}, but the model is converted {now}; "
            "they fit the positions they were learned at and may help less there, or hurt")
