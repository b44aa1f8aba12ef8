"""A GGUF (any type transformers can read) becomes a plain HF checkpoint, dequantized."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError
from .fileio import atomic_dir, require_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", force: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = require_file(Path(gguf_path), "GGUF file")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{gguf_path}: not a GGUF file (bad magic)")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{gguf_path}: transformers cannot read this GGUF ({first})") from None
    # transformers refuses save_pretrained on a model that carries a quantization config:
    # rebuild a plain model of the same class and move the dequantized weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    with atomic_dir(Path(out_dir), force=force) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
