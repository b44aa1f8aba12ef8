"""The README's command table is the CLI: every command listed, no command missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from seal_gguf.cli.app import cli

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `seal-gguf ([a-z-]+)[ `]", re.M)


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Commands"):]
    table = table[:table.index("\n#")]
    return ROW.findall(table)


@pytest.mark.unit
def test_readme_table_lists_every_command_once() -> None:
    listed = readme_commands()
    assert len(listed) == len(set(listed)), f"listed twice: {[c for c in listed if listed.count(c) > 1]}"
    assert sorted(listed) == sorted(cli.commands), (
        f"README only: {sorted(set(listed) - set(cli.commands))}; CLI only: {sorted(set(cli.commands) - set(listed))}")


@pytest.mark.unit
def test_every_command_has_a_summary_and_an_example() -> None:
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), f"{name} has no help"
        assert f"seal-gguf {name}" in command.help, f"{name}'s --help shows no example"
