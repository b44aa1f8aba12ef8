"""The root click group and what every command shares: error handling and common options."""

from __future__ import annotations

import functools
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from seal_gguf import __version__
from seal_gguf.errors import SealError
from seal_gguf.model.rope import KINDS as ROPE_KINDS

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Terminated(KeyboardInterrupt):
    """A termination signal (`kill`), raised where the program is so that it cleans up as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="seal-gguf")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """seal-gguf: learn SEAL attention scales, fold them into the weights, ship a GGUF.

    \b
    Typical flow:
      seal-gguf import-gguf SmolLM2.gguf smol/          # or start from any HF folder
      seal-gguf train smol/ -o scales.safetensors       # learn SEAL-H scales
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal.gguf --outtype q8_0
      seal-gguf validate smol/ scales.safetensors smol-seal.gguf
      seal-gguf chat smol-seal.gguf
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def handle_errors(func: F) -> F:
    """Turn library errors into one line on stderr and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
        try:
            return func(*args, **kwargs)
        except SealError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            click.echo("Interrupted; no partial output was left behind.", err=True)
            # the shell's convention: 128 + the signal's number (130 Ctrl-C, 143 kill)
            sys.exit(128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT))

    return wrapper  # type: ignore[return-value]


force_option = click.option("--force", is_flag=True, help="Replace an existing output.")
fold_force_option = click.option(
    "--force", is_flag=True,
    help="Replace an existing output; also fold into a model that already carries scales, or scales whose "
         "base_fingerprint names another checkpoint (said in a warning).")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


class SplitSize(click.ParamType):
    """A size as llama.cpp's tools spell it (4G, 500M), in bytes: seal_gguf.gguffile.split.parse_split_size."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from seal_gguf.gguffile.split import parse_split_size  # imports gguf: only when the option is given

        try:
            return value if isinstance(value, int) else parse_split_size(str(value))
        except SealError as exc:
            self.fail(str(exc), param, ctx)


split_size_option = click.option(
    "--split-max-size", type=SplitSize(), default=None, metavar="SIZE",
    help="Write the output as llama.cpp's split parts OUT-00001-of-0000N.gguf ..., each with at most SIZE of "
         "tensor data: 4G, 500M, 100K (1000-based, as llama.cpp's gguf-split) or bytes; llama.cpp loads the "
         "first part. A tensor larger than SIZE gets a part of its own (said in a warning).")

# Paths are checked by the library, which names the file and says what to do.
PATH = click.Path(path_type=Path)


def rope_options(func: F) -> F:
    """--rope-scaling / --rope-factor / --rope-original-context: a training-free context extension.
    The command turns them into a RopeScaling with seal_gguf.model.rope.rope_from_options."""
    options = (
        click.option("--rope-scaling", type=click.Choice(ROPE_KINDS), default=None,
                     help="Extend the context without training: linear (position interpolation), yarn (YaRN) or "
                          "ntk (NTK-aware: the RoPE base raised to theta * F^(d/(d-2)), d the rotary dimension). "
                          "Needs --rope-factor."),
        click.option("--rope-factor", type=float, default=None, metavar="F",
                     help="How many times longer the context gets (> 1)."),
        click.option("--rope-original-context", type=int, default=None, metavar="N",
                     help="The context the model was trained for [default: its max_position_embeddings]."),
    )
    for option in reversed(options):
        func = option(func)
    return func
