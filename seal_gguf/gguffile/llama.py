"""Opening a GGUF in llama.cpp (llama-cpp-python), with one error mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError

# HF model_type -> the general.architecture llama.cpp's converter writes for it.
GGML_TYPE_F32 = 0  # KV cache in f32: the figures then measure the weights, not the cache
@contextmanager
def open_llama(path: Path, n_ctx: int, logits_all: bool = True) -> Iterator[Any]:
    # Not vocab_only even for tokenizing, and swa_full off (same results for one sequence): either
    # makes llama.cpp log warnings on stderr.
    from llama_cpp import Llama

    try:
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                    type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, swa_full=False, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"{path}: llama.cpp cannot load this GGUF ({str(exc).strip() or type(exc).__name__})") from None
    try:
        yield llm
    finally:
        llm.close()


