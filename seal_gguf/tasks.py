"""Generated retrieval cases: LongEval line retrieval, pass key, needle in a haystack, key-value records.

A case is (prompt, answer). The prompt is the complete text given to the model: the model's chat
template around the task's message when the tokenizer has one (plain text otherwise), ending with
the answer prefix ("... The <REGISTER_CONTENT> in line eager-witch is"). The answer is the label
continuation (" 31452."), the only tokens the training loss sees.

Length rule. The prompt text carries every special token the model needs: the ones the chat
template writes, plus the tokenizer's BOS when the tokenizer would add one by default and the
text does not already start with it. So the prompt is tokenized WITHOUT adding specials, and
`len(tokenizer(prompt, add_special_tokens=False).input_ids) == case.length` exactly. llama.cpp
must tokenize it the same way: `Llama.tokenize(prompt.encode(), add_bos=False, special=True)`.
The generators reach the length exactly by tokenizing the whole prompt and adjusting: the number
of records and then which records (lines, kv), or how many words of filler (passkey, niah).

Splits. Training and evaluation content never coincide. `split="train"` and `split="eval"` (the
default) draw from disjoint sources: line ids use the even- / odd-indexed adjectives, pass keys are
even / odd, niah names and values and kv keys are made-up words over disjoint consonant sets. Training uses
"train"; every evaluation uses "eval".

Determinism. Case i of (task, split, seed) comes from its own random.Random seeded with a string
(hashed with SHA-512 by Python, independent of PYTHONHASHSEED), so a set of n cases is the same in
every process and its first m cases equal the set of m cases. No set is ever iterated. A mixture
(make_mixture) interleaves the tasks and may vary the lengths, under the same rules.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from seal_gguf.cases import TASKS, Case, count_tokens, wrap_prompt
from seal_gguf.errors import InputError
from seal_gguf.task_words import (
    ADJECTIVES,
    CONSONANTS,
    DISHES,
    KV_HEADER,
    KV_PREFIX,
    KV_QUESTION,
    KV_VALUES,
    LINE_VALUES,
    LINES_HEADER,
    LINES_PREFIX,
    LINES_QUESTION,
    NEEDLES,
    NIAH_INTRO,
    NOUNS,
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_PREFIX,
    PASSKEY_QUESTION,
    PLACES,
    PROSE,
    THINGS,
    TIMES,
    VAULTS,
    VERBS,
    VOWELS,
)

SPLITS = ("train", "eval")

_MAX_FIT_STEPS = 60
MIN_LINES = 3  # besides the queried line
_PIECE = re.compile(r"\s*[^\s.,;:!?]+|\s*[.,;:!?]")
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")
# -- helpers --

def _case_rng(task: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"seal-gguf/{task}/{split}/{seed}/{index}")


def _split_words(words: Sequence[str], split: str) -> tuple[str, ...]:
    return tuple(words[0::2] if split == "train" else words[1::2])


def _made_up_word(rng: random.Random, split: str, syllables: int) -> str:
    return "".join(rng.choice(CONSONANTS[split]) + rng.choice(VOWELS) for _ in range(syllables))


def _pieces(text: str) -> list[str]:
    """Words (with their leading space) and punctuation marks: about one token each."""
    return _PIECE.findall(text)


def _count_rendered(tokenizer: Any, render: Callable[[int, int], str], start: int, k: int) -> int:
    return count_tokens(tokenizer, render(start, k))


def _fit_count(count: Callable[[int], int], target: int, guess: int, upper: int) -> int | None:
    """k in [0, upper] with count(k) == target, by steps of (target - count(k)); None if jumped over."""
    k = min(max(guess, 0), upper)
    seen: list[int] = []
    for _ in range(_MAX_FIT_STEPS):
        got = count(k)
        if got == target:
            return k
        seen.append(k)
        step = target - got
        nxt = min(max(k + step, 0), upper)
        if nxt in seen:
            nxt = k + (1 if step > 0 else -1)
        if nxt in seen or not 0 <= nxt <= upper:
            return None
        k = nxt
    return None


def _depth_position(depth: float, slots: int) -> int:
    """The slot index (0..slots) for a depth percentage."""
    return round(depth / 100.0 * slots)


def _depths(depths: Sequence[float] | None, n: int, rng_for: Callable[[int], random.Random]) -> list[float]:
    if depths is not None:
        depths = [float(d) for d in depths]
        if not depths:
            raise InputError("depths: give at least one depth (0..100)")
        bad = [d for d in depths if not 0.0 <= d <= 100.0]
        if bad:
            raise InputError(f"depth {bad[0]} is outside 0..100")
        return [depths[i % len(depths)] for i in range(n)]
    return [round(rng_for(i).uniform(0.0, 100.0), 1) for i in range(n)]


class TooShortError(InputError):
    """A case's instructions, question (and fewest records) take more tokens than its prompt length."""

    def __init__(self, task: str, length: int, needed: int, what: str) -> None:
        super().__init__(f"{task}: {length} tokens is too short; this tokenizer needs at least {needed} for the "
                         f"{what}")
        self.task, self.length, self.needed, self.what = task, length, needed, what


