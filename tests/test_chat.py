"""`seal-gguf chat`: one-shot answers, the interactive loop, documents, context limits, bad GGUFs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import one_line_error

from seal_gguf.cli.app import cli
from seal_gguf.ship.chat import ChatSession, ContextFull


def invoke(*args: object, input: str | None = None):
    return CliRunner().invoke(cli, ["chat", *(str(a) for a in args)], input=input)


@pytest.mark.slow
def test_prompt_answers_from_the_document(smollm2_gguf: Path, tmp_path: Path) -> None:
    doc = tmp_path / "memo.txt"
    doc.write_text("Memo for the night shift.\nThe pass key is 48213. Remember it.\nThe meeting is at 3 pm.\n")
    result = invoke(smollm2_gguf, "--file", doc, "--prompt", "What is the pass key?", "--temperature", 0,
                    "--max-tokens", 24)
    assert result.exit_code == 0, result.output
    assert "48213" in result.output
    # the answer alone goes to stdout (scripts read it); no banner, no prompt marker
    assert ">>>" not in result.output and "Chatting" not in result.output


@pytest.mark.slow
def test_session_keeps_history_and_resets(smollm2_gguf: Path) -> None:
    session = ChatSession(smollm2_gguf, n_ctx=512, system="You are brief.", max_tokens=24, temperature=0.0)
    try:
        first = "".join(session.ask("My name is Ada."))
        assert first.strip()
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
        assert session.messages[-1]["content"] == first
        "".join(session.ask("What is my name?"))
        assert [m["role"] for m in session.messages][-2:] == ["user", "assistant"] and len(session.messages) == 5
        assert 0 < session.tokens_used <= session.n_ctx
        session.reset()
        assert session.messages == [{"role": "system", "content": "You are brief."}]
    finally:
        session.close()


@pytest.mark.slow
def test_document_read_under_a_progress_bar_gives_the_same_reply(smollm2_gguf: Path) -> None:
    lines = [f"Shelf {i}: {i * 7 % 97} jars of jam." for i in range(48)]
    lines.insert(24, "The spare key is under the blue flowerpot.")
    document = "\n".join(lines)
    replies, used = [], []
    for progress in (False, True):
        session = ChatSession(smollm2_gguf, document=document, max_tokens=12, temperature=0.0)
        try:
            replies.append("".join(session.ask("Where is the spare key?", progress=progress)))
            used.append(session.tokens_used)
        finally:
            session.close()
    assert used[0] > 512  # longer than one batch: read under the bar
    assert replies[0] == replies[1] and used[0] == used[1]


@pytest.mark.slow
def test_interactive_loop_streams_replies_and_ends_on_eof(smollm2_gguf: Path) -> None:
    result = invoke(smollm2_gguf, "--max-tokens", 12, "--temperature", 0, input="Hello!\n\n/reset\nHi again\n")
    assert result.exit_code == 0, result.output
    assert "Chatting with SmolLM2-135M-Instruct.Q4_1.gguf" in result.output
    assert result.output.count(">>> ") == 5  # two questions, one empty line, /reset, and the end of input
    assert "[conversation cleared]" in result.output
    replies = [part.split("\n")[0] for part in result.output.split(">>> ")[1:]]
    assert replies[0].strip() and replies[3].strip()


@pytest.mark.slow
def test_context_overflow_is_reported(smollm2_gguf: Path, tmp_path: Path) -> None:
    doc = tmp_path / "long.txt"
    doc.write_text("The grass is green. The sky is blue. " * 200)
    one_line_error(invoke(smollm2_gguf, "--file", doc, "--n-ctx", 256, "--prompt", "What colour is the sky?"),
                   "needs", "tokens but the context holds 256", "--n-ctx")
    # interactive: the overflow is reported, the session goes on until the end of input
    result = invoke(smollm2_gguf, "--file", doc, "--n-ctx", 256, input="What colour is the sky?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "tokens but the context holds 256" in result.output
    # without --n-ctx the context grows to hold the document
    session = ChatSession(smollm2_gguf, document=doc.read_text(), max_tokens=4)
    try:
        assert session.n_ctx > 1600
    finally:
        session.close()
    with pytest.raises(ContextFull):
        small = ChatSession(smollm2_gguf, n_ctx=128, max_tokens=4)
        try:
            list(small.ask("word " * 300))
        finally:
            assert small.messages == []  # the refused turn is not kept
            small.close()


def test_missing_or_corrupt_gguf_is_one_line(tmp_path: Path, smollm2_gguf: Path) -> None:
    one_line_error(invoke(tmp_path / "absent.gguf", "--prompt", "hi"), "absent.gguf", "no such GGUF file")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    one_line_error(invoke(text, "--prompt", "hi"), "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 1 << 20])
    one_line_error(invoke(truncated, "--prompt", "hi"), "inside its header: truncated?")  # not only "cannot load"
    one_line_error(invoke(smollm2_gguf, "--file", tmp_path / "nope.txt", "--prompt", "hi"), "no such document")
