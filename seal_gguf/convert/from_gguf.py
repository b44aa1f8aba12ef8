"""A GGUF (any type transformers can read) becomes a plain HF checkpoint, dequantized."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from seal_gguf.constants import CONFIG_FOLD_KEY, GGUFKeys
from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_dir, check_output_path, first_line, require_gguf
from seal_gguf.gguffile.metadata import gguf_seal_metadata
from seal_gguf.model.loading import gguf_tokenizer

IMPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", force: bool = False,
                progress: bool = True) -> Path:
    from transformers import AutoModelForCausalLM

    from seal_gguf.model.loading import quiet_transformers  # runners imports this module

    gguf_path = require_gguf(Path(gguf_path))
    check_output_path(Path(out_dir), force, folder=True)  # before the minutes of loading, not after
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with nullcontext() if progress else quiet_transformers():  # transformers' own bars
            tokenizer = gguf_tokenizer(gguf_path)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=IMPORT_DTYPES[dtype])
    except Exception as exc:  # transformers' GGUF reader raises bare struct/index errors on corrupt files
        raise InputError(f"{gguf_path}: transformers cannot read this GGUF ({first_line(exc)})") from None
    # transformers refuses save_pretrained on a model that carries a quantization config:
    # rebuild a plain model of the same class and move the dequantized weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    seal = gguf_seal_metadata(gguf_path)
    if GGUFKeys.SCALES_SHA256 in seal:
        # the weights hold folded scales: recorded so that fold, train and validate refuse the import
        setattr(config, CONFIG_FOLD_KEY, {"granularity": seal.get(GGUFKeys.GRANULARITY),
                                          "scales_sha256": seal[GGUFKeys.SCALES_SHA256],
                                          "seal_gguf_version": seal.get(GGUFKeys.VERSION)})
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    with atomic_dir(Path(out_dir), force=force) as tmp, nullcontext() if progress else quiet_transformers():
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
