"""seal-gguf: learn SEAL attention scales, fold them into the weights, ship an ordinary GGUF.

The public verbs, one per pipeline step (each is also a `seal-gguf` command):

    layout = model_layout("model/")                       # heads, head_dim, o_proj names (config.json)
    result = train_scales("model/", granularity="head")   # learn       (seal_gguf.learn)
    save_scales("scales.safetensors", result.scales, layout, "head", result.provenance)
    scales = load_scales("scales.safetensors", layout)    # read + check against the model
    fold_checkpoint("model/", "scales.safetensors", "folded/")             # fold   (seal_gguf.fold)
    convert_to_gguf("model/", "seal-q8_0.gguf", "q8_0", "scales.safetensors")  # llama.cpp (seal_gguf.convert)
    fold_gguf("base-q8_0.gguf", "scales.safetensors", "seal-q8_0.gguf")
    quantize("seal-f16.gguf", "seal-q4_k_m.gguf", "q4_k_m")
    import_gguf("model.Q4_1.gguf", "model/")
    report = validate("model/", "scales.safetensors", ["seal-q8_0.gguf"])   # measure (seal_gguf.measure)
    report = evaluate(["base.gguf", "seal.gguf"], "lines", [1024], 20, seed=0)
    with attach_scales(model, layout, scales.values): ...                  # hooks in PyTorch

Errors are the types in seal_gguf.errors (all subclasses of SealError): one line that names the
file and the remedy. Names are imported on first use, so `import seal_gguf` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SealError": "seal_gguf.errors",
    "SealScales": "seal_gguf.scales",
    "load_scales": "seal_gguf.scales",
    "read_scales": "seal_gguf.scales",
    "save_scales": "seal_gguf.scales",
    "model_layout": "seal_gguf.model.architectures",
    "attach_scales": "seal_gguf.model.hooks",
    "train_scales": "seal_gguf.learn.train",
    "fold_checkpoint": "seal_gguf.fold.hf",
    "fold_gguf": "seal_gguf.fold.gguf",
    "convert_to_gguf": "seal_gguf.convert.to_gguf",
    "quantize": "seal_gguf.convert.quantize",
    "import_gguf": "seal_gguf.convert.from_gguf",
    "validate": "seal_gguf.measure.validate",
    "evaluate": "seal_gguf.measure.evaluate",
}
__all__ = [
    "SealError", "SealScales", "__version__", "attach_scales", "convert_to_gguf", "evaluate", "fold_checkpoint",
    "fold_gguf", "import_gguf", "load_scales", "model_layout", "quantize", "read_scales", "save_scales",
    "train_scales", "validate",
]

if TYPE_CHECKING:
    from seal_gguf.convert.from_gguf import import_gguf
    from seal_gguf.convert.quantize import quantize
    from seal_gguf.convert.to_gguf import convert_to_gguf
    from seal_gguf.errors import SealError
    from seal_gguf.fold.gguf import fold_gguf
    from seal_gguf.fold.hf import fold_checkpoint
    from seal_gguf.learn.train import train_scales
    from seal_gguf.measure.evaluate import evaluate
    from seal_gguf.measure.validate import validate
    from seal_gguf.model.architectures import model_layout
    from seal_gguf.model.hooks import attach_scales
    from seal_gguf.scales import SealScales, load_scales, read_scales, save_scales


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'seal_gguf' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
