"""Anchor text for training: general text on which the SEAL model is held close to the base model.

Training with an anchor (issue 19, item 2; DESIGN.md section 5b) adds λ·KL(base ‖ SEAL) on
general-text positions to the answer cross-entropy, with the frozen model without scales as its
own teacher. This module supplies that text as token windows.

The built-in anchor text (learn/anchortext: a recipe, a letter, a science explanation, a story,
a question-and-answer dialogue, some code) is separate from the measurement text in
measure/generaltext, on which the cost of SEAL is measured (seal_gguf.measure.general): the two
must never be mixed, or the measured cost would be taken on text the scales were trained on.

The model can also write anchor text itself (`generated_windows`, `train --anchor-generated N`): its
own sampled replies to varied requests (in English), in its chat template. That text needs no data
set, is in the model's own style, and puts the anchor where the model is used: in replies
(issue 19 names the base model's own continuations as an anchor source).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seal_gguf.cases import wrap_prompt
from seal_gguf.errors import InputError
from seal_gguf.model.generate import sampled_continuations, stop_token_ids
from seal_gguf.texts import Document, packaged_documents, read_text_document, special_prefix

ANCHOR_FOLDER = "anchortext"
# Replies sampled together: one batched generate call per GENERATION_BATCH windows.
GENERATION_BATCH = 8
# A generated window must leave at least this many tokens for the reply (the request is the model's input).
MIN_REPLY_TOKENS = 32
# Requests the model answers in its own words for generated anchor windows: everyday kinds of use
# (explaining, advising, writing, coding, planning, chatting), none of them retrieval from a context.
ANCHOR_PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Write a Python function that checks whether a word is a palindrome, and explain it.",
    "Give me some tips for a job interview as a nurse.",
    "Why is the sky blue? Keep it simple.",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "Summarize the main causes of the French Revolution.",
    "How do I make a simple tomato soup?",
    "What are the pros and cons of working from home?",
    "Write a poem about autumn in a small town.",
    "How does compound interest work? Give an example.",
    "Plan a one-week study schedule for a history exam.",
    "What is the difference between a virus and a bacterium?",
    "Describe a busy market on a Saturday morning.",
    "How can I improve my sleep?",
    "Explain what a database index is to a beginner programmer.",
    "Write a dialogue between a customer and a baker about a birthday cake.",
    "What are good ways to learn a new language as an adult?",
    "Tell me about the life cycle of a butterfly.",
    "Write a short review of a fictional science fiction film.",
    "How do solar panels turn sunlight into electricity?",
    "Give advice to someone adopting their first dog.",
    "Write a JavaScript snippet that counts the words in a sentence.",
)


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


def generated_windows(model: Any, tokenizer: Any, count: int, window: int, seed: int, device: torch.device,
                      progress: bool = True) -> list[list[int]]:
    """`count` anchor windows the model writes itself: request k (ANCHOR_PROMPTS in an order shuffled by
    `seed`, cycled) in the model's chat template (plain text without one), then the model's reply
    sampled at temperature 1, up to `window` tokens in all; GENERATION_BATCH replies at a time, batch b
    seeded with seed + b. A reply that ends early (its stop token kept) gives a shorter window. Run
    with the scale hooks detached: the text is the base model's.

    Shape: `count` lists of token ids, each at most `window` long. Raises InputError when a request in
    the chat template leaves less than MIN_REPLY_TOKENS of the window for the reply.
    """
    if count < 0:
        raise InputError(f"generated anchor windows must be >= 0, not {count}")
    order = list(ANCHOR_PROMPTS)
    random.Random(seed).shuffle(order)
    prompts = [list(tokenizer(wrap_prompt(tokenizer, order[k % len(order)], ""), add_special_tokens=False).input_ids)
               for k in range(count)]
    longest = max((len(p) for p in prompts), default=0)
    if longest + MIN_REPLY_TOKENS > window:
        raise InputError(f"the requests take up to {longest} tokens in the chat template, leaving less than "
                         f"{MIN_REPLY_TOKENS} for the model's reply in an anchor window of {window}: use "
                         f"--anchor-window {longest + MIN_REPLY_TOKENS} or more")
    stop = stop_token_ids(model, tokenizer)
    windows: list[list[int]] = []
    with tqdm(total=count, desc="anchor text", unit="window", disable=not progress, leave=False) as bar:
        for b, start in enumerate(range(0, count, GENERATION_BATCH)):
            batch = prompts[start:start + GENERATION_BATCH]
            replies = sampled_continuations(model, batch, window - min(len(p) for p in batch), stop, device, seed + b)
            windows += [(prompt + reply)[:window] for prompt, reply in zip(batch, replies, strict=True)]
            bar.update(len(batch))
    return windows


def interleave(first: Sequence[list[int]], second: Sequence[list[int]]) -> list[list[int]]:
    """The windows of both lists spread evenly through one list (each list's order kept), so that
    training steps cycle through both kinds of text throughout, not one kind first."""
    total = len(first) + len(second)
    merged: list[list[int]] = []
    i = j = 0
    for k in range(total):
        # take from `first` while its share of the k windows so far is below its share of all windows
        if j >= len(second) or (i < len(first) and i * total <= k * len(first)):
            merged.append(first[i])
            i += 1
        else:
            merged.append(second[j])
            j += 1
    return merged
