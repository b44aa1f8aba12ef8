"""Commands that run models: eval (retrieval accuracy) and chat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from seal_gguf.cases import TASKS
from seal_gguf.fileio import check_output_path
from seal_gguf.measure.evaluate import evaluate, render_table, write_eval_json
from seal_gguf.measure.general import GENERAL_TOKENS
from seal_gguf.measure.plots import check_plot_path, plot_report
from seal_gguf.model.rope import rope_from_options
from seal_gguf.ship.chat import ChatSession, ContextFull, read_document

from .app import PATH, cli, force_option, handle_errors, quiet_option, rope_options


class NumberList(click.ParamType):
    """A comma-separated list of numbers: 1024,2048 or 0,25,50."""

    name = "LIST"

    def __init__(self, kind: type = int):
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        try:
            items = [self.kind(v) for v in str(value).replace(" ", "").split(",") if v]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__} values", param, ctx)
        if not items:
            self.fail("give at least one value", param, ctx)
        return items


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=PATH)
@click.option("--task", type=click.Choice(TASKS), default="lines", show_default=True, help="Retrieval task.")
@click.option("--lengths", type=NumberList(int), default="1024", show_default=True,
              help="Prompt lengths in tokens, comma-separated.")
@click.option("--samples", type=click.IntRange(min=1), default=20, show_default=True,
              help="Cases per length (per length and depth with --depths).")
@click.option("--depths", type=NumberList(float), default=None,
              help="Depths of the line / needle in percent, comma-separated [niah: 0,25,50,75,100].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated cases.")
@click.option("--scales", type=PATH, default=None, help="Scales file applied (by hooks) to the HF model folders.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Answer tokens generated per case.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per model [default: llama.cpp's and PyTorch's own].")
@click.option("--general", is_flag=True,
              help="Also measure what SEAL costs on general text (each SEAL GGUF vs the base GGUF of its type; "
                   "a folder with --scales vs without): perplexity ratio, KL divergence, same top-1.")
@click.option("--general-text", type=PATH, default=None,
              help="With --general: your own UTF-8 text [default: the built-in general text, five genres].")
@click.option("--general-tokens", type=click.IntRange(min=16), default=GENERAL_TOKENS, show_default=True,
              help="With --general: tokens of general text measured.")
@click.option("--json", "json_out", type=PATH, default=None, help="Write every case and figure as JSON.")
@click.option("--plot", "plot_out", type=PATH, default=None, help="Write a plot (.png, .pdf or .svg).")
@rope_options
@force_option
@quiet_option
@handle_errors
def eval_cmd(models: tuple[Path, ...], task: str, lengths: list[int], samples: int, depths: list[float] | None,
             seed: int, scales: Path | None, max_tokens: int, threads: int | None, general: bool,
             general_text: Path | None, general_tokens: int, json_out: Path | None,
             plot_out: Path | None, rope_scaling: str | None, rope_factor: float | None,
             rope_original_context: int | None, force: bool, quiet: bool) -> None:
    """Measure retrieval accuracy of GGUFs (llama.cpp) and HF folders (PyTorch) on the same cases.

    Every model answers the same generated prompts, greedily. Prints accuracy per model and length
    with a 95% interval, and compares the first model with each other one case by case.
    --rope-scaling extends the context of the HF folders; a GGUF carries its own extension.
    --general adds the other half of the picture: what the scales cost on ordinary text.

    \b
    Examples:
      seal-gguf eval smol.gguf smol-seal-q8_0.gguf --lengths 1024,2048 --samples 20
      seal-gguf eval smol-f16.gguf smol-seal-f16.gguf --samples 50 --general
      seal-gguf eval smol/ smol-seal-f16.gguf --scales scales.safetensors --json eval.json --plot eval.png
      seal-gguf eval smol-seal-q8_0.gguf --task niah --lengths 1024,4096 --depths 0,50,100 --samples 4
      seal-gguf eval smol/ smol-yarn2.gguf --rope-scaling yarn --rope-factor 2 --lengths 12288 --samples 10
    """
    rope = rope_from_options(rope_scaling, rope_factor, rope_original_context)
    if json_out is not None:
        check_output_path(json_out, force, inputs=[*models, scales, general_text])
    if not general and (general_text is not None or general_tokens != GENERAL_TOKENS):
        raise click.UsageError("--general-text and --general-tokens need --general")
    if plot_out is not None:
        check_plot_path(plot_out, force)
    report = evaluate(list(models), task, lengths, samples, seed=seed, depths=depths, scales=scales,
                      progress=not quiet, max_tokens=max_tokens, threads=threads, rope=rope,
                      general_tokens=general_tokens if general else 0, general_text=general_text)
    click.echo(render_table(report))
    if json_out is not None:
        write_eval_json(json_out, report, force=force)
        click.echo(f"Wrote {json_out}")
    if plot_out is not None:
        plot_report(report, plot_out, force=force)
        click.echo(f"Wrote {plot_out}")


def _stream(session: ChatSession, text: str, progress: bool) -> None:
    for piece in session.ask(text, progress=progress):
        click.echo(piece, nl=False)
    click.echo()
    if session.context_full:
        click.echo(f"[context full: the reply was cut off at {session.n_ctx} tokens; type /reset to start over, "
                   "or restart with a larger --n-ctx]", err=True)


def _interactive(session: ChatSession, progress: bool) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    template = "its chat template" if session.has_template else "no chat template (llama-cpp-python's default format)"
    click.echo(f"Chatting with {session.name} ({template}, context {session.n_ctx} tokens). "
               "Type /reset to start over; Ctrl-D, Ctrl-C or /exit to end.", err=True)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            click.echo()
            return
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/reset":
            session.reset()
            click.echo("[conversation cleared]", err=True)
            continue
        try:
            _stream(session, line, progress)
        except ContextFull as exc:
            # /reset helps only when earlier turns fill the context, not a document too long for it
            hint = "; type /reset to start over" if any(m["role"] == "assistant" for m in session.messages) else ""
            click.echo(f"[{exc}{hint}]", err=True)


@cli.command()
@click.argument("model", type=PATH)
@click.option("--system", default=None, help="System message (default: the template's own, if any).")
@click.option("--n-ctx", type=click.IntRange(min=64), default=None,
              help="Context size in tokens [default: 4096, grown to fit --file].")
@click.option("--file", "document", type=PATH, default=None, help="A text document put into the first message.")
@click.option("--prompt", default=None, help="Answer this one message and exit (for scripts).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest reply in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.2, show_default=True,
              help="Sampling temperature (0: greedy).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads [default: llama.cpp's own].")
@quiet_option
@handle_errors
def chat(model: Path, system: str | None, n_ctx: int | None, document: Path | None, prompt: str | None,
         max_tokens: int, temperature: float, seed: int, threads: int | None, quiet: bool) -> None:
    """Chat with a GGUF in the terminal (llama.cpp, the GGUF's own chat template, streamed).

    \b
    Examples:
      seal-gguf chat smol-seal-q8_0.gguf
      seal-gguf chat smol-seal-q8_0.gguf --file report.txt --prompt "Summarize the report."
      seal-gguf chat smol-seal-q8_0.gguf --system "Answer briefly." --n-ctx 8192
    """
    text = read_document(document) if document is not None else None
    session = ChatSession(model, n_ctx=n_ctx, system=system, document=text, max_tokens=max_tokens,
                          temperature=temperature, seed=seed, threads=threads)
    try:
        if prompt is not None:
            _stream(session, prompt, not quiet)
        else:
            _interactive(session, not quiet)
    except KeyboardInterrupt:
        click.echo()  # Ctrl-C ends the chat; nothing is written, so there is nothing to clean up
    finally:
        session.close()