def _built(make: Callable[[int], Case], count: int, name: str = "") -> list[Case]:
    """[make(0), ..., make(count - 1)], or one error for all the cases that are too short, with the most
    tokens any of them needs (cases differ in their records and needles): a TooShortError, or with
    `name` an InputError saying that `name` (the setting that let them be short) is too short."""
    cases: list[Case] = []
    short: list[TooShortError] = []
    for i in range(count):
        try:
            cases.append(make(i))
        except TooShortError as exc:
            short.append(exc)
    if not short:
        return cases
    worst = max(short, key=lambda exc: exc.needed)
    of = f" ({len(short)} of {count} cases)" if count > 1 else ""
    if name:
        raise InputError(f"{worst.task}: {name} is too short{of}; this tokenizer needs at least {worst.needed} "
                         f"for the {worst.what}")
    raise TooShortError(worst.task, worst.length, worst.needed, worst.what + of)


# -- tasks --

def _lines_case(tokenizer: Any, length: int, depth: float, seed: int, rng: random.Random, split: str) -> Case:
    """LongEval lines around one queried line (see _records_case for the exact length)."""
    adjectives = _split_words(ADJECTIVES, split)
    order = list(range(len(adjectives) * len(NOUNS)))
    rng.shuffle(order)
    # the pool of unused lines, drawn from the end; ids are unique within the case
    pool = [(f"{adjectives[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}", rng.randint(*LINE_VALUES)) for i in order]
    return _records_case(tokenizer, "lines", length, depth, seed, rng, pool, LINES_RECORDS)


def _kv_case(tokenizer: Any, length: int, depth: float, seed: int, rng: random.Random, split: str) -> Case:
    """Key-value records: made-up keys (two made-up words over the split's consonants) with numbers."""
    pool: list[tuple[str, int]] = []
    seen: set[str] = set()  # membership only, never iterated
    while len(pool) < length // 4 + 128:  # records take more than 4 tokens each
        key = f"{_made_up_word(rng, split, 2)}-{_made_up_word(rng, split, 2)}"
        if key not in seen:
            seen.add(key)
            pool.append((key, rng.randint(*KV_VALUES)))
    return _records_case(tokenizer, "kv", length, depth, seed, rng, pool, KV_RECORDS)


@dataclass(frozen=True)
class RecordsFormat:
    """A task of records (id, number) with one queried id: header, one line per record, question."""

    header: str
    line: str  # with {id} and {value}
    question: str  # with {id}
    prefix: str  # with {id}
    values: tuple[int, int]


LINES_RECORDS = RecordsFormat(LINES_HEADER, "line {id}: REGISTER_CONTENT is <{value}>", LINES_QUESTION,
                              LINES_PREFIX, LINE_VALUES)
KV_RECORDS = RecordsFormat(KV_HEADER, "{id} = {value}", KV_QUESTION, KV_PREFIX, KV_VALUES)


