"""Opening a GGUF in llama.cpp (llama-cpp-python): the one place that constructs `Llama`, with one
error mapping (load_error: a file llama.cpp cannot load is an InputError naming it).

Two ways to run a model:
- generating (eval, chat): llama.cpp's own defaults, flash attention as its tools use it;
- measuring logits (validate, the general-text cost, tokenization checks): the KV cache in f32 and
  the whole context in one batch, so that the figures measure the weights, not the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seal_gguf.constants import FLASH_ATTENTION
from seal_gguf.errors import InputError
from seal_gguf.fileio import first_line

GGML_TYPE_F32 = 0  # ggml's type id of f32, for the KV cache of exact runs


def load_llama(path: Path, n_ctx: int, *, exact: bool = False, logits_all: bool = False, threads: int | None = None,
               gpu: bool = False, seed: int | None = None) -> Any:
    """A llama_cpp.Llama over the GGUF at `path` with a context of n_ctx tokens (0: the model's own).

    exact: f32 KV cache, n_batch = n_ctx, swa_full off (one sequence gives the same results); for
    comparing logits. logits_all: keep the logits of every position (the vocabulary-wide output layer
    then runs at every prompt position: only for measuring). threads: CPU threads (None: llama.cpp's
    default); gpu: offload every layer; seed: the sampling seed (chat).
    Raises InputError when llama.cpp cannot load the file.
    """
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"n_ctx": n_ctx, "logits_all": logits_all, "verbose": False,
                              "n_gpu_layers": -1 if gpu else 0, "n_threads": threads, "n_threads_batch": threads}
    if exact:
        # Not vocab_only even for tokenizing: it makes llama.cpp log warnings on stderr.
        kwargs |= {"n_batch": n_ctx, "type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32, "swa_full": False}
    else:
        kwargs |= {"flash_attn": FLASH_ATTENTION}
    if seed is not None:
        kwargs["seed"] = seed
    try:
        return Llama(str(path), **kwargs)
    except (ValueError, RuntimeError, OSError) as exc:
        raise load_error(path, exc) from None


def load_error(path: Path, exc: BaseException) -> InputError:
    """The error for a GGUF that llama.cpp failed to load with `exc`: for a split GGUF given by a part other
    than the first, or whose parts are missing or from different splits, what read_gguf_parts says, and
    for a file whose header does not read, what the header reader says (llama.cpp only says that it
    failed); else llama.cpp's own reason."""
    from seal_gguf.gguffile.header import read_gguf_header  # imports gguf
    from seal_gguf.gguffile.split import SPLIT_PREFIX, read_gguf_parts

    cannot = InputError(f"{path}: llama.cpp cannot load this GGUF ({first_line(exc)})")
    try:
        header, _ = read_gguf_header(Path(path))
    except InputError as unreadable:  # not even its header reads: say where (llama.cpp only says it failed)
        return unreadable
    if not any(key.startswith(SPLIT_PREFIX) for key in header.kv):
        return cannot
    try:
        read_gguf_parts(Path(path))
    except InputError as found:
        return found
    return cannot


@contextmanager
def open_llama(path: Path, n_ctx: int, logits_all: bool = True) -> Iterator[Any]:
    """load_llama(..., exact=True) for the duration of a `with` block, closed afterwards."""
    llm = load_llama(path, n_ctx, exact=True, logits_all=logits_all)
    try:
        yield llm
    finally:
        llm.close()
