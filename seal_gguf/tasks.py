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

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_file, require_file

TASKS = ("lines", "passkey", "niah", "kv")
SPLITS = ("train", "eval")

# -- vocabularies (tuples: fixed order, no hash randomisation) --
ADJECTIVES = (
    "able", "absent", "agile", "alert", "ancient", "angry", "brave", "bright", "brisk", "broad", "bumpy",
    "busy", "calm", "careful", "cheerful", "chilly", "clever", "cloudy", "clumsy", "cold", "cozy", "crisp",
    "curious", "damp", "dark", "dizzy", "dusty", "eager", "early", "electric", "elegant", "empty", "fancy",
    "fearless", "fierce", "fluffy", "foggy", "fragile", "free", "fresh", "friendly", "frozen", "funny",
    "gentle", "giant", "gifted", "glad", "golden", "graceful", "grumpy", "happy", "hasty", "heavy", "hidden",
    "hollow", "honest", "humble", "hungry", "icy", "idle", "jolly", "juicy", "keen", "kind", "lazy", "little",
    "lively", "lonely", "loud", "lucky", "mellow", "merry", "mighty", "misty", "modern", "muddy", "narrow",
    "neat", "nervous", "noble", "noisy", "odd", "old", "orange", "patient", "plain", "polite", "proud",
    "purple", "quick", "quiet", "rapid", "rare", "restless", "rich", "rough", "round", "rusty", "sandy",
    "scarlet", "shiny", "silent", "silver", "simple", "sleepy", "slow", "smooth", "snowy", "soft", "solid",
    "sour", "spicy", "steady", "stormy", "strange", "sturdy", "sunny", "sweet", "swift", "tall", "tame",
    "tender", "tiny", "tough", "velvet", "wandering", "warm", "wild", "windy", "wise", "witty", "young",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "basket", "beacon", "beetle", "bell", "bottle", "bridge",
    "bucket", "button", "cabin", "camel", "candle", "canyon", "castle", "cat", "cellar", "chair", "cherry",
    "circle", "cliff", "clock", "cloud", "comet", "compass", "coral", "cricket", "crown", "dagger", "desert",
    "dolphin", "door", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fern", "fiddle", "flame",
    "forest", "fountain", "fox", "garden", "giraffe", "glacier", "goblet", "harbor", "hammer", "harp", "hawk",
    "helmet", "hill", "island", "jacket", "jungle", "kettle", "kite", "ladder", "lantern", "lemon", "lion",
    "lizard", "magnet", "maple", "meadow", "mirror", "monkey", "moon", "mountain", "needle", "nest", "ocean",
    "orchard", "otter", "owl", "paddle", "palace", "panda", "parrot", "pebble", "pencil", "pepper", "piano",
    "pigeon", "pillow", "planet", "pocket", "pond", "puzzle", "rabbit", "raven", "ribbon", "river", "robot",
    "rocket", "saddle", "sailor", "shadow", "shell", "spider", "spoon", "squirrel", "star", "statue", "storm",
    "sword", "table", "teapot", "tiger", "tower", "tractor", "trumpet", "tulip", "turtle", "umbrella",
    "valley", "violin", "wagon", "walrus", "whale", "whistle", "window", "witch",
)
# niah haystack prose
VERBS = (
    "wandered", "rested", "waited", "danced", "slept", "sang", "worked", "played", "listened", "laughed",
    "lingered", "argued", "whispered", "stayed", "paused", "travelled",
)
PLACES = (
    "old mill", "river bank", "market square", "village well", "harbor wall", "hillside", "orchard gate",
    "town hall", "bakery", "lighthouse", "train station", "library", "bridge", "chapel", "school yard",
    "farmhouse",
)
TIMES = (
    "in the morning", "at dusk", "after the rain", "before the festival", "every winter", "on Sundays",
    "late at night", "at noon", "during the harvest", "in early spring",
)
PROSE = (
    "The {adj} {noun} {verb} near the {place} {time}.",
    "A {adj} {noun} was seen by the {place} {time}.",
    "Nobody knew why the {noun} at the {place} looked so {adj}.",
    "The children said that the {noun} was {adj}, but their teacher disagreed.",
    "Some travellers claim that a {adj} {noun} brings luck to the {place}.",
    "Everyone at the {place} talked about the {adj} {noun} for days.",
    "The {noun} and the {noun2} {verb} together {time}.",
    "An old story tells of a {adj} {noun} that lived beside the {place}.",
    "Beyond the {place}, the road grew {adj} and the {noun} {verb} alone.",
    "It was {time} that the {noun} first {verb} by the {place}.",
)
# niah needles: (statement, question, answer prefix); {name} and {value} are made-up words
NEEDLES = (
    ("The secret ingredient of the {name} {dish} is {value}.",
     "What is the secret ingredient of the {name} {dish}?", "The secret ingredient of the {name} {dish} is"),
    ("The password to the {name} {vault} is {value}.",
     "What is the password to the {name} {vault}?", "The password to the {name} {vault} is"),
    ("The captain of the {name} fleet is called {value}.",
     "What is the captain of the {name} fleet called?", "The captain of the {name} fleet is called"),
    ("The {name} tribe's word for {thing} is {value}.",
     "What is the {name} tribe's word for {thing}?", "The {name} tribe's word for {thing} is"),
)
DISHES = ("stew", "pie", "soup", "cake", "bread", "curry", "salad", "pudding", "tart", "dumplings")
VAULTS = ("vault", "gate", "tower", "archive", "observatory", "treasury")
THINGS = ("rain", "friendship", "silence", "morning", "courage", "river", "laughter", "winter")
# Made-up words are consonant-vowel syllables; the two splits use disjoint consonants.
CONSONANTS = {"train": "bdfgkl", "eval": "mnprstvz"}
VOWELS = "aeiou"

