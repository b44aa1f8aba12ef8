"""How much memory a training step needs, and where the layers go: `seal-gguf plan` and
`seal-gguf train --device-map auto`.

Only the scales train, so a step holds: the frozen weights (in the training dtype); the saved
activations (without gradient checkpointing: every layer's; with it: every layer's input plus
one layer's activations, recomputed during its backward); one layer's transient gradient
buffers; and small change (answer logits, scales, AdamW state). The per-token activation terms
count what PyTorch saves for backward in a llama-style decoder layer (measured with
saved-tensor hooks on SmolLM2): per layer and token, 2 hidden-size vectors (float32: the norms
upcast), q and the attention output (2·H·d), k and v (2·KV·d), 3 MLP-width vectors, and H softmax
plus 2 norm statistics (float32).
Attention is assumed to run in SDPA's flash / memory-efficient kernels (CUDA, and CPU), whose
working set grows with T, not T²; the plan also states what the T² math kernel would add.

Placement is layer-wise (only the scales train, so no layer needs to be split): layers fill the
devices in order, each device keeping room for the activations of its own layers; layers that
fit on no accelerator go to CPU RAM, then to disk (offloaded: they run on the first device).
The resulting device map is passed to transformers / accelerate, which do the dispatching.

The estimates describe live tensors. On CPU, glibc's heap may keep freed blocks for reuse, so RSS
can read higher than what is live: `measure_step` (`plan --measure`) therefore fixes malloc's
mmap threshold (MALLOC_MMAP_THRESHOLD_) in the process it measures, so that freed tensors leave RSS.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError
from seal_gguf.model.architectures import (
    ModelLayout,
    arch_specs,
    layout_from_config,
    read_config,
    text_config,
    transformers_class,
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
DISK = "disk"
CPU = "cpu"
# Headroom kept free on each device when --device-map auto reads free memory itself:
# CUDA's context and caching allocator, and everything else on the machine, live there.
AUTO_HEADROOM = 0.10
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# -- the model's shape, without loading weights --

@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model: its head layout, widths and parameter counts."""

    layout: ModelLayout
    hidden: int
    intermediate: int
    num_kv_heads: int
    vocab: int
    layer_params: tuple[int, ...]  # parameters of each decoder layer
    other_params: dict[str, int]  # the modules outside the decoder layers (embeddings, norm, lm_head, ...)
    tied_embeddings: bool

    @property
    def params(self) -> int:
        return sum(self.layer_params) + sum(self.other_params.values())


