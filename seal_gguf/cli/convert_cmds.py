"""Commands that make GGUF files: fold-and-convert, convert, quantize."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from seal_gguf.constants import ScalesMeta
from seal_gguf.convert.quantize import quantize
from seal_gguf.convert.to_gguf import LLAMA_CPP_ENV, convert_to_gguf
from seal_gguf.model.rope import extension_mismatch, rope_for_model
from seal_gguf.scales import read_scales

from .app import PATH, cli, fold_force_option, force_option, handle_errors, quiet_option, rope_options
from .ship_cmds import check_modelfile, modelfile_after_conversion, ollama_flag

outtype_option = click.option(
    "--outtype", default="f16", show_default=True, metavar="TYPE",
    help="f32, f16, bf16, q8_0 (written by the converter) or a llama-quantize type: q4_k_m, q5_k_m, q6_k, "
         "iq4_xs, q4_0, ...")
imatrix_option = click.option("--imatrix", type=PATH, help="Importance matrix for the quantizer (llama-imatrix).")
attn_output_option = click.option(
    "--attn-output-type", metavar="TYPE",
    help="Type of the attn_output tensors, where the folded heads live (e.g. q8_0, q6_k, f16).")
llama_cpp_option = click.option(
    "--llama-cpp", type=PATH, envvar=LLAMA_CPP_ENV, show_envvar=True,
    help="Use this llama.cpp checkout's converter instead of the pinned one (for offline machines).")
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Show the converter's and quantizer's full log.")
output_option = click.option("-o", "--output", "out_path", type=PATH, required=True, help="The GGUF file to write.")


def conversion_options(func: Callable[..., Any], force: Callable[..., Any] = force_option) -> Callable[..., Any]:
    for option in reversed((output_option, outtype_option, imatrix_option, attn_output_option, llama_cpp_option,
                            rope_options, verbose_option, force, quiet_option)):
        func = option(func)
    return func


def report(out_path: Path, outtype: str, started: float) -> None:
    size = out_path.stat().st_size / 1e6
    click.echo(f"Wrote {out_path} ({outtype.lower()}, {size:.1f} MB) in {time.monotonic() - started:.1f} s")


@cli.command("fold-and-convert")
@click.argument("model_dir", type=PATH)
@click.argument("scales", type=PATH)
@functools.partial(conversion_options, force=fold_force_option)
@ollama_flag
@handle_errors
def fold_and_convert(model_dir: Path, scales: Path, out_path: Path, outtype: str, imatrix: Path | None,
                     attn_output_type: str | None, llama_cpp: Path | None, rope_scaling: str | None,
                     rope_factor: float | None, rope_original_context: int | None, verbose: bool, force: bool,
                     quiet: bool, ollama: bool) -> None:
    """Fold SEAL scales into a model while llama.cpp's converter turns it into a GGUF.

    The o_proj columns are scaled inside the converter in one pass (no folded copy on disk);
    the GGUF records the scales' provenance under seal.* keys. Quantized types go through a
    lossless intermediate and llama.cpp's quantizer.

    \b
    Examples:
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal.gguf --outtype q8_0
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-q4.gguf --outtype q4_k_m --attn-output-type q8_0
      seal-gguf fold-and-convert smol/ scales-yarn.safetensors -o smol-16k.gguf --rope-scaling yarn --rope-factor 2
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal.gguf --outtype q8_0 --ollama
    """
    started = time.monotonic()
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    mismatch = extension_mismatch(read_scales(scales).metadata.get(ScalesMeta.ROPE_SCALING), rope)
    if mismatch is not None:
        click.echo(f"warning: {mismatch}", err=True)
    if ollama:
        check_modelfile(out_path, force)
    convert_to_gguf(model_dir, out_path, outtype, scales, imatrix=imatrix, attn_output_type=attn_output_type,
            llama_cpp=llama_cpp, rope=rope, force=force, verbose=verbose, progress=not quiet)
    report(out_path, outtype, started)
    if ollama:
        modelfile_after_conversion(out_path, scales, force)


@cli.command("convert")
@click.argument("model_dir", type=PATH)
@conversion_options
@handle_errors
def convert_cmd(model_dir: Path, out_path: Path, outtype: str, imatrix: Path | None, attn_output_type: str | None,
                llama_cpp: Path | None, rope_scaling: str | None, rope_factor: float | None,
                rope_original_context: int | None, verbose: bool, force: bool, quiet: bool) -> None:
    """Convert a model to GGUF without scales: the baseline, through the same converter.

    With --rope-scaling the GGUF carries the context extension: llama.cpp runs it as is.

    \b
    Examples:
      seal-gguf convert smol/ -o smol-base-q4.gguf --outtype q4_k_m
      seal-gguf convert smol/ -o smol-ntk2.gguf --rope-scaling ntk --rope-factor 2
    """
    started = time.monotonic()
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    convert_to_gguf(model_dir, out_path, outtype, imatrix=imatrix, attn_output_type=attn_output_type,
            llama_cpp=llama_cpp, rope=rope, force=force, verbose=verbose, progress=not quiet)
    report(out_path, outtype, started)


@cli.command("quantize")
@click.argument("in_path", type=PATH)
@click.argument("out_path", type=PATH)
@click.argument("qtype")
@imatrix_option
@attn_output_option
@verbose_option
@force_option
@quiet_option
@handle_errors
def quantize_cmd(in_path: Path, out_path: Path, qtype: str, imatrix: Path | None, attn_output_type: str | None,
                 verbose: bool, force: bool, quiet: bool) -> None:
    """Quantize an f32 / f16 / bf16 GGUF with llama.cpp's quantizer (seal.* keys are kept).

    \b
    Example:
      seal-gguf quantize smol-seal-f32.gguf smol-seal-q4_k_m.gguf q4_k_m --imatrix imatrix.gguf
    """
    started = time.monotonic()
    quantize(in_path, out_path, qtype, imatrix=imatrix, attn_output_type=attn_output_type, force=force,
             progress=not quiet, verbose=verbose)
    report(out_path, qtype, started)
