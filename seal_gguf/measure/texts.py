"""The texts seal-gguf measures on: validate's evaluation text (measure/evaltext plus a generated
retrieval prompt) and the general text on which SEAL's cost is measured (measure/generaltext,
never used for training; the trainer's anchor text is learn/anchortext).
"""

from __future__ import annotations

from typing import Any

from seal_gguf.texts import Document, packaged_documents

# The generated retrieval prompt in the built-in text: a LongEval line-retrieval case this long.
RETRIEVAL_TOKENS = 768
RETRIEVAL_SEED = 0


def builtin_documents() -> list[Document]:
    """validate's packaged evaluation texts (prose, notes with numbers and a table, code), in name order."""
    return packaged_documents(__package__, "evaltext")


def retrieval_document(tokenizer: Any, length: int = RETRIEVAL_TOKENS) -> Document:
    """One generated line-retrieval prompt in the model's chat template, followed by its answer."""
    from seal_gguf.tasks import make_cases

    case = make_cases(tokenizer, "lines", length, 1, RETRIEVAL_SEED)[0]
    return Document(f"lines-{length}", case.prompt + case.answer)


def general_documents() -> list[Document]:
    """The general text in five genres (fiction, a chat, code, technical writing, news), in name order:
    the cost of SEAL is measured on it, and nothing is ever trained on it."""
    return packaged_documents(__package__, "generaltext")


