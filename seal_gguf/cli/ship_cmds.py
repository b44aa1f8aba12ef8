"""Commands that ship a GGUF where people run models: serve, ollama, card."""

from __future__ import annotations

from pathlib import Path

import click

from seal_gguf.errors import InputError
from seal_gguf.fileio import check_output_path
from seal_gguf.ship.card import write_card
from seal_gguf.ship.ollama import ModelfileResult, default_modelfile, ollama_name, write_modelfile
from seal_gguf.ship.serve import DEFAULT_HOST, DEFAULT_PORT, LlamaServer, plan_server

from .app import PATH, cli, echo_warnings, force_option, handle_errors

scales_option = click.option(
    "--scales", type=PATH,
    help="The scales file folded into the GGUF, for its training recipe (found by itself when bundled with "
         "seal-gguf or named in a report).")
ollama_flag = click.option(
    "--ollama", is_flag=True,
    help="Also write an Ollama Modelfile beside the GGUF (NAME.Modelfile: chat template, stops, num_ctx).")


def report_modelfile(result: ModelfileResult) -> None:
    echo_warnings(result.warnings)
    t = result.translation
    template = f"{t.family} template" if t.family else "your template" + ("" if t.checked else " (not checked)")
    system = ", default system message" if t.system else ""
    click.echo(f"Wrote {result.path} ({template}{system}, num_ctx {result.num_ctx}: {result.ctx_reason})")
    click.echo(f"  ollama create {ollama_name(result.gguf)} -f {result.path}")


def check_modelfile(gguf: Path, force: bool) -> None:
    """--ollama: an existing Modelfile is refused before a conversion, not after it."""
    check_output_path(default_modelfile(gguf), force)


def modelfile_after_conversion(gguf: Path, scales: Path | None, force: bool) -> None:
    """--ollama: the Modelfile of a GGUF just written (which stays, whatever happens to the Modelfile)."""
    try:
        result = write_modelfile(gguf, scales=scales, force=force)
    except InputError as exc:
        raise InputError(f"wrote {gguf}, but no Modelfile: {exc}") from None
    report_modelfile(result)


@cli.command()
@click.argument("model", type=PATH)
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True, help="Port.")
@click.option("--n-ctx", type=click.IntRange(min=1), default=None,
              help="Context size in tokens [default: the model's context length up to 8192, or the length the "
                   "SEAL scales were learned at where that is longer].")
@scales_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads [default: llama-cpp-python's, half the cores].")
@click.option("--api-key", envvar="SEAL_GGUF_API_KEY", show_envvar=True, default=None,
              help="Answer only requests that send it (Authorization: Bearer KEY).")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log and every request.")
@handle_errors
def serve(model: Path, host: str, port: int, n_ctx: int | None, scales: Path | None, threads: int | None,
          api_key: str | None, verbose: bool) -> None:
    """Serve a GGUF with an OpenAI-compatible HTTP API (llama-cpp-python's server).

    Chat completions use the GGUF's own chat template. Ctrl-C stops the server.

    \b
    Examples:
      seal-gguf serve smol-seal-q8_0.gguf --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}'
    """
    plan = plan_server(model, host, port, n_ctx, scales)
    server = LlamaServer(plan, threads=threads, api_key=api_key, verbose=verbose)
    template = "the GGUF's chat template" if plan.has_template else "no chat template in the GGUF: llama-2 format"
    click.echo(f"Serving {plan.alias} at {plan.url} (OpenAI-compatible; {template}; context {plan.n_ctx} tokens, "
               f"{plan.ctx_reason}). Ctrl-C stops it.", err=True)
    try:
        server.run()
    except KeyboardInterrupt:
        click.echo("Server stopped.", err=True)
    finally:
        server.close()


@cli.command("ollama")
@click.argument("model", type=PATH)
@click.option("-o", "--output", "out_path", type=PATH, default=None,
              help="The Modelfile to write [default: NAME.Modelfile beside the GGUF].")
@click.option("--template", type=PATH, default=None,
              help="Your own Ollama (Go) template, for a chat template seal-gguf does not know.")
@click.option("--stop", multiple=True, help="A stop string (repeatable) [default: the template family's].")
@click.option("--num-ctx", type=click.IntRange(min=1), default=None,
              help="Ollama's context size [default: the model's context length up to 8192, or the length the "
                   "SEAL scales were learned at where that is longer].")
@scales_option
@force_option
@handle_errors
def ollama_cmd(model: Path, out_path: Path | None, template: Path | None, stop: tuple[str, ...],
               num_ctx: int | None, scales: Path | None, force: bool) -> None:
    """Write an Ollama Modelfile for a GGUF, so that `ollama create` takes it as is.

    The GGUF's Jinja chat template becomes Ollama's Go template (ChatML, Llama 3, Mistral, Gemma,
    Phi-3), checked to give the same prompts; stop strings and num_ctx come with it.

    \b
    Examples:
      seal-gguf ollama smol-seal-q8_0.gguf
      ollama create smol-seal -f smol-seal-q8_0.Modelfile && ollama run smol-seal
      seal-gguf ollama my-model.gguf --template my-template.gotmpl --stop "<|end|>" --num-ctx 4096
    """
    report_modelfile(write_modelfile(model, out_path, template=template, stop=stop, num_ctx=num_ctx, scales=scales,
                                     force=force))


@cli.command("card")
@click.argument("model", type=PATH)
@click.option("--validate-json", type=PATH, default=None, help="Report of `seal-gguf validate --json`.")
@click.option("--eval-json", type=PATH, default=None, help="Report of `seal-gguf eval --json`.")
@scales_option
@click.option("--base-model", metavar="REPO", default=None,
              help="The model the GGUF was made from, as a hub id (default: the GGUF's general.source.*).")
@click.option("--license", "license_id", metavar="ID", default=None,
              help="License id for the card (default: the GGUF's general.license).")
@click.option("-o", "--output", "out_path", type=PATH, default=None,
              help="The card to write [default: README.md beside the GGUF].")
@force_option
@handle_errors
def card(model: Path, validate_json: Path | None, eval_json: Path | None, scales: Path | None,
         base_model: str | None, license_id: str | None, out_path: Path | None, force: bool) -> None:
    """Write a model card (README.md with hub front matter) for a SEAL GGUF.

    From the GGUF's seal.* provenance and its scales' training recipe, validate's figures for this
    GGUF and eval's retrieval table for its type, with the commands that produced them.

    \b
    Examples:
      seal-gguf card smol-seal-q8_0.gguf
      seal-gguf card smol-seal-q8_0.gguf --validate-json validate.json --eval-json eval.json -o card.md
    """
    result = write_card(model, out_path, validate_json=validate_json, eval_json=eval_json, scales=scales,
                        base_model=base_model, license_id=license_id, force=force)
    recipe = f"recipe from {result.recipe.source.name}" if result.recipe else "no training recipe found"
    click.echo(f"Wrote {result.path} ({recipe})")
