"""Anchor text for training: general text on which the SEAL model is held close to the base model.

Training with an anchor (issue 19, item 2; DESIGN.md section 5b) adds λ·KL(base ‖ SEAL) on
general-text positions to the answer cross-entropy, with the frozen model without scales as its
own teacher. This module supplies that text as token windows.

The built-in anchor text (learn/anchortext: a recipe, a letter, a science explanation, a story,
a question-and-answer dialogue, some code) is separate from the measurement text in
measure/generaltext, on which the cost of SEAL is measured (seal_gguf.measure.general): the two
must never be mixed, or the measured cost would be taken on text the scales were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError
from seal_gguf.texts import Document, packaged_documents, read_text_document, special_prefix

ANCHOR_FOLDER = "anchortext"


def anchor_documents(text: Path | None = None) -> list[Document]:
    """The built-in anchor texts in name order, or the one UTF-8 file `text` (`--anchor-text FILE`).

    Raises InputError for a missing or unreadable file.
    """
    if text is not None:
        return [read_text_document(Path(text))]
    return packaged_documents(__package__, ANCHOR_FOLDER)


def split_windows(ids: Sequence[int], prefix: Sequence[int], window: int) -> list[list[int]]:
    """One document's ids as windows of `window` tokens, each starting with `prefix`.

    The prefix (the model's BOS, if any) is added as make_chunks adds it: a text that already starts
    with it keeps its own. Every window is full length: the last one ends at the document's end and
    may overlap the one before it. A document shorter than one window gives one shorter window;
    one with no token to predict (fewer than two tokens in all) gives none.
    """
    prefix, ids = list(prefix), list(ids)
    body = window - len(prefix)
    if body < 1:
        raise InputError(f"an anchor window of {window} tokens leaves no room for text after the "
                         f"{len(prefix)}-token prefix")
    if prefix and ids[:len(prefix)] == prefix:
        ids = ids[len(prefix):]
    if len(ids) <= body:
        return [prefix + ids] if len(prefix) + len(ids) >= 2 else []
    starts = list(range(0, len(ids) - body + 1, body))
    if starts[-1] + body < len(ids):
        starts.append(len(ids) - body)
    return [prefix + ids[s:s + body] for s in starts]


def anchor_windows(tokenizer: Any, window: int, documents: Sequence[Document] | None = None) -> list[list[int]]:
    """Token windows of the anchor text for `tokenizer` (a transformers tokenizer), in document order.

    documents: the texts (default: anchor_documents(), the built-in anchor text). Windows never
    cross documents; see split_windows for their length and the BOS prefix. Raises InputError if
    the window is too short, the text gives no window, or no document fills one window (the
    window recorded in the scales' provenance would then not be the one trained on).
    """
    if window < 2:
        raise InputError(f"the anchor window must be at least 2 tokens (got {window})")
    documents = anchor_documents() if documents is None else list(documents)
    prefix = special_prefix(tokenizer)
    windows: list[list[int]] = []
    for doc in documents:
        ids = list(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        windows += split_windows(ids, prefix, window)
    if not windows:
        names = ", ".join(d.name for d in documents) or "no document"
        raise InputError(f"the anchor text ({names}) is empty after tokenization")
    longest = max(len(w) for w in windows)
    if longest < window:
        raise InputError(f"no anchor document fills one window of {window} tokens (the longest gives {longest}); "
                         f"use --anchor-window {longest} or less, or a longer --anchor-text")
    return windows
