"""A GGUF's metadata as the commands use it: its seal.* provenance and GGUFFacts (architecture,
context length, chat template, recorded recipe, source), read by seal_gguf.gguffile.header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal_gguf.constants import CHAT_TEMPLATE_KEY, GGUF_RECIPE_KEYS, GGUF_SEAL_PREFIX, GGUFKeys
from seal_gguf.fileio import require_file, require_gguf
from seal_gguf.gguffile.header import read_metadata, string_array
from seal_gguf.gguffile.split import read_gguf_parts

TOKENS_KEY = "tokenizer.ggml.tokens"  # gguf-py: Keys.Tokenizer.LIST
HF_URL = re.compile(r"^https?://huggingface\.co/(?P<repo>[\w.-]+/[\w.-]+)/?$")


def gguf_seal_metadata(path: Path) -> dict[str, Any]:
    """The seal.* keys of a GGUF file and its general.architecture (no seal.* key: no SEAL provenance)."""
    metadata = read_metadata(require_file(Path(path), "GGUF file"))
    return {k: v for k, v in metadata.items() if k.startswith(GGUF_SEAL_PREFIX) or k == "general.architecture"}



@dataclass(frozen=True)
class GGUFFacts:
    path: Path
    metadata: dict[str, Any]  # scalars, numeric arrays and short string arrays (gguffile.header)
    bos_text: str
    eos_text: str
    size: int  # bytes, of every part of a split GGUF together
    parts: int = 1  # files: more than 1 for a split GGUF given by its first part

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_number(self, key: str) -> int | None:
        value = self.metadata.get(f"{self.architecture}.{key}")
        return value if isinstance(value, int) else None

    @property
    def context_length(self) -> int | None:
        return self.arch_number("context_length")

    @property
    def file_type(self) -> str:
        value = self.metadata.get("general.file_type")
        return file_type_name(value if isinstance(value, int) else None)

    @property
    def seal(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.metadata.items() if k.startswith("seal.")}

    @property
    def scales_sha256(self) -> str | None:
        return self.seal.get(GGUFKeys.SCALES_SHA256)

    @property
    def recorded_recipe(self) -> dict[str, str]:
        """The training recipe fold-and-convert copied into the GGUF (absent from older files)."""
        seal = self.seal
        return {key: seal[GGUF_SEAL_PREFIX + key] for key in GGUF_RECIPE_KEYS if GGUF_SEAL_PREFIX + key in seal}

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get(CHAT_TEMPLATE_KEY)
        return value if isinstance(value, str) and value.strip() else None

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp (and Ollama) put BOS in front of a prompt by themselves."""
        value = self.metadata.get("tokenizer.ggml.add_bos_token")
        # without the key llama.cpp adds BOS for SentencePiece vocabularies only
        return bool(value) if value is not None else self.metadata.get("tokenizer.ggml.model") == "llama"

    @property
    def license(self) -> str | None:
        value = self.metadata.get("general.license")
        return str(value) if value else None

    @property
    def source_repo(self) -> str | None:
        """The Hugging Face repository the GGUF was converted from, where the converter recorded it."""
        repo = self.metadata.get("general.source.huggingface.repository")
        if repo:
            return str(repo)
        match = HF_URL.match(str(self.metadata.get("general.source.url", "")))
        return match.group("repo") if match else None

    @property
    def title(self) -> str:
        for key in ("general.name", "general.basename"):
            if self.metadata.get(key):
                return str(self.metadata[key])
        return self.path.stem


def read_gguf_facts(path: Path) -> GGUFFacts:
    """The GGUF's metadata (scalars, numeric arrays, short string arrays) and its BOS / EOS token texts.
    A split GGUF is given by its first part; raises InputError (read_gguf_parts) for a later part, a
    missing part or parts from different splits."""
    path = require_gguf(Path(path))
    parts = read_gguf_parts(path)
    header, raw = parts[0].header, parts[0].raw
    metadata = {key: entry.value for key, entry in header.kv.items() if entry.value is not None}
    tokens_entry = header.kv.get(TOKENS_KEY)
    tokens = string_array(raw, tokens_entry) if tokens_entry is not None else []

    def token_text(key: str) -> str:
        index = metadata.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    return GGUFFacts(path, metadata, token_text("tokenizer.ggml.bos_token_id"),
                     token_text("tokenizer.ggml.eos_token_id"), sum(part.path.stat().st_size for part in parts),
                     len(parts))


def file_type_name(value: int | None) -> str:
    from gguf import LlamaFileType

    if value is None:
        return "unknown"
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"type{value}"
    return name.removeprefix("ALL_").removeprefix("MOSTLY_").lower()


