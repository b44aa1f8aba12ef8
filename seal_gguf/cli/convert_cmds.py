"""Commands that make GGUF files: fold-and-convert, convert, quantize."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from seal_gguf.constants import ScalesMeta
from seal_gguf.convert.quantize import TENSOR_TYPES, TensorTypes, parse_tensor_types, quantize
from seal_gguf.convert.to_gguf import LLAMA_CPP_ENV, convert_to_ggufs, output_paths, split_outtypes
from seal_gguf.errors import InputError
from seal_gguf.gguffile.split import written_files
from seal_gguf.model.rope import extension_mismatch, rope_for_model
from seal_gguf.scales import read_scales

from .app import (
    PATH,
    cli,
    describe_gguf,
    echo_warnings,
    fold_force_option,
    force_option,
    handle_errors,
    quiet_option,
    rope_options,
    split_size_option,
)
from .ship_cmds import check_modelfile, modelfile_after_conversion, ollama_flag

outtype_option = click.option(
    "--outtype", default="f16", show_default=True, metavar="TYPE[,TYPE...]",
    help="f32, f16, bf16, q8_0 (written by the converter) or a llama-quantize type: q4_k_m, q5_k_m, q6_k, "
         "iq4_xs, q4_0, ... Several, comma-separated, convert once and quantize each type from the same "
         "lossless intermediate; -o is then a folder (files MODEL[-seal]-TYPE.gguf) or a name with {type}. "
         "Each file gets its name only once complete: after Ctrl-C the same command with --resume keeps the "
         "finished ones and makes the rest; --force makes them all again.")
resume_option = click.option(
    "--resume", is_flag=True,
    help="Keep outputs already there of the same type and scales (an interrupted run's finished files) and make "
         "the rest. The files do not record the model or the other options: resume only the same command.")
imatrix_option = click.option("--imatrix", type=PATH, help="Importance matrix for the quantizer (llama-imatrix).")
TENSOR_TYPE_OPTIONS = (
    click.option("--attn-output-type", metavar="TYPE",
                 help="Type of the attn_output tensors, where the folded heads live (e.g. q8_0, q6_k, f16); "
                      "the same as --tensor-type 'attn_output\\.weight$=TYPE' before the others."),
    click.option("--tensor-type", "tensor_type", multiple=True, metavar="PATTERN=TYPE",
                 help="As llama-quantize's: tensors whose GGUF name PATTERN (a regular expression, e.g. "
                      "'blk\\.[0-3]\\.ffn_down' or attn_v) matches get TYPE; repeatable, the first match wins. "
                      f"Types: {', '.join(TENSOR_TYPES)}."),
    click.option("--output-tensor-type", metavar="TYPE",
                 help="Type of output.weight (with tied embeddings: of token_embd, unless "
                      "--token-embedding-type says otherwise)."),
    click.option("--token-embedding-type", metavar="TYPE", help="Type of token_embd.weight."),
    click.option("--pure", is_flag=True,
                 help="No k-quant mixture: every tensor in the type's base type (q4_k_m: q4_k), except those "
                      "named by the options above."),
)


def tensor_type_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """llama-quantize's per-tensor options, given to the command as one `tensor_types` (TensorTypes);
    apply below handle_errors, which reports a bad pattern or type."""

    @functools.wraps(func)
    def wrapper(*args: Any, attn_output_type: str | None, tensor_type: tuple[str, ...],
                output_tensor_type: str | None, token_embedding_type: str | None, pure: bool, **kwargs: Any) -> Any:
        types = parse_tensor_types(tensor_type, attn_output_type=attn_output_type, pure=pure,
                                   output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type)
        return func(*args, tensor_types=types, **kwargs)

    for option in reversed(TENSOR_TYPE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper

llama_cpp_option = click.option(
    "--llama-cpp", type=PATH, envvar=LLAMA_CPP_ENV, show_envvar=True,
    help="Use this llama.cpp checkout's converter instead of the pinned one (for offline machines).")
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Show the converter's and quantizer's full log.")
output_option = click.option(
    "-o", "--output", "out_path", type=click.Path(), required=True,  # a str: a trailing / says "a folder"
    help="The GGUF file to write, or an existing folder (file MODEL[-seal]-TYPE.gguf); with several types, a "
         "folder or a file name with {type} in it.")


def conversion_options(func: Callable[..., Any], force: Callable[..., Any] = force_option) -> Callable[..., Any]:
    for option in reversed((output_option, outtype_option, imatrix_option, split_size_option, llama_cpp_option,
                            rope_options, verbose_option, force, resume_option, quiet_option)):
        func = option(func)
    return func


def report(first: Path, outtype: str, started: float, written: bool = True) -> None:
    """The line for an output of type `outtype` whose first file is `first`."""
    files, size = describe_gguf(written_files(first))
    if written:
        tqdm.write(f"Wrote {files} ({outtype.lower()}, {size}) in {time.monotonic() - started:.1f} s")
    else:
        tqdm.write(f"Kept {files} ({outtype.lower()}, {size}): finished by an earlier run")


def write_ggufs(model_dir: Path, outputs: dict[str, Path], scales: Path | None, started: float,
                **options: Any) -> None:
    """convert_to_ggufs, a line per output; after Ctrl-C in a set, how to resume."""
    finished: list[str] = []

    def said(name: str, path: Path, written: bool) -> None:
        finished.append(name)
        report(path, name, started, written)

    try:
        convert_to_ggufs(model_dir, outputs, scales, report=said, **options)
    except KeyboardInterrupt:
        if len(outputs) > 1:
            again = ("the same command with --resume makes the rest" if options.get("split_max_size") is None
                     else "the same command with --force makes the set again")
            click.echo(f"{len(finished)} of {len(outputs)} types finished; {again}.", err=True)
        raise


@cli.command("fold-and-convert")
@click.argument("model_dir", type=PATH)
@click.argument("scales", type=PATH)
@functools.partial(conversion_options, force=fold_force_option)
@ollama_flag
@handle_errors
@tensor_type_options
def fold_and_convert(model_dir: Path, scales: Path, out_path: str, outtype: str, imatrix: Path | None,
                     tensor_types: TensorTypes, split_max_size: int | None, llama_cpp: Path | None,
                     rope_scaling: str | None, rope_factor: float | None, rope_original_context: int | None,
                     verbose: bool, force: bool, resume: bool, quiet: bool, ollama: bool) -> None:
    """Fold SEAL scales into a model while llama.cpp's converter turns it into a GGUF.

    The o_proj columns are scaled inside the converter in one pass (no folded copy on disk);
    the GGUF records the scales' provenance under seal.* keys. Quantized types go through a
    lossless intermediate and llama.cpp's quantizer.

    \b
    Examples:
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal.gguf --outtype q8_0
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-q4.gguf --outtype q4_k_m --attn-output-type q8_0
      seal-gguf fold-and-convert smol/ scales.safetensors -o ggufs/ --outtype q4_k_m,q5_k_m,q8_0,iq4_xs --imatrix im.gguf
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal-{type}.gguf --outtype q4_k_m,q6_k \\
          --tensor-type 'blk\\.(0|1)\\.ffn_down=q8_0' --token-embedding-type q8_0
      seal-gguf fold-and-convert smol/ scales-yarn.safetensors -o smol-16k.gguf --rope-scaling yarn --rope-factor 2
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal.gguf --outtype q8_0 --ollama
      seal-gguf fold-and-convert big/ scales.safetensors -o big-seal-q4_k_m.gguf --outtype q4_k_m --split-max-size 4G
    """
    started = time.monotonic()
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    mismatch = extension_mismatch(read_scales(scales).metadata.get(ScalesMeta.ROPE_SCALING), rope)
    if mismatch is not None:
        echo_warnings([mismatch])
    outtypes = split_outtypes(outtype)
    if ollama and len(outtypes) > 1:
        raise InputError("--ollama takes one --outtype: run the command once per type Ollama gets")
    if ollama and split_max_size is not None:
        raise InputError("--ollama takes one GGUF file, not split parts: leave out --split-max-size")
    outputs = output_paths(outtypes, out_path, model_dir, folded=True)
    gguf = next(iter(outputs.values()))
    if ollama:
        check_modelfile(gguf, force)
    write_ggufs(model_dir, outputs, scales, started, imatrix=imatrix, tensor_types=tensor_types,
                split_max_size=split_max_size, llama_cpp=llama_cpp, rope=rope, force=force, resume=resume,
                verbose=verbose, progress=not quiet)
    if ollama:
        modelfile_after_conversion(gguf, scales, force)


@cli.command("convert")
@click.argument("model_dir", type=PATH)
@conversion_options
@handle_errors
@tensor_type_options
def convert_cmd(model_dir: Path, out_path: str, outtype: str, imatrix: Path | None, tensor_types: TensorTypes,
                split_max_size: int | None, llama_cpp: Path | None, rope_scaling: str | None,
                rope_factor: float | None, rope_original_context: int | None, verbose: bool, force: bool,
                resume: bool, quiet: bool) -> None:
    """Convert a model to GGUF without scales: the baseline, through the same converter.

    With --rope-scaling the GGUF carries the context extension: llama.cpp runs it as is.

    \b
    Examples:
      seal-gguf convert smol/ -o smol-base-q4.gguf --outtype q4_k_m
      seal-gguf convert smol/ -o smol-base-{type}.gguf --outtype f16,q8_0,q4_k_m
      seal-gguf convert smol/ -o smol-ntk2.gguf --rope-scaling ntk --rope-factor 2
    """
    started = time.monotonic()
    rope = rope_for_model(model_dir, rope_scaling, rope_factor, rope_original_context)
    outputs = output_paths(split_outtypes(outtype), out_path, model_dir, folded=False)
    write_ggufs(model_dir, outputs, None, started, imatrix=imatrix, tensor_types=tensor_types,
                split_max_size=split_max_size, llama_cpp=llama_cpp, rope=rope, force=force, resume=resume,
                verbose=verbose, progress=not quiet)


@cli.command("quantize")
@click.argument("in_path", type=PATH)
@click.argument("out_path", type=PATH)
@click.argument("qtype")
@imatrix_option
@split_size_option
@verbose_option
@force_option
@quiet_option
@handle_errors
@tensor_type_options
def quantize_cmd(in_path: Path, out_path: Path, qtype: str, imatrix: Path | None, tensor_types: TensorTypes,
                 split_max_size: int | None, verbose: bool, force: bool, quiet: bool) -> None:
    """Quantize an f32 / f16 / bf16 GGUF with llama.cpp's quantizer (seal.* keys are kept).

    \b
    Examples:
      seal-gguf quantize smol-seal-f32.gguf smol-seal-q4_k_m.gguf q4_k_m --imatrix imatrix.gguf
      seal-gguf quantize big-seal-f16.gguf big-seal-q4_k_m.gguf q4_k_m --split-max-size 4G
    """
    started = time.monotonic()
    written = quantize(in_path, out_path, qtype, imatrix=imatrix, tensor_types=tensor_types, force=force,
                       progress=not quiet, verbose=verbose, split_max_size=split_max_size)
    report(written, qtype, started)
