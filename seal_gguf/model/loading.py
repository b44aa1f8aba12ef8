"""Loading a model and its tokenizer: one place for transformers' loaders.

An HF folder (safetensors only, never pickles, never remote code) or a GGUF (through transformers'
GGUF reader) becomes a frozen PyTorch model in eval mode, or a tokenizer that splits text exactly
as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from seal_gguf.errors import InputError
from seal_gguf.fileio import GGUF_MAGIC, first_line, gguf_magic, require_gguf
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.model.architectures import (
    ModelLayout,
    attn_implementation,
    layout_from_config,
    read_config,
    transformers_class,
)
from seal_gguf.model.checkpoint import check_not_folded, locate_o_proj, read_headers
from seal_gguf.model.rope import RopeScaling, transformers_config


def is_gguf(path: Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" or (Path(path).is_file() and gguf_magic(Path(path)) == GGUF_MAGIC)


def load_tokenizer(model: Path) -> Any:
    """The transformers tokenizer of a GGUF or an HF model folder (cases are generated with it)."""
    from transformers import AutoTokenizer

    model = Path(model)
    try:
        if is_gguf(model):
            tokenizer = gguf_tokenizer(require_gguf(model))
        else:
            read_config(model)
            tokenizer = AutoTokenizer.from_pretrained(str(model))
    except InputError:
        raise
    except Exception as exc:  # transformers' GGUF reader raises bare struct/index errors on corrupt files
        raise InputError(f"{model}: transformers cannot load its tokenizer ({first_line(exc)})") from None
    check_tokenizer(tokenizer, model)
    return tokenizer


# Text every task generator and runner turns into tokens: words, digits, punctuation, a newline.
TOKENIZER_PROBE = "line swift-river: REGISTER_CONTENT is <31452>.\nThe grass is green. The pass key is 7."
PROBE_MESSAGE = "What is the pass key?"


def check_tokenizer(tokenizer: Any, where: object) -> None:
    """Refuse a tokenizer the generators and runners cannot work with, where it enters (InputError,
    naming the folder): one that turns text into no tokens (or into the unknown token only), gives ids
    outside its vocabulary, has special tokens outside it, or a chat template that fails or drops the
    user's message."""
    try:
        vocab = len(tokenizer)
        ids = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # a tokenizer file that loads but cannot encode
        raise InputError(f"{where}: its tokenizer cannot encode text ({first_line(exc)})") from None
    if vocab <= 0:
        raise InputError(f"{where}: its tokenizer has an empty vocabulary")
    if not ids:
        raise InputError(f"{where}: its tokenizer turns text into no tokens (tokenizer.json without a usable "
                         "vocabulary?); every prompt would be empty: save the model's own tokenizer there")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and all(i == unk for i in ids):
        raise InputError(f"{where}: its tokenizer turns text into the unknown token only ({tokenizer.unk_token!r}); "
                         "save the model's own tokenizer there")
    if any(not 0 <= int(i) < vocab for i in ids):
        raise InputError(f"{where}: its tokenizer gives token ids outside its vocabulary of {vocab}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not 0 <= value < vocab:
            raise InputError(f"{where}: its tokenizer's {name} {value} lies outside its vocabulary of {vocab}")
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_MESSAGE}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
        except Exception as exc:  # jinja2 errors, or a template that raises on purpose
            raise InputError(f"{where}: its chat template fails on a user message ({first_line(exc)})") from None
        if not isinstance(text, str) or PROBE_MESSAGE not in text:
            raise InputError(f"{where}: its chat template drops the user's message; fix chat_template in "
                             "tokenizer_config.json (or chat_template.jinja)")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No weight-loading bar from transformers: the evaluation's own bar is the one to watch."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()




# llama.cpp pre-tokenizers (tokenizer.ggml.pre) whose digit splitting transformers' GGUF import
# drops: without it the two engines tokenize every number differently.
SPLITS_DIGITS = ("smollm",)


def gguf_tokenizer(gguf_path: Path) -> Any:
    """The transformers tokenizer of a GGUF, splitting text exactly as llama.cpp does. Raises InputError
    for a file whose header does not read or a split GGUF's later part (read_metadata)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    metadata = read_metadata(gguf_path)  # before transformers, whose errors would not name the cause
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if metadata.get("tokenizer.ggml.pre") in SPLITS_DIGITS:
        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
        )
    return tokenizer




DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "mps")
def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (device == "cuda" and not cuda) or (device == "mps" and not mps):
        raise InputError(f"--device {device}: not available on this machine (this PyTorch build sees no {device})")
    return torch.device(device)


def load_model(model_dir: Path, device: torch.device, dtype: str, progress: bool = True,
               rope: RopeScaling | None = None, device_map: dict[str, str] | None = None,
               offload_folder: Path | None = None, folded_ok: bool = False) -> tuple[Any, ModelLayout]:
    """The model frozen, in eval mode, with SDPA attention (eager where transformers has no SDPA for the
    architecture; its context extended by rope, if given) and its head layout. With a device map
    (module -> cuda:N, mps, cpu or disk; see seal_gguf.learn.plan) accelerate dispatches the layers and
    `device` is where the inputs go. The one loader of HF
    checkpoints: safetensors only (never pickles), never remote code.

    folded_ok: a checkpoint with scales folded in is run as it is (validate, eval); otherwise it is
    refused (AlreadyFoldedError), since scales learned or applied on top would describe neither model.
    Raises InputError for a folder transformers cannot load."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = read_config(model_dir)
    layout = layout_from_config(config, model_dir / "config.json")
    check_not_folded(config, str(model_dir), force=folded_ok, remedy="use the original, unfolded model")
    # pickled-only, truncated or corrupt weights, or weights that do not fit config.json: refused
    # before transformers loads them
    locate_o_proj(read_headers(model_dir), layout)
    extra: dict[str, Any] = {} if rope is None else {"config": transformers_config(config, rope, str(model_dir / "config.json"))}
    if device_map is not None:
        extra |= {"device_map": accelerate_device_map(device_map), "offload_folder": str(offload_folder)}
    try:
        with nullcontext() if progress else quiet_transformers():
            model: Any = transformers_class(layout.model_type).from_pretrained(
                str(model_dir), dtype=DTYPES[dtype], attn_implementation=attn_implementation(layout.model_type),
                use_safetensors=True, **extra
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0]})") from None
    model.requires_grad_(False)
    model.config.use_cache = False
    return (model if device_map is not None else model.to(device)).eval(), layout




def accelerate_device_map(device_map: dict[str, str]) -> dict[str, int | str]:
    """Our device names in the form transformers' from_pretrained takes (GPU indices as ints)."""
    return {module: int(device.split(":")[1]) if device.startswith("cuda:") else device
            for module, device in device_map.items()}


