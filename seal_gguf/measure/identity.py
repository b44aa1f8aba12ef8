"""Is this GGUF the model being validated? Checks done before any logits are computed: shape,
SEAL provenance, context extension and tokenization, from llama.cpp's own view of the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal_gguf.constants import GGUF_SEAL_PREFIX, GGUFKeys
from seal_gguf.errors import InputError
from seal_gguf.fileio import require_gguf
from seal_gguf.gguffile.header import read_model_header, string_array
from seal_gguf.gguffile.llama import open_llama
from seal_gguf.gguffile.metadata import TOKENS_KEY, file_type_name
from seal_gguf.model.architectures import ModelLayout
from seal_gguf.model.rope import RopeScaling, expected_gguf_keys
from seal_gguf.scales import SealScales
from seal_gguf.texts import Document

MIN_CTX = 16

# Float metadata is compared to this relative precision (stored as float32; llama.cpp prints 6 decimals).
METADATA_REL_TOL = 1e-5
CONTEXT_LENGTH_KEY = "context_length"  # after the '{arch}.' prefix, as rope.expected_gguf_keys names it
ROPE_KEY_PREFIX = "rope."


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    architecture: str
    file_type: str  # f32, f16, bf16, q8_0, q4_k_m, ...
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    head_dim: int | None
    embedding_length: int | None
    vocab_size: int
    seal: dict[str, str]
    rope_keys: dict[str, str]  # context_length and rope.* (after the '{arch}.' prefix): the context extension


def gguf_info(path: Path, metadata: dict[str, str], n_vocab: int) -> GGUFInfo:
    """The figures that identify a model, from a GGUF's metadata as text (as llama.cpp reports it)."""
    arch = metadata.get("general.architecture", "")

    def number(key: str) -> int | None:
        value = metadata.get(key, "")
        return int(value) if value.isdigit() else None  # absent, or a per-layer array: not compared

    return GGUFInfo(
        path=str(path), architecture=arch, file_type=file_type_name(number("general.file_type")),
        block_count=number(f"{arch}.block_count"), head_count=number(f"{arch}.attention.head_count"),
        head_count_kv=number(f"{arch}.attention.head_count_kv"), head_dim=number(f"{arch}.attention.key_length"),
        embedding_length=number(f"{arch}.embedding_length"), vocab_size=n_vocab,
        seal={k: v for k, v in metadata.items() if k.startswith(GGUF_SEAL_PREFIX)},
        rope_keys={name: v for k, v in metadata.items() if k.startswith(f"{arch}.")
                   and ((name := k.removeprefix(f"{arch}.")) == CONTEXT_LENGTH_KEY or name.startswith(ROPE_KEY_PREFIX))},
    )


def read_gguf_info(path: Path) -> GGUFInfo:
    """The identifying figures of a GGUF, from its header (seal_gguf.gguffile.header), with every
    value given as text the way llama.cpp's metadata does (arrays left out)."""
    path = require_gguf(Path(path))
    header, raw = read_model_header(path)
    metadata = {key: _as_text(entry.value) for key, entry in header.kv.items()
                if entry.value is not None and not isinstance(entry.value, list)}
    tokens = header.kv.get(TOKENS_KEY)
    return gguf_info(path, metadata, len(string_array(raw, tokens)) if tokens is not None else 0)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def check_same_model(info: GGUFInfo, config: dict[str, Any], layout: ModelLayout, model_dir: Path) -> None:
    """Refuse a GGUF whose architecture or shape differs from the HF model's."""
    allowed = layout.gguf_architectures
    if info.architecture not in allowed:
        raise InputError(
            f"{info.path} is not a GGUF of {model_dir}: its architecture is {info.architecture!r}, "
            f"a {layout.model_type} model converts to {' or '.join(repr(a) for a in allowed)}"
        )
    want = {
        "layers": (info.block_count, layout.num_layers),
        "attention heads": (info.head_count, layout.num_heads),
        "KV heads": (info.head_count_kv, config.get("num_key_value_heads", layout.num_heads)),
        "head size": (info.head_dim, layout.head_dim),
        "hidden size": (info.embedding_length, config.get("hidden_size")),
        "vocabulary": (info.vocab_size, config.get("vocab_size")),
    }
    wrong = [f"{what} {got} vs {expected}" for what, (got, expected) in want.items()
             if got is not None and expected is not None and got != expected]
    if wrong:
        raise InputError(f"{info.path} is not a GGUF of {model_dir} (GGUF vs config.json: {', '.join(wrong)})")


def seal_warnings(info: GGUFInfo, scales: SealScales | None) -> list[str]:
    """What the GGUF's seal.* keys say about the scales folded into it (the figures decide)."""
    name = Path(info.path).name
    if scales is None:
        if info.seal:
            return [f"{name} carries SEAL scales (seal.* keys) but is given as a base GGUF"]
        return []
    if not info.seal:
        return [f"{name} has no seal.* keys: it does not record which scales were folded into it"]
    recorded = info.seal.get(GGUFKeys.SCALES_SHA256)
    if recorded and scales.sha256 and recorded != scales.sha256:
        return [f"{name} records scales sha256 {str(recorded)[:12]}..., the scales file is {scales.sha256[:12]}..."]
    return []


def _same_value(want: Any, text: str | None) -> bool:
    if text is None:
        return False
    try:
        if isinstance(want, float):
            return math.isclose(want, float(text), rel_tol=METADATA_REL_TOL)
        if isinstance(want, int):
            return int(text) == want
    except ValueError:
        return False
    return text == str(want)