def _records_case(tokenizer: Any, task: str, length: int, depth: float, seed: int, rng: random.Random,
                  pool: list[tuple[str, int]], fmt: RecordsFormat) -> Case:
    """Records around one queried record, drawn from the end of `pool`. Exact length: the number of
    records first, then swaps of single records for unused ones of another token count, or (short
    records, rarely) the same id with a value of another digit count, still within fmt.values."""
    costs: dict[tuple[str, int], int] = {}

    def line(item: tuple[str, int]) -> str:
        return fmt.line.format(id=item[0], value=item[1])

    def cost(item: tuple[str, int]) -> int:
        if item not in costs:
            costs[item] = count_tokens(tokenizer, "\n" + line(item))
        return costs[item]

    def draw(index: int = -1) -> tuple[str, int]:
        if not pool:
            raise InputError(
                f"{task}: {length} tokens needs more distinct record ids than the vocabulary has; "
                "use a shorter length"
            )
        return pool.pop(index)

    query = draw()
    question, prefix = fmt.question.format(id=query[0]), fmt.prefix.format(id=query[0])

    def render(others: list[tuple[str, int]]) -> str:
        at = _depth_position(depth, len(others))
        body = "\n".join(line(x) for x in [*others[:at], query, *others[at:]])
        return wrap_prompt(tokenizer, fmt.header + body + question, prefix)

    def swap(others: list[tuple[str, int]], gap: int) -> bool:
        """Replace one line so as to close most of the gap without passing it; False if none can."""
        best: tuple[int, int, tuple[str, int]] | None = None  # (gap left, line index, new line)
        js = rng.sample(range(len(others)), min(len(others), 32))
        for revalue in (False, True):
            for j in js:
                if revalue:
                    bounds = [(max(10 ** (d - 1), fmt.values[0]), min(10 ** d - 1, fmt.values[1]))
                              for d in range(1, 6)]
                    candidates = [(others[j][0], rng.randint(lo, hi)) for lo, hi in bounds]
                else:
                    candidates = pool[-1:-101:-1]
                for candidate in candidates:
                    delta = cost(candidate) - cost(others[j])
                    if delta != 0 and (delta > 0) == (gap > 0) and abs(delta) <= abs(gap):
                        left = abs(gap) - abs(delta)
                        if best is None or left < best[0]:
                            best = (left, j, candidate)
            if best is not None:
                break
        if best is None:
            return False
        _, j, candidate = best
        if candidate[0] != others[j][0]:
            pool.remove(candidate)
        others[j] = candidate
        return True

    others: list[tuple[str, int]] = []
    base = count_tokens(tokenizer, render(others))
    per_line = sum(cost(x) for x in pool[-16:]) / 16
    if base + MIN_LINES * per_line > length:
        # a few lines give enough room to adjust the length to the exact token
        raise TooShortError(task, length, int(base + MIN_LINES * per_line) + 1,
                            f"instructions and {MIN_LINES + 1} records")
    others = [draw() for _ in range(int((length - base) / per_line))]
    overshot = False  # after adding a line past the target, only swaps toward shorter lines remain
    for _ in range(_MAX_FIT_STEPS):
        gap = length - count_tokens(tokenizer, render(others))
        if gap == 0:
            return Case(task, render(others), f" {query[1]}.", str(query[1]), length, depth, seed)
        if not overshot and gap >= per_line:
            others += [draw() for _ in range(int(gap / per_line))]
        elif not overshot and gap <= -per_line and len(others) > 1:
            del others[-max(1, int(-gap / per_line)):]
        elif not swap(others, gap):
            if gap < 0 or overshot:
                break
            others.append(draw())
            overshot = True
    raise InputError(
        f"{task}: cannot make a prompt of exactly {length} tokens with this tokenizer "
        "(too few records to adjust); try a longer length"
    )


def _haystack_case(
    tokenizer: Any, task: str, length: int, depth: float, seed: int,
    haystack: Callable[[int], list[str]], intro: str, needle: str, question: str, prefix: str,
    answer: str, expected: str,
) -> Case:
    """Fit a haystack of word pieces around the needle so the prompt has exactly `length` tokens."""
    base = count_tokens(tokenizer, wrap_prompt(tokenizer, intro + needle + question, prefix))
    if base > length:
        raise TooShortError(task, length, base, "instructions and question")
    pieces = haystack(2 * (length - base) + 64)

    def render(start: int, k: int) -> str:
        words = pieces[start:start + k]
        ends = [i + 1 for i, p in enumerate(words) if p.strip() == "."]
        slots = [0, *ends]
        at = slots[min(range(len(slots)), key=lambda s: abs(slots[s] - depth / 100.0 * k))]
        before, after = "".join(words[:at]).strip(), "".join(words[at:]).strip()
        body = " ".join(x for x in (before, needle, after) if x)
        return wrap_prompt(tokenizer, intro + body + question, prefix)

    for start in range(8):
        upper = len(pieces) - start
        k = _fit_count(partial(_count_rendered, tokenizer, render, start), length, length - base, upper)
        if k is not None:
            return Case(task, render(start, k), answer, expected, length, depth, seed)
    raise InputError(f"{task}: could not fit a prompt of exactly {length} tokens with this tokenizer")