def _int(config: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or value <= 0:
        raise InputError(f"{where}: needs a positive integer {key}, found {value!r}")
    return value


def model_shape(model_dir: Path) -> ModelShape:
    """The shape of the model in model_dir from its config.json alone: transformers builds it on
    the meta device (no weights are read, so a folder with only config.json will do)."""
    import torch
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    where = str(model_dir / "config.json")
    layout = layout_from_config(config, where)
    spec = arch_specs()[layout.model_type]
    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = transformers_class(layout.model_type).from_config(hf_config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where}: transformers cannot build this model ({str(exc).splitlines()[0]})") from None
    layers_prefix = layout.layers_prefix
    counts: dict[str, int] = {}
    seen: set[int] = set()
    # every module that holds a weight needs a device, tied ones too; their weights count once
    for name, param in model.named_parameters(remove_duplicate=False):
        unit = _placement_unit(name, layers_prefix)
        counts[unit] = counts.get(unit, 0) + (0 if id(param) in seen else param.numel())
        seen.add(id(param))
    for name, _ in model.named_buffers():
        counts.setdefault(_placement_unit(name, layers_prefix), 0)
    layer_params = tuple(counts.pop(layout.layer_module(i), 0) for i in range(layout.num_layers))
    tied = bool(getattr(hf_config.get_text_config(), "tie_word_embeddings", False))
    config = text_config(config, spec)  # a multimodal checkpoint's text model
    return ModelShape(
        layout=layout,
        hidden=_int(config, spec.hidden_size, where),
        intermediate=_int(config, "intermediate_size", where),
        num_kv_heads=_int(config, spec.num_kv_heads, where, default=layout.num_heads),
        vocab=_int(config, "vocab_size", where),
        layer_params=layer_params,
        other_params=counts,
        tied_embeddings=tied,
    )


def _placement_unit(name: str, layers_prefix: str) -> str:
    """The device-map entry a parameter belongs to: its decoder layer, or the module beside the
    path to the layers (model.embed_tokens, model.norm, lm_head, ...)."""
    if name.startswith(layers_prefix + "."):
        return ".".join(name.split(".")[: layers_prefix.count(".") + 2])
    path = layers_prefix.split(".")
    parts = name.split(".")
    depth = 0
    while depth < len(path) and depth < len(parts) - 1 and parts[depth] == path[depth]:
        depth += 1
    return ".".join(parts[: depth + 1])


# -- the estimate --

@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step needs, by part; `total` is the estimated peak."""

    length: int
    dtype: str
    checkpointing: bool
    weights: int
    layer_inputs: int  # every layer's input, kept by checkpointing (0 without it)
    activations: int  # saved for backward: one layer's with checkpointing, all layers' without
    backward: int  # one layer's transient gradient buffers
    extras: int  # answer logits, scales, their gradient and AdamW state
    math_attention: int  # what the T² math kernel would add (not in total)

    @property
    def total(self) -> int:
        return self.weights + self.layer_inputs + self.activations + self.backward + self.extras


def layer_activation_bytes(shape: ModelShape, length: int, dtype: str) -> int:
    """What one decoder layer saves for backward over `length` tokens."""
    layout = shape.layout
    in_dtype = 2 * layout.attn_width + 2 * shape.num_kv_heads * layout.head_dim + 3 * shape.intermediate
    in_float32 = 2 * shape.hidden + layout.num_heads + 2  # RMSNorm computes in float32, softmax statistics too
    return (in_dtype * DTYPE_BYTES[dtype] + in_float32 * 4) * length


def backward_bytes(shape: ModelShape, length: int, dtype: str) -> int:
    """Transient gradients while one layer runs backward: MLP-width and hidden-width buffers."""
    return (2 * shape.intermediate + 2 * shape.hidden) * length * DTYPE_BYTES[dtype]


def extras_bytes(shape: ModelShape, answer_tokens: int, granularity: str) -> int:
    logits = 3 * answer_tokens * shape.vocab * 4  # float32 logits, their softmax and gradient
    layout = shape.layout
    scales = layout.num_layers * layout.num_heads * (layout.head_dim if granularity == "channel" else 1)
    return logits + 4 * scales * 4  # scales, gradient, AdamW's two moments: float32


def estimate_step(shape: ModelShape, length: int, dtype: str = "float32", checkpointing: bool = True,
                  granularity: str = "head", answer_tokens: int = 16) -> StepMemory:
    """The peak memory of one training step on one device (pure arithmetic on the shape)."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    if length < 1:
        raise InputError(f"length must be >= 1, not {length}")
    b = DTYPE_BYTES[dtype]
    layers = shape.layout.num_layers
    per_layer = layer_activation_bytes(shape, length, dtype)
    return StepMemory(
        length=length,
        dtype=dtype,
        checkpointing=checkpointing,
        weights=shape.params * b,
        layer_inputs=layers * length * shape.hidden * b if checkpointing else 0,
        activations=per_layer if checkpointing else layers * per_layer,
        backward=backward_bytes(shape, length, dtype),
        extras=extras_bytes(shape, answer_tokens, granularity),
        math_attention=shape.layout.num_heads * length * length * b * (1 if checkpointing else layers),
    )


# -- placement --

def parse_size(text: str) -> int:
    """'80GiB', '70GB', '512MiB', '1e9' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise InputError(f"cannot read the memory size {text!r}; write e.g. 80GiB, 70GB or 512MiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def parse_max_memory(spec: str) -> dict[str, int]:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {'cuda:0': ..., 'cuda:1': ..., 'cpu': ...}, in that order."""
    budgets: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        device, sep, size = item.partition("=")
        device = device.strip().lower()
        if not sep:
            raise InputError(f"--max-memory: {item!r} is not DEVICE=SIZE (e.g. 0=70GiB or cpu=200GiB)")
        if device.isdigit():
            device = f"cuda:{device}"
        if not (device in (CPU, "mps") or re.fullmatch(r"cuda:\d+", device)):
            raise InputError(f"--max-memory: unknown device {device!r}; use a GPU index, mps or cpu")
        budgets[device] = parse_size(size)
    if not budgets:
        raise InputError("--max-memory is empty; write e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    return budgets


def available_memory(headroom: float = AUTO_HEADROOM) -> dict[str, int]:
    """Free memory of every visible GPU (or MPS), then of the CPU, less `headroom`."""
    import torch

    budgets: dict[str, int] = {}
    for index in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(index)
        budgets[f"cuda:{index}"] = int(free * (1 - headroom))
    if not budgets and torch.backends.mps.is_available():
        budgets["mps"] = int(torch.mps.recommended_max_memory() * (1 - headroom))
    budgets[CPU] = int(_available_ram() * (1 - headroom))
    return budgets


def _available_ram() -> int:
    """MemAvailable on Linux (free memory plus the page cache the kernel can drop), else free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class DeviceLoad:
    device: str
    budget: int | None  # None: unbounded (disk)
    layers: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    weights: int = 0
    peak: int = 0  # estimated peak on this device (0 on disk and for CPU RAM that only stores offloaded weights)


@dataclass
class Placement:
    step: StepMemory
    loads: list[DeviceLoad]
    device_map: dict[str, str]  # module path -> device (cuda:N, mps, cpu or disk)
    execution_device: str  # where offloaded layers run and where the inputs go

    @property
    def offloaded(self) -> bool:
        """Do some modules run on the execution device from weights kept in CPU RAM or on disk?"""
        return any(load.modules and (load.device == DISK or (load.device == CPU and self.execution_device != CPU))
                   for load in self.loads)


def place_layers(shape: ModelShape, step: StepMemory, budgets: dict[str, int]) -> Placement:
    """Fill the devices in order with whole decoder layers, each device keeping room for its own
    layers' inputs (checkpointing) or activations, one layer's recomputation and its backward.
    Modules outside the layers go with the first layer (embeddings) or the last (final norm,
    lm_head; with the embeddings when the two are tied). What fits nowhere goes to disk.
    Offloaded layers run on the execution device, so it keeps room for their activations and one
    layer's weights: the placement is redone with that reserve until it holds."""
    # accelerators first, in the order given: the first one runs offloaded layers and takes the inputs
    budgets = {d: budgets[d] for d in sorted(budgets, key=lambda d: d in (CPU, DISK))}
    reserve = 0
    while True:
        placement, offload_demand = _fill(shape, step, budgets, reserve)
        if offload_demand <= reserve:
            break
        reserve = offload_demand
    peak = placement.loads[0].peak  # the execution device's
    if peak > budgets[placement.execution_device]:
        raise InputError(
            f"does not fit: {placement.execution_device} needs ~{peak / 2**30:.2f} GiB for this step even with "
            f"layers offloaded, and has {budgets[placement.execution_device] / 2**30:.2f} GiB; use a shorter "
            "--length, bfloat16, gradient checkpointing, or more devices")
    return placement


def _fill(shape: ModelShape, step: StepMemory, budgets: dict[str, int], reserve: int) -> tuple[Placement, int]:
    """One greedy pass with `reserve` bytes kept free on the execution device; also returns what
    the offloaded layers of this pass need there."""
    b = DTYPE_BYTES[step.dtype]
    layers = shape.layout.num_layers
    per_layer_kept = (step.layer_inputs if step.checkpointing else step.activations) // layers
    working = (step.activations if step.checkpointing else 0) + step.backward + step.extras
    accelerators = [d for d in budgets if d not in (CPU, DISK)]
    execution = accelerators[0] if accelerators else CPU
    loads = [DeviceLoad(d, budgets[d]) for d in budgets if d != DISK] + [DeviceLoad(DISK, None)]
    loads[0].peak = reserve + working  # the execution device runs layers whatever else it holds

    def offload(load: DeviceLoad) -> bool:
        """Does this device only store weights for layers that run elsewhere?"""
        return load.device == DISK or (load.device == CPU and execution != CPU)

    def fits(load: DeviceLoad, extra_weights: int, extra_kept: int) -> bool:
        if load.budget is None:
            return True
        if offload(load):
            return load.weights + extra_weights <= load.budget
        return load.weights + extra_weights + load.peak + extra_kept <= load.budget

    others = {name: n * b for name, n in shape.other_params.items()}
    head_names = [n for n in others if n.endswith("lm_head") or n.split(".")[-1] == "norm"]
    if shape.tied_embeddings:
        head_names = [n for n in head_names if not n.endswith("lm_head")]
    lead_names = [n for n in others if n not in head_names]
    current = 0
    offloaded: list[tuple[int, bool]] = []  # (weight bytes, is a layer) of what runs from CPU RAM or disk

    def put(names: list[str], weight: int, kept: int, layer: int | None = None) -> None:
        nonlocal current

        def needs(load: DeviceLoad) -> int:  # a device's first layer brings the working set along
            return kept + (working if layer is not None and not load.layers and load is not loads[0] else 0)

        while not fits(loads[current], weight, needs(loads[current])):
            current += 1
        load = loads[current]
        kept = needs(load)
        load.modules += names
        load.weights += weight
        if layer is not None:
            load.layers.append(layer)
        if not offload(load):
            load.peak += kept
        elif names:
            offloaded.append((weight, layer is not None))

    put(lead_names, sum(others[n] for n in lead_names), 0)
    for layer in range(layers):
        put([shape.layout.layer_module(layer)], shape.layer_params[layer] * b, per_layer_kept, layer)
    put(head_names, sum(others[n] for n in head_names), 0)
    # the offloaded layers' kept activations, and one offloaded module's weights at a time
    demand = sum(is_layer for _, is_layer in offloaded) * per_layer_kept + max((w for w, _ in offloaded), default=0)
    loads[0].peak += demand - reserve
    for load in loads:
        if not offload(load) and load.modules:
            load.peak += load.weights
    device_map = {module: load.device for load in loads for module in load.modules}
    return Placement(step=step, loads=[load for load in loads if load.modules or load is loads[0]], device_map=device_map,
                     execution_device=execution), demand


def read_device_map(path: Path) -> dict[str, str]:
    """A device map written by `seal-gguf plan --write-device-map` (or by hand): module -> device."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such device-map file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON device map ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f'{path}: expected a JSON object like {{"model.layers.0": "cuda:0", ...}}')
    out: dict[str, str] = {}
    for module, device in raw.items():
        device = f"cuda:{device}" if isinstance(device, int) else str(device).lower()
        if not (device in (CPU, DISK, "mps") or re.fullmatch(r"cuda:\d+", device)):
            raise InputError(f"{path}: {module}: unknown device {device!r}")
        out[str(module)] = device
    return out
