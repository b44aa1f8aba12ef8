"""`seal-gguf imatrix`: an importance matrix made from the SEAL model, for llama.cpp's quantizer."""

from __future__ import annotations

from pathlib import Path

import click

from seal_gguf.convert.imatrix import DEFAULT_CHUNKS, DEFAULT_LENGTH, make_imatrix
from seal_gguf.convert.quantize import warn_on_stderr
from seal_gguf.fileio import check_output_path
from seal_gguf.learn.anchor import anchor_documents
from seal_gguf.model.loading import DEVICES, DTYPES
from seal_gguf.texts import read_text_document

from .app import PATH, cli, force_option, handle_errors, quiet_option


@cli.command("imatrix")
@click.argument("model_dir", type=PATH)
@click.argument("scales", type=PATH, required=False)
@click.option("-o", "--output", type=PATH, required=True, help="The imatrix GGUF to write.")
@click.option("--text", "texts", type=PATH, multiple=True,
              help="UTF-8 calibration text instead of the built-in anchor text (repeatable).")
@click.option("--length", type=click.IntRange(min=16), default=None,
              help=f"Tokens per chunk [default: the scales' training length, else {DEFAULT_LENGTH}].")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help=f"Chunks to run: up to half general text, the rest line-retrieval prompts "
                   f"[default: {DEFAULT_CHUNKS}].")
@click.option("--tokens", type=click.IntRange(min=1), default=None,
              help="Budget in tokens instead of --chunks (rounded up to whole chunks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the retrieval prompts.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto picks cuda, then mps, then cpu.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Dtype the model runs in.")
@quiet_option
@force_option
@handle_errors
def imatrix_cmd(model_dir: Path, scales: Path | None, output: Path, texts: tuple[Path, ...], length: int | None,
                chunks: int | None, tokens: int | None, seed: int, device: str, dtype: str, quiet: bool,
                force: bool) -> None:
    """Compute an importance matrix with the SEAL scales applied, for llama.cpp's quantizer.

    Sums the squared inputs of every weight matrix of the decoder layers over calibration text: general
    text and generated line-retrieval prompts at the length SEAL was trained for (community matrices are
    usually made at 512 tokens). Without SCALES: the model's own matrix. The file is llama-imatrix's GGUF
    format; pass it to convert, fold-and-convert or quantize with --imatrix (the IQ1/IQ2/IQ3_XXS types
    and q2_k_s need one).

    \b
    Examples:
      seal-gguf imatrix smol/ scales.safetensors -o smol-seal.imatrix.gguf
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal-iq4_xs.gguf --outtype iq4_xs \\
          --imatrix smol-seal.imatrix.gguf
      seal-gguf imatrix smol/ scales.safetensors -o im.gguf --text my-corpus.txt --length 4096 --chunks 64
    """
    check_output_path(output, force, inputs=[scales, *texts])  # before reading the texts
    documents = [read_text_document(text) for text in texts] if texts else anchor_documents()
    path, data = make_imatrix(model_dir, scales, output, documents, length=length, chunks=chunks, tokens=tokens,
                              seed=seed, device=device, dtype=dtype, progress=not quiet, force=force,
                              warn=warn_on_stderr)
    click.echo(f"Wrote {path}: {len(data.sums)} weights, {data.chunk_count} chunks of up to {data.chunk_size} "
               f"tokens ({sum(data.counts.values()) // len(data.counts):,} tokens)")