def extension_differences(info: GGUFInfo, config: dict[str, Any], scaling: RopeScaling) -> list[str]:
    """'key = value (expected ...)' for each key the GGUF of the model extended by `scaling` has and
    this GGUF lacks or gives another value."""
    want = expected_gguf_keys(config, scaling)
    return [f"{name} = {info.rope_keys.get(name, 'missing')} (expected {value})" for name, value in want.items()
            if not _same_value(value, info.rope_keys.get(name))]


def stretched_context(info: GGUFInfo, config: dict[str, Any]) -> tuple[int, int] | None:
    """(GGUF context_length, config max_position_embeddings) when the GGUF's is the longer: every
    extension stretches it. The scaling keys alone say nothing (a model whose own config is scaled
    converts with them)."""
    native, context = config.get("max_position_embeddings"), info.rope_keys.get(CONTEXT_LENGTH_KEY, "")
    if isinstance(native, int) and context.isdigit() and int(context) > native:
        return int(context), native
    return None


def carried_extension(info: GGUFInfo, config: dict[str, Any]) -> RopeScaling | None:
    """The extension this model was converted with to give the GGUF's keys; None when it has none,
    or none that --rope-scaling options reproduce."""
    stretched = stretched_context(info, config)
    if stretched is None:
        return None
    context, native = stretched
    kind = info.rope_keys.get("rope.scaling.type")
    try:
        if kind in ("linear", "yarn"):
            factor = float(info.rope_keys.get("rope.scaling.factor", "nan"))
            original = info.rope_keys.get("rope.scaling.original_context_length")
            candidate = RopeScaling(kind, factor, int(original) if original else round(context / factor))
        else:  # ntk leaves no type: only the longer context and the raised base tell
            candidate = RopeScaling("ntk", context / native, native)
        return None if extension_differences(info, config, candidate) else candidate
    except (InputError, ValueError):  # no valid factor, or a model that cannot take this extension
        return None


def rope_option_text(scaling: RopeScaling, config: dict[str, Any]) -> str:
    """The command-line options that give `scaling` for this model."""
    text = f"--rope-scaling {scaling.kind} --rope-factor {scaling.factor:g}"
    if scaling.original_context != config.get("max_position_embeddings"):
        text += f" --rope-original-context {scaling.original_context}"
    return text


def check_extension(info: GGUFInfo, config: dict[str, Any], rope: RopeScaling | None) -> None:
    """Refuse a GGUF whose context extension is not `rope` (None: the model's own context): llama.cpp
    runs a GGUF with the extension its metadata carries, and the reference must be that model."""
    name = Path(info.path).name
    carried = carried_extension(info, config)
    stretched = stretched_context(info, config)
    if rope is None:
        if stretched is None:
            return
        how = (f"pass {rope_option_text(carried, config)}" if carried is not None
               else "pass the --rope-scaling options it was converted with")
        raise InputError(f"{name} carries a RoPE context extension (context_length {stretched[0]}, the model's "
                         f"max_position_embeddings {stretched[1]}); validate it against the model extended the "
                         f"same way: {how}")
    wrong = extension_differences(info, config, rope)
    if wrong:
        was = (f"; it was converted with {rope_option_text(carried, config)}" if carried is not None
               else "; it was converted without --rope-scaling" if stretched is None else "")
        raise InputError(f"{name} does not carry the {rope} RoPE context extension given ({'; '.join(wrong)}){was}")


def first_token_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """Index of the first position where a and b (token ids, or token texts) differ, or where one ends;
    None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _token_texts(decode: Any, ids: Sequence[int]) -> str:
    return " ".join(repr(decode(i)) for i in ids)


def tokenization_difference(path: Path, tokenizer: Any, documents: Sequence[Document],
                            hf_ids: Sequence[list[int]], hf_prefix: list[int]) -> str | None:
    """Where llama.cpp turns the text into other ids than transformers (first difference), or None."""
    with open_llama(path, n_ctx=MIN_CTX, logits_all=False) as llm:
        def llama_text(i: int) -> str:
            return llm.detokenize([i], special=True).decode("utf-8", errors="replace")

        def hf_text(i: int) -> str:
            return tokenizer.decode([i])

        llama_prefix = llm.tokenize(b"", add_bos=True, special=True)
        if llama_prefix != hf_prefix:
            return (f"{path.name}: llama.cpp starts every text with {llama_prefix} "
                    f"({_token_texts(llama_text, llama_prefix) or 'nothing'}), transformers with {hf_prefix} "
                    f"({_token_texts(hf_text, hf_prefix) or 'nothing'}): the GGUF's BOS setting is not the model's")
        for doc, ids in zip(documents, hf_ids, strict=True):
            theirs = llm.tokenize(doc.text.encode("utf-8"), add_bos=False, special=True)
            at = first_token_difference(ids, theirs)
            if at is not None:
                lo = max(0, at - 3)
                return (f"{path.name}: llama.cpp tokenizes {doc.name} differently from transformers, first at "
                        f"token {at} of {len(ids)}: transformers {_token_texts(hf_text, ids[lo:at])} | "
                        f"{_token_texts(hf_text, ids[at:at + 4])}, llama.cpp "
                        f"{_token_texts(llama_text, theirs[lo:at])} | {_token_texts(llama_text, theirs[at:at + 4])}")
    return None


