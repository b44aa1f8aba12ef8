"""What every command shares (seal_gguf.cli.app): click's usage errors in one line, Ctrl-C while the
arguments are read, --help and --version, warnings printed by one helper."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import seal_gguf.gguffile.split as split_module
from seal_gguf.cli.app import cli, echo_warnings

CLI = Path(__file__).resolve().parent.parent / "seal_gguf" / "cli"

pytestmark = pytest.mark.unit


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(("args", "message"), [
    (["convert"], "Error: Missing argument 'MODEL_DIR'. (see cli convert --help)"),
    (["fold-gguf", "a.gguf", "s.safetensors", "-o", "o.gguf", "--split-max-size", "4GB"],
     "Error: Invalid value for '--split-max-size': split size '4GB': expected a number of bytes, optionally "
     "followed by K, M or G (1000-based, as llama.cpp's gguf-split): 4G, 500M (see cli fold-gguf --help)"),
    (["serve", "m.gguf", "--port", "0"], "Error: Invalid value for '--port': 0 is not in the range "
                                         "1<=x<=65535. (see cli serve --help)"),
    (["fold-gguf", "a.gguf", "s.safetensors", "-o", "o.gguf", "--forse"],
     "Error: No such option '--forse'. Did you mean '--force'? (see cli fold-gguf --help)"),
    (["folds"], "Error: No such command 'folds'. Did you mean 'fold'? (see cli --help)"),
    # click's parser raises this one without the command's context: the hint still names the command
    (["convert", "smol", "--outtype"], "Error: Option '--outtype' requires an argument. (see cli convert --help)"),
])
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.splitlines() == [message], result.output


def test_help_version_and_the_bare_command_are_clicks() -> None:
    for args in (["--help"], ["convert", "-h"]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stdout.startswith("Usage: cli ") and not result.stderr, result.output
    version = invoke("--version")
    assert version.exit_code == 0 and re.fullmatch(r"seal-gguf, version \S+\n", version.stdout), version.output
    bare = invoke()  # click shows the help, exit 2 (a usage error of its own)
    assert bare.exit_code == 2 and "Commands:" in bare.output and "Error" not in bare.output


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, click.Abort])
def test_ctrl_c_while_the_arguments_are_read(monkeypatch: pytest.MonkeyPatch, interrupt: type) -> None:
    def interrupted(text: str) -> int:
        raise interrupt

    monkeypatch.setattr(split_module, "parse_split_size", interrupted)
    result = invoke("fold-gguf", "a.gguf", "s.safetensors", "-o", "o.gguf", "--split-max-size", "4G")
    assert result.exit_code == 130, result.output
    assert result.output == "Interrupted; no partial output was left behind.\n"


def test_warnings_are_printed_by_one_helper(capsys: pytest.CaptureFixture[str]) -> None:
    echo_warnings(["one", "two"])
    assert capsys.readouterr().err == "Warning: one\nWarning: two\n"
    # no command prints a warning line of its own
    own = re.compile(r"""echo\(\s*f?["'](Warning|warning):""")
    printing = sorted(path.name for path in CLI.glob("*.py")
                      if path.name != "app.py" and own.search(path.read_text(encoding="utf-8")))
    assert printing == []
