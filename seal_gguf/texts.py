"""Text as the measuring and training steps take it: a document (a packaged text or a user's
UTF-8 file), the tokens a tokenizer puts before any text, a document's token chunks; and the
plain-text tables the reports print.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError
from seal_gguf.fileio import require_file


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def read_text_document(path: Path) -> Document:
    path = require_file(Path(path), "text file")
    try:
        return Document(path.name, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def packaged_documents(package: str, folder: str) -> list[Document]:
    """The .txt files of a text folder shipped inside `package` (e.g. "seal_gguf.measure",
    "generaltext"), in name order."""
    files = sorted((f for f in resources.files(package).joinpath(folder).iterdir() if f.name.endswith(".txt")),
                   key=lambda f: f.name)
    return [Document(f.name, f.read_text(encoding="utf-8")) for f in files]


def special_prefix(tokenizer: Any) -> list[int]:
    """The tokens a transformers tokenizer puts before any text (its BOS, or nothing)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return list(full[: len(full) - len(bare)]) if list(full[-len(bare):]) == list(bare) else []




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


def grid(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as aligned text lines: the first column left-aligned (labels), the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            .rstrip() for r in rows]
