"""The root click group and what every command shares: error handling and common options."""

from __future__ import annotations

import functools
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

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


def exit_interrupted(exc: BaseException) -> NoReturn:
    """Ctrl-C (or `kill`) said in one line on stderr; exit with the shell's code for the signal."""
    click.echo("Interrupted; no partial output was left behind.", err=True)
    # the shell's convention: 128 + the signal's number (130 Ctrl-C, 143 kill)
    sys.exit(128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT))


COMMAND_PATH = "seal_gguf.command_path"  # ctx.meta key: the subcommand being run, for usage errors without a context


class OneLineUsageError(click.UsageError):
    """A usage error of click's (a bad option value, a missing argument, an unknown command) shown as one
    line, as the library's errors are, with where to find the usage instead of the usage itself."""

    def __init__(self, error: click.UsageError, command_path: str | None = None) -> None:
        super().__init__(error.format_message(), error.ctx)
        # click's parser raises some errors (an option missing its value) without the command's context
        self.command_path = error.ctx.command_path if error.ctx is not None else command_path

    def show(self, file: Any = None) -> None:
        message = " ".join(line.strip() for line in self.format_message().splitlines() if line.strip())
        hint = f" (see {self.command_path} --help)" if self.command_path else ""
        click.echo(f"Error: {message}{hint}", file=file, err=True)


@contextmanager
def _one_line_errors(root: click.Context | None = None) -> Iterator[None]:
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, OneLineUsageError):  # the first is `seal-gguf` alone: its help
        raise
    except click.UsageError as exc:
        raise OneLineUsageError(exc, root.meta.get(COMMAND_PATH) if root is not None else None) from None
    except (KeyboardInterrupt, click.Abort) as exc:  # outside a command, e.g. while its arguments are read
        exit_interrupted(exc)


class SealGroup(click.Group):
    """The root group: click's usage errors in one line (exit 2), Ctrl-C while parsing as within a command.
    Everything else (--help, --version, exit codes) is click's own."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[COMMAND_PATH] = f"{ctx.command_path} {name}"
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors(ctx):  # the command's own arguments are parsed here
            return super().invoke(ctx)


@click.group(cls=SealGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="seal-gguf")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """seal-gguf: learn SEAL attention scales, fold them into the weights, ship a GGUF.

    \b
    Typical flow:
      seal-gguf import-gguf SmolLM2.gguf smol/          # or start from any HF folder
      seal-gguf train smol/ -o scales.safetensors       # learn SEAL-C scales
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
            exit_interrupted(exc)

    return wrapper  # type: ignore[return-value]


def echo_warnings(warnings: Iterable[str]) -> None:
    """A result's warnings, a line each on stderr."""
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)


def describe_gguf(paths: Sequence[Path]) -> tuple[str, str]:
    """A GGUF just written as `paths` (one file, or a split set's parts in order), as an output line names it:
    the file, or the set's first and last part; and its size, with the number of parts."""
    size = f"{sum(path.stat().st_size for path in paths) / 1e6:.1f} MB"
    if len(paths) == 1:
        return str(paths[0]), size
    return f"{paths[0]} … {paths[-1].name}", f"{len(paths)} parts, {size}"


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