def _passkey_case(tokenizer: Any, length: int, depth: float, seed: int, rng: random.Random, split: str) -> Case:
    key = rng.randrange(10000, 100000, 2) + (0 if split == "train" else 1)
    unit = _pieces(" " + PASSKEY_FILLER)

    def haystack(n: int) -> list[str]:
        return (unit * (n // len(unit) + 1))[:n]

    return _haystack_case(
        tokenizer, "passkey", length, depth, seed, haystack, PASSKEY_INTRO,
        PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, PASSKEY_PREFIX, f" {key}.", str(key),
    )


def _prose(rng: random.Random, n: int) -> list[str]:
    pieces: list[str] = []
    while len(pieces) < n:
        sentence = rng.choice(PROSE).format(
            adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS),
            verb=rng.choice(VERBS), place=rng.choice(PLACES), time=rng.choice(TIMES),
        )
        sentence = _ARTICLE.sub(r"\1n ", sentence)  # "a able" -> "an able"
        pieces += _pieces(" " + sentence[0].upper() + sentence[1:])
    return pieces[:n]


def _niah_case(tokenizer: Any, length: int, depth: float, seed: int, rng: random.Random, split: str) -> Case:
    statement, question, prefix = rng.choice(NEEDLES)
    slots = dict(
        name=_made_up_word(rng, split, 2).capitalize(), value=_made_up_word(rng, split, 3),
        dish=rng.choice(DISHES), vault=rng.choice(VAULTS), thing=rng.choice(THINGS),
    )
    value = slots["value"]
    return _haystack_case(
        tokenizer, "niah", length, depth, seed, lambda n: _prose(rng, n), NIAH_INTRO,
        statement.format(**slots), "\n\n" + question.format(**slots), prefix.format(**slots),
        f" {value}.", value,
    )


_MAKERS = {"lines": _lines_case, "passkey": _passkey_case, "niah": _niah_case, "kv": _kv_case}


def make_cases(
    tokenizer: Any, task: str, length: int, n: int, seed: int,
    depths: Sequence[float] | None = None, split: str = "eval",
) -> list[Case]:
    """n cases of `task`, each exactly `length` prompt tokens. With `depths`, case i puts its line or
    needle at depths[i % len(depths)] percent; without, at a random depth (stored, 1 decimal)."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if length <= 0 or n < 0:
        raise InputError(f"length must be > 0 and n >= 0 (got length={length}, n={n})")
    # depth draws use their own stream so that fitting never shifts them
    case_depths = _depths(depths, n, lambda i: _case_rng(task + "/depth", split, seed, i))
    return _built(lambda i: _MAKERS[task](tokenizer, length, case_depths[i], seed, _case_rng(task, split, seed, i),
                                          split), n)


def parse_tasks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"lines,kv" (or a sequence of names) -> ("lines", "kv"): known tasks, each once, in the order given."""
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    if not names or any(not t for t in names):
        raise InputError(f"tasks: give a comma-separated list of {', '.join(TASKS)}, not {spec!r}")
    for name in names:
        if name not in TASKS:
            raise InputError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise InputError(f"tasks: each task once, not {spec!r}")
    return tuple(names)


def make_mixture(
    tokenizer: Any, tasks: str | Sequence[str], length: int, n: int, seed: int, split: str = "eval",
    min_length: int | None = None,
) -> list[Case]:
    """n cases of several tasks, interleaved: case i is of tasks[i % k] (k tasks), the j = i // k-th
    of its task. Without min_length every case has `length` tokens and the cases of one task are
    make_cases' (the first j + 1 of them); with it, case i's length is drawn uniformly from
    min_length..length by its own seeded stream, deterministic like everything else here, and
    the content of each case is drawn as make_cases would draw it for that length."""
    tasks = parse_tasks(tasks)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if length <= 0 or n < 0:
        raise InputError(f"length must be > 0 and n >= 0 (got length={length}, n={n})")
    if min_length is not None and not 0 < min_length <= length:
        raise InputError(f"the minimum length must be in 1..{length} (the length), not {min_length}")
    def make(i: int) -> Case:
        task, j = tasks[i % len(tasks)], i // len(tasks)
        size = length if min_length is None else _case_rng("length", split, seed, i).randint(min_length, length)
        depth = round(_case_rng(task + "/depth", split, seed, j).uniform(0.0, 100.0), 1)
        return _MAKERS[task](tokenizer, size, depth, seed, _case_rng(task, split, seed, j), split)

    # with lengths drawn from min_length up, a case too short is one the minimum let through
    return _built(make, n, "" if min_length is None else f"the minimum length {min_length} (--min-length)")
