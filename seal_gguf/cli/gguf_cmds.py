"""Commands on existing GGUF files: fold-gguf."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .app import (
    PATH,
    cli,
    describe_gguf,
    echo_warnings,
    fold_force_option,
    handle_errors,
    quiet_option,
    split_size_option,
)


@cli.command("fold-gguf")
@click.argument("gguf_file", type=PATH)
@click.argument("scales", type=PATH)
@click.option("-o", "--output", "out_path", type=PATH, required=True,
              help="The folded GGUF to write (split output: its parts OUT-00001-of-0000N.gguf ...).")
@split_size_option
@fold_force_option
@quiet_option
@handle_errors
def fold_gguf_cmd(gguf_file: Path, scales: Path, out_path: Path, split_max_size: int | None, force: bool,
                  quiet: bool) -> None:
    """Fold SEAL scales into an existing GGUF, for when there is no HF checkpoint.

    Only the attn_output tensors change, in their own type: f32, f16 and bf16 are scaled exactly;
    Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are dequantized, scaled and quantized back (with SEAL-H scales
    and a head size that is a multiple of 32 that costs fp16 rounding only); K-quants, IQ4_NL,
    IQ4_XS and IQ3_S are requantized by llama.cpp's quantizer, an extra loss. SEAL-C scales
    requantize every block of the low-bit types (2-3x the base GGUF's KLD on real models): take
    SEAL-C through fold-and-convert or convert + quantize instead. Every other
    tensor and all metadata are copied byte for byte; seal.* keys record the scales. --force also
    folds into a GGUF that already has scales (its seal.* keys are replaced).

    A split GGUF is given by its first part (NAME-00001-of-0000N.gguf; every part must be there): the
    output has the same parts, OUT-00001-of-0000N.gguf ..., unless --split-max-size splits it anew (a
    size larger than the model writes one file, OUT).

    \b
    Examples:
      seal-gguf fold-gguf SmolLM2-135M-Instruct.Q4_1.gguf scales.safetensors -o smol-seal.Q4_1.gguf
      seal-gguf fold-gguf model-f16.gguf scales.safetensors -o model-seal-f16.gguf
      seal-gguf fold-gguf big-Q4_K_M-00001-of-00003.gguf scales.safetensors -o big-seal-Q4_K_M.gguf
      seal-gguf fold-gguf big-f16.gguf scales.safetensors -o big-seal-f16.gguf --split-max-size 4G
    """
    from seal_gguf.fold.gguf import fold_gguf  # imports gguf: only when the command runs

    started = time.monotonic()
    result = fold_gguf(gguf_file, scales, out_path, force=force, progress=not quiet, split_max_size=split_max_size)
    echo_warnings(result.warnings)
    for qtype in result.requantized:
        click.echo(f"Note: the {qtype} attn_output tensors were requantized by llama.cpp's quantizer "
                   "(lossy); fold-and-convert from the HF model avoids that", err=True)
    files, size = describe_gguf(result.parts)
    click.echo(f"Folded {result.layers} attn_output tensors ({', '.join(result.types)}) into {files} "
               f"({size}, largest |weight| {result.max_abs_weight:.4g}) in {time.monotonic() - started:.1f} s")
