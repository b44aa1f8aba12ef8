"""Evaluation text: the packaged documents, a user's file, a generated retrieval prompt, and
their token chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError
from seal_gguf.fileio import require_file

# The generated retrieval prompt in the built-in text: a LongEval line-retrieval case this long.
RETRIEVAL_TOKENS = 768
RETRIEVAL_SEED = 0


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def builtin_documents() -> list[Document]:
    """The packaged evaluation texts (prose, notes with numbers and a table, code), in name order."""
    folder = resources.files(__package__).joinpath("evaltext")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    return [Document(f.name, f.read_text(encoding="utf-8")) for f in files]


def retrieval_document(tokenizer: Any, length: int = RETRIEVAL_TOKENS) -> Document:
    """One generated line-retrieval prompt in the model's chat template, followed by its answer."""
    from seal_gguf.learn.data import make_cases

    case = make_cases(tokenizer, "lines", length, 1, RETRIEVAL_SEED)[0]
    return Document(f"lines-{length}", case.prompt + case.answer)


def read_text_document(path: Path) -> Document:
    path = require_file(Path(path), "text file")
    try:
        return Document(path.name, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


@dataclass(frozen=True)
class Chunk:
    document: str
    ids: list[int]


def make_chunks(documents: Sequence[tuple[str, list[int]]], prefix: list[int], ctx: int) -> list[Chunk]:
    """Split each document's ids into chunks of at most ctx tokens, each starting with `prefix`
    (the model's BOS, if any) unless the text itself starts with it. Chunks never cross documents;
    a chunk needs two tokens to score one prediction."""
    chunks: list[Chunk] = []
    for name, ids in documents:
        start = 0
        while start < len(ids):
            own = bool(prefix) and ids[start:start + len(prefix)] == prefix
            room = ctx if own or not prefix else ctx - len(prefix)
            piece = ids[start:start + room]
            chunk = piece if own or not prefix else prefix + piece
            if len(chunk) >= 2:
                chunks.append(Chunk(name, chunk))
            start += room
    return chunks