LINES_HEADER = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
    "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
    "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
    "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
)
LINES_QUESTION = (
    "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {id}? I need the number."
)
LINES_PREFIX = "The <REGISTER_CONTENT> in line {id} is"
LINE_VALUES = (1, 50000)
KV_HEADER = (
    "Below is a table of made-up codes, one per row, each with its number. Memorize the number of every "
    "code: at the end I will ask you for the number of one of them.\n\n"
)
KV_QUESTION = "\n\nThat is the whole table. What is the number of the code {id}?"
KV_PREFIX = "The number of the code {id} is"
KV_VALUES = (1, 99999)
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_PREFIX = "The pass key is"
NIAH_INTRO = (
    "Below is a long text. Somewhere in it there is one important fact. Read the text carefully, "
    "then answer the question that follows it.\n\n"
)

_MAX_FIT_STEPS = 60
MIN_LINES = 3  # besides the queried line
_PIECE = re.compile(r"\s*[^\s.,;:!?]+|\s*[.,;:!?]")
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")
_NUMBER = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+")
_CASE_FIELDS = {"task": str, "prompt": str, "answer": str, "expected": str, "length": int, "seed": int}


@dataclass(frozen=True)
class Case:
    task: str  # "lines" | "passkey" | "niah" | "kv"
    prompt: str  # full model input (chat template, specials, BOS as text) ending with the answer prefix
    answer: str  # label continuation after the prompt, e.g. " 31452."
    expected: str  # the value to retrieve, e.g. "31452"
    length: int  # prompt tokens, counted as in the module docstring
    depth: float | None  # where the queried line / needle sits: 0..100 percent of the record / haystack
    seed: int


# -- tokens --

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


def _too_short(task: str, length: int) -> InputError:
    return InputError(f"{task}: {length} tokens is too short for this task's instructions and question")


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
        raise InputError(f"{task}: {length} tokens is too short; this tokenizer needs at least "
                         f"{int(base + MIN_LINES * per_line) + 1} for the instructions and {MIN_LINES + 1} records")
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
        raise _too_short(task, length)
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
    return [
        _MAKERS[task](tokenizer, length, case_depths[i], seed, _case_rng(task, split, seed, i), split)
        for i in range(n)
    ]


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
    cases = []
    for i in range(n):
        task, j = tasks[i % len(tasks)], i // len(tasks)
        size = length if min_length is None else _case_rng("length", split, seed, i).randint(min_length, length)
        depth = round(_case_rng(task + "/depth", split, seed, j).uniform(0.0, 100.0), 1)
        cases.append(_MAKERS[task](tokenizer, size, depth, seed, _case_rng(task, split, seed, j), split))
    return cases


# -- scoring --

def score_answer(case: Case, output: str) -> bool:
    """lines / passkey / kv: the first number in the output equals the expected one (thousands commas
    allowed). niah: the made-up value appears in the output as a whole word (any case)."""
    text = str(output)
    if case.task == "niah":
        pattern = rf"(?<![A-Za-z]){re.escape(case.expected)}(?![A-Za-z])"
        return re.search(pattern, text, flags=re.IGNORECASE) is not None
    match = _NUMBER.search(text)
    return match is not None and match.group().replace(",", "") == case.expected


# -- JSONL --

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
