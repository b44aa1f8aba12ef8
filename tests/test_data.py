"""Generated retrieval cases: exact token lengths, labels, determinism, splits, scoring, JSONL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seal_gguf.cases import TASKS, Case, count_tokens, encode_case, load_cases, save_cases, score_answer
from seal_gguf.errors import InputError, OutputExistsError
from seal_gguf.task_words import ADJECTIVES, KV_VALUES, LINE_VALUES, NOUNS
from seal_gguf.tasks import make_cases, make_mixture, parse_tasks


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def prompt_tokens(tokenizer, case: Case) -> int:
    return len(tokenizer(case.prompt, add_special_tokens=False).input_ids)


def fingerprint(cases: list[Case]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(c) for c in cases]).encode()).hexdigest()


def check_label(case: Case) -> None:
    """The label is the expected value, and the prompt holds exactly that fact."""
    assert case.answer == f" {case.expected}."
    if case.task == "lines":
        line_id = re.search(r"in line (\S+) is$", case.prompt).group(1)
        facts = re.findall(rf"^line {re.escape(line_id)}: REGISTER_CONTENT is <(\d+)>$", case.prompt, re.M)
        assert facts == [case.expected]
        ids = re.findall(r"^line (\S+): REGISTER_CONTENT", case.prompt, re.M)
        assert len(ids) == len(set(ids)) >= 4  # unique line ids
        values = [int(v) for v in re.findall(r"REGISTER_CONTENT is <(\d+)>", case.prompt)]
        assert all(LINE_VALUES[0] <= v <= LINE_VALUES[1] for v in values)
        assert case.prompt.endswith(f"The <REGISTER_CONTENT> in line {line_id} is")
    elif case.task == "kv":
        key = re.search(r"The number of the code (\S+) is$", case.prompt).group(1)
        assert re.findall(rf"^{re.escape(key)} = (\d+)$", case.prompt, re.M) == [case.expected]
        keys = re.findall(r"^([a-z]+-[a-z]+) = \d+$", case.prompt, re.M)
        assert len(keys) == len(set(keys)) >= 4  # unique keys
        values = [int(v) for v in re.findall(r"^[a-z]+-[a-z]+ = (\d+)$", case.prompt, re.M)]
        assert all(KV_VALUES[0] <= v <= KV_VALUES[1] for v in values)
    elif case.task == "passkey":
        assert case.prompt.count(f"The pass key is {case.expected}. Remember it. {case.expected} is the pass key.") == 1
        assert case.prompt.endswith("The pass key is")
    else:
        statements = re.findall(r"[^.?\n]*\b" + case.expected + r"\.", case.prompt)
        assert len(statements) == 1
        prefix = case.prompt.rsplit("\n", 1)[-1]
        assert statements[0].strip().startswith(prefix)  # the question asks for exactly this needle


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [320, 1024, 3000])
def test_exact_length_and_label(tokenizer, task: str, length: int) -> None:
    cases = make_cases(tokenizer, task, length, 3, seed=7, depths=[0, 50, 100])
    for case in cases:
        assert case.length == length == prompt_tokens(tokenizer, case) == count_tokens(tokenizer, case.prompt)
        assert case.task == task and case.seed == 7
        assert case.prompt.startswith("<|im_start|>system")  # SmolLM2's chat template
        check_label(case)
    assert [c.depth for c in cases] == [0.0, 50.0, 100.0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(TASKS), length=st.integers(300, 2500), seed=st.integers(0, 10**6),
       depth=st.floats(0, 100))
def test_exact_length_property(tokenizer, task: str, length: int, seed: int, depth: float) -> None:
    (case,) = make_cases(tokenizer, task, length, 1, seed, depths=[depth])
    assert prompt_tokens(tokenizer, case) == length
    check_label(case)


def test_encode_case(tokenizer) -> None:
    for task in TASKS:
        (case,) = make_cases(tokenizer, task, 400, 1, seed=3)
        prompt_ids, answer_ids = encode_case(tokenizer, case)
        assert len(prompt_ids) == case.length
        assert tokenizer.decode(prompt_ids + answer_ids) == case.prompt + case.answer
        assert tokenizer.decode(answer_ids).strip() == f"{case.expected}."


def test_depth_places_the_needle(tokenizer) -> None:
    for task in ("passkey", "niah", "lines"):
        early, late = make_cases(tokenizer, task, 1500, 2, seed=1, depths=[10, 90])
        for case, lo, hi in ((early, 0.0, 0.25), (late, 0.75, 1.0)):
            needle = (f"is <{case.expected}>" if task == "lines" else case.expected)
            where = count_tokens(tokenizer, case.prompt[: case.prompt.index(needle)]) / case.length
            assert lo <= where <= hi, (task, case.depth, where)


def test_random_depths_are_recorded(tokenizer) -> None:
    cases = make_cases(tokenizer, "passkey", 300, 4, seed=2)
    assert all(0 <= c.depth <= 100 for c in cases) and len({c.depth for c in cases}) > 1


def test_plain_prompt_without_chat_template(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    plain.chat_template = None
    (case,) = make_cases(plain, "lines", 500, 1, seed=0)
    assert "<|im_start|>" not in case.prompt and prompt_tokens(plain, case) == 500
    # a tokenizer that adds BOS by default: the prompt text carries it, once
    with_bos = AutoTokenizer.from_pretrained(str(tokenizer_dir), add_bos_token=True)
    with_bos.chat_template = None
    assert with_bos("a").input_ids[0] == with_bos.bos_token_id
    (case,) = make_cases(with_bos, "passkey", 500, 1, seed=0)
    ids = with_bos(case.prompt, add_special_tokens=False).input_ids
    assert len(ids) == 500 and ids[0] == with_bos.bos_token_id and ids[1] != with_bos.bos_token_id


def test_first_cases_do_not_depend_on_n(tokenizer) -> None:
    assert make_cases(tokenizer, "niah", 300, 2, seed=5) == make_cases(tokenizer, "niah", 300, 4, seed=5)[:2]
    assert make_cases(tokenizer, "niah", 300, 2, seed=5) != make_cases(tokenizer, "niah", 300, 2, seed=6)


def test_same_cases_in_another_process(tokenizer, tokenizer_dir: Path) -> None:
    here = {task: fingerprint(make_cases(tokenizer, task, 400, 3, seed=11)) for task in TASKS}
    script = (
        "import dataclasses, hashlib, json, sys\n"
        "from transformers import AutoTokenizer\n"
        "from seal_gguf.tasks import TASKS, make_cases\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({k: hashlib.sha256(json.dumps([dataclasses.asdict(c) for c in "
        "make_cases(t, k, 400, 3, seed=11)]).encode()).hexdigest() for k in TASKS}))\n"
    )
    for hashseed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run([sys.executable, "-c", script, str(tokenizer_dir)], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert json.loads(out.strip().splitlines()[-1]) == here


def test_train_and_eval_needles_never_coincide(tokenizer) -> None:
    def needles(split: str) -> tuple[set[str], set[str], set[str]]:
        niah = make_cases(tokenizer, "niah", 300, 40, seed=0, split=split)
        lines = make_cases(tokenizer, "lines", 400, 5, seed=0, split=split)
        keys = make_cases(tokenizer, "passkey", 300, 20, seed=0, split=split)
        # the value and the made-up name in the answer prefix ("The password to the Kiba gate is")
        names = {w for c in niah for w in re.findall(r"[A-Z][a-z]+", c.prompt.rsplit("\n", 1)[-1]) if w != "The"}
        words = {c.expected for c in niah} | names
        ids = {i for c in lines for i in re.findall(r"^line (\S+):", c.prompt, re.M)}
        kv = make_cases(tokenizer, "kv", 400, 5, seed=0, split=split)
        ids |= {k for c in kv for k in re.findall(r"^([a-z]+-[a-z]+) = ", c.prompt, re.M)}
        return words, ids, {c.expected for c in keys}

    train, evaluation = needles("train"), needles("eval")
    for a, b in zip(train, evaluation, strict=True):
        assert a and b and not a & b
    assert all(int(k) % 2 == 0 for k in train[2]) and all(int(k) % 2 == 1 for k in evaluation[2])


def test_mixture_interleaves_the_tasks(tokenizer) -> None:
    """Case i is of tasks[i % k]; at one length each task's cases are make_cases' own, in order."""
    mixed = make_mixture(tokenizer, "lines,kv,passkey", 320, 7, seed=3, split="train")
    assert [c.task for c in mixed] == ["lines", "kv", "passkey", "lines", "kv", "passkey", "lines"]
    for task in ("lines", "kv", "passkey"):
        own = [c for c in mixed if c.task == task]
        assert own == make_cases(tokenizer, task, 320, len(own), seed=3, split="train")
    assert make_mixture(tokenizer, ["niah"], 300, 2, seed=1) == make_cases(tokenizer, "niah", 300, 2, seed=1)
    for case in mixed:
        check_label(case)


def test_mixture_varies_lengths_deterministically(tokenizer) -> None:
    cases = make_mixture(tokenizer, "lines,niah", 600, 8, seed=2, split="train", min_length=300)
    lengths = [c.length for c in cases]
    assert all(300 <= n <= 600 for n in lengths) and len(set(lengths)) > 4
    assert all(prompt_tokens(tokenizer, c) == c.length for c in cases)
    again = make_mixture(tokenizer, "lines,niah", 600, 5, seed=2, split="train", min_length=300)
    assert again == cases[:5]  # the first cases do not depend on n
    assert make_mixture(tokenizer, "lines,niah", 600, 5, seed=3, split="train", min_length=300) != again


@pytest.mark.parametrize(("spec", "message"), [
    ("lines,trivia", "unknown task 'trivia'"), ("lines,,kv", "comma-separated"), ("kv,kv", "each task once"),
    ("", "comma-separated"),
])
def test_parse_tasks_errors(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_tasks(spec)


def test_mixture_bad_requests(tokenizer) -> None:
    assert parse_tasks(" lines , kv") == ("lines", "kv")
    with pytest.raises(InputError, match="minimum length"):
        make_mixture(tokenizer, "lines", 500, 2, 0, min_length=600)
    with pytest.raises(InputError, match="minimum length"):
        make_mixture(tokenizer, "lines", 500, 2, 0, min_length=0)
    with pytest.raises(InputError, match="unknown split"):
        make_mixture(tokenizer, "lines", 500, 2, 0, split="test")
    with pytest.raises(InputError, match="too short"):
        make_mixture(tokenizer, "kv", 60, 1, 0)


def test_vocabularies() -> None:
    for words in (ADJECTIVES, NOUNS):
        assert len(words) == len(set(words)) >= 128
        assert all(re.fullmatch(r"[a-z]+", w) for w in words)


def test_bad_requests(tokenizer) -> None:
    with pytest.raises(InputError, match="unknown task"):
        make_cases(tokenizer, "trivia", 500, 1, 0)
    with pytest.raises(InputError, match="too short"):
        make_cases(tokenizer, "lines", 120, 1, 0)
    for task in TASKS:
        # every task says how many tokens the most demanding of the asked cases needs, and that is enough
        with pytest.raises(InputError, match=rf"{task}: 20 tokens is too short; this tokenizer needs at least "
                                             r"\d+ .*\(4 of 4 cases\)") as raised:
            make_cases(tokenizer, task, 20, 4, 0, split="eval")
        needed = int(re.search(r"at least (\d+)", str(raised.value)).group(1))
        assert len(make_cases(tokenizer, task, needed + 4, 4, 0, split="eval")) == 4
    # lengths drawn from --min-length: the error names the minimum, not a drawn length
    with pytest.raises(InputError, match=r"lines: the minimum length 20 \(--min-length\) is too short \(\d+ of 8 "
                                         r"cases\); this tokenizer needs at least \d+"):
        make_mixture(tokenizer, "lines,kv", 400, 8, 0, split="train", min_length=20)
    with pytest.raises(InputError, match="outside 0..100"):
        make_cases(tokenizer, "niah", 300, 1, 0, depths=[120])
    assert make_cases(tokenizer, "niah", 300, 0, 0) == []


def case_of(task: str, expected: str) -> Case:
    return Case(task, "prompt", f" {expected}.", expected, 10, None, 0)


@pytest.mark.parametrize(
    ("task", "expected", "output", "right"),
    [
        ("lines", "31452", " 31452.", True),
        ("lines", "31452", "31452", True),
        ("lines", "31452", " <31452>", True),
        ("lines", "31452", " 31,452.", True),
        ("lines", "31452", " 3145.", False),  # partial
        ("lines", "31452", " 314520", False),
        ("lines", "31452", " 12345, not 31452", False),  # the first number counts
        ("lines", "31452", "", False),
        ("lines", "31452", "\ufffd\x00##<|im_end|>", False),  # garbled
        ("lines", "31452", "\ufffd#31452\ufffd", True),
        ("passkey", "68048", "The pass key is 68048. Remember", True),
        ("passkey", "68048", "68049", False),
        ("kv", "907", " 907.", True),
        ("kv", "907", " 9070", False),
        ("niah", "kolabi", " kolabi.", True),
        ("niah", "kolabi", ' "Kolabi"', True),
        ("niah", "kolabi", " kolab", False),
        ("niah", "kolabi", " kolabina", False),
        ("niah", "kolabi", "\ufffd\ufffd", False),
    ],
)
def test_score_answer(task: str, expected: str, output: str, right: bool) -> None:
    assert score_answer(case_of(task, expected), output) is right


def test_jsonl_round_trip(tokenizer, tmp_path: Path) -> None:
    cases = [c for task in TASKS for c in make_cases(tokenizer, task, 300, 2, seed=4)]
    path = tmp_path / "cases.jsonl"
    save_cases(path, cases)
    assert load_cases(path) == cases
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(cases)
    with pytest.raises(OutputExistsError):
        save_cases(path, cases[:1])
    save_cases(path, cases[:1], force=True)
    assert load_cases(path) == cases[:1]
    assert [p.name for p in tmp_path.iterdir()] == ["cases.jsonl"]  # no temporary files left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", r"cases.jsonl:1: not valid JSON"),
        ('{"task": "lines"}\n', r"cases.jsonl:1: missing field"),
        ("[1, 2]\n", r"expected a JSON object"),
        (None, r"cases.jsonl:2: field 'length' must be int"),
        (None, r"unknown task"),
        ("\n\n", r"holds no cases"),
    ],
)
def test_load_cases_errors(tmp_path: Path, content: str | None, message: str) -> None:
    good = dataclasses.asdict(case_of("lines", "5"))
    if content is None:
        bad = {**good, "length": "10"} if "length" in message else {**good, "task": "trivia"}
        content = json.dumps(good) + "\n" + json.dumps(bad) + "\n"
    path = tmp_path / "cases.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_cases(path)


def test_load_cases_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such cases file"):
        load_cases(tmp_path / "absent.jsonl")
