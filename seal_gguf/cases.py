"""A retrieval case: the prompt (chat template included) and its answer, its tokens, its score, and
cases saved as JSONL (`seal-gguf train --save-cases` / `--cases`). seal_gguf.tasks generates
cases (the length rule and the splits are in its docstring).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_file, require_file

# The generated tasks (seal_gguf.tasks makes each).
TASKS = ("lines", "passkey", "niah", "kv")

_NUMBER = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+")

@dataclass(frozen=True)
class Case:
    task: str  # "lines" | "passkey" | "niah" | "kv"
    prompt: str  # full model input (chat template, specials, BOS as text) ending with the answer prefix
    answer: str  # label continuation after the prompt, e.g. " 31452."
    expected: str  # the value to retrieve, e.g. "31452"
    length: int  # prompt tokens, counted as in the module docstring
    depth: float | None  # where the queried line / needle sits: 0..100 percent of the record / haystack
    seed: int


def count_tokens(tokenizer: Any, text: str) -> int:
    """Prompt length under this module's rule: no specials added (the text carries them)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def encode_case(tokenizer: Any, case: Case) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids). The answer ids are those of the joint tokenization, so they are
    what the model would see (and generate) after the prompt."""
    prompt_ids = list(tokenizer(case.prompt, add_special_tokens=False).input_ids)
    full = list(tokenizer(case.prompt + case.answer, add_special_tokens=False).input_ids)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return prompt_ids, full[len(prompt_ids):]
    # the answer merged into the prompt's last token: use its own tokens
    return prompt_ids, list(tokenizer(case.answer, add_special_tokens=False).input_ids)


def _adds_bos(tokenizer: Any) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and list(tokenizer("a").input_ids[:1]) == [bos_id]


def wrap_prompt(tokenizer: Any, message: str, prefix: str) -> str:
    """The model's chat template around the user message, then the answer prefix (see module doc)."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True,
                enable_thinking=False,  # templates with a thinking mode: answer directly
            )
        except (TemplateError, ValueError, TypeError) as exc:
            raise InputError(f"the tokenizer's chat template failed on a user message ({exc})") from None
    else:
        text = message + "\n\n"
    text += prefix
    bos = getattr(tokenizer, "bos_token", None)
    if bos and _adds_bos(tokenizer) and not text.startswith(bos):
        text = bos + text
    return text


def score_answer(case: Case, output: str) -> bool:
    """lines / passkey / kv: the first number in the output equals the expected one (thousands commas
    allowed). niah: the made-up value appears in the output as a whole word (any case)."""
    text = str(output)
    if case.task == "niah":
        pattern = rf"(?<![A-Za-z]){re.escape(case.expected)}(?![A-Za-z])"
        return re.search(pattern, text, flags=re.IGNORECASE) is not None
    match = _NUMBER.search(text)
    return match is not None and match.group().replace(",", "") == case.expected


# -- cases as JSONL (seal-gguf train --save-cases / --cases) --

_CASE_FIELDS = {"task": str, "prompt": str, "answer": str, "expected": str, "length": int, "seed": int}


def save_cases(path: Path, cases: Sequence[Case], force: bool = False) -> None:
    """One JSON object per line; written atomically."""
    with atomic_file(Path(path), force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for case in cases:
                f.write(json.dumps(asdict(case), ensure_ascii=False) + "\n")


def _case_from_json(obj: Any, where: str) -> Case:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    missing = [k for k in (*_CASE_FIELDS, "depth") if k not in obj]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    for key, kind in _CASE_FIELDS.items():
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise InputError(f"{where}: field {key!r} must be {kind.__name__}, found {obj[key]!r:.40}")
    if obj["task"] not in TASKS:
        raise InputError(f"{where}: unknown task {obj['task']!r}")
    if obj["length"] <= 0:
        raise InputError(f"{where}: length must be > 0")
    depth = obj["depth"]
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))
                              or not 0 <= depth <= 100):
        raise InputError(f"{where}: depth must be null or a number in 0..100, found {depth!r}")
    return Case(obj["task"], obj["prompt"], obj["answer"], obj["expected"], obj["length"],
                None if depth is None else float(depth), obj["seed"])


def load_cases(path: Path) -> list[Case]:
    path = require_file(Path(path), "cases file")
    cases: list[Case] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
                cases.append(_case_from_json(obj, where))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not cases:
        raise InputError(f"{path}: holds no cases")
    return cases
