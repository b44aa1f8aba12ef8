"""Commands on HF checkpoints and scales files: inspect, fold, import-gguf."""

from __future__ import annotations

import json
from pathlib import Path

import click

from seal_gguf.convert.from_gguf import IMPORT_DTYPES, import_gguf
from seal_gguf.errors import InputError
from seal_gguf.fold.hf import fold_checkpoint
from seal_gguf.measure.plots import check_plot_path, plot_scales
from seal_gguf.scales import read_scales
from seal_gguf.ship.inspect import inspect_path

from .app import PATH, cli, echo_warnings, fold_force_option, force_option, handle_errors, quiet_option


@cli.command()
@click.argument("path", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", "plot_out", type=PATH, default=None,
              help="Scales files: draw them as a layers x heads heat map (.png, .pdf or .svg).")
@click.option("--force", is_flag=True, help="Replace an existing plot.")
@handle_errors
def inspect(path: Path, as_json: bool, plot_out: Path | None, force: bool) -> None:
    """Describe a scales file, or show the SEAL provenance of a GGUF or model folder.

    \b
    Examples:
      seal-gguf inspect scales.safetensors
      seal-gguf inspect scales.safetensors --plot scales.png   # beside `seal-gguf heads --plot`
      seal-gguf inspect smol-seal-q8_0.gguf
      seal-gguf inspect smol-folded/
    """
    if plot_out is not None:
        check_plot_path(plot_out, force)
    report = inspect_path(path)
    if plot_out is not None:
        if report["kind"] != "scales":
            what = "a GGUF file" if report["kind"] == "gguf" else "a model folder"
            raise InputError(f"{path}: --plot draws scales files only, and this is {what}")
        plot_scales(read_scales(path), plot_out, name=path.name, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    if report["kind"] == "scales":
        meta = report["metadata"]
        click.echo(f"{path}: SEAL scales, {report['granularity']} granularity, shape {report['shape']}")
        click.echo(f"  model_type {meta.get('model_type')}, sha256 {report['sha256'][:16]}...")
        click.echo(f"  min {report['min']:.4f}  max {report['max']:.4f}  mean {report['mean']:.4f}  "
                   f"geomean {report['geomean']:.4f}")
        for title, key in (("most amplified", "amplified"), ("most suppressed", "suppressed")):
            heads = ", ".join(f"L{layer}.H{head}={value:.3f}" for layer, head, value in report[key])
            click.echo(f"  {title}: {heads}")
        provenance = {k: v for k, v in meta.items()
                      if k not in ("format", "granularity", "model_type", "num_layers", "num_heads", "head_dim")}
        for key, value in provenance.items():
            click.echo(f"  {key}: {value}")
        if plot_out is not None:
            click.echo(f"Wrote {plot_out}")
    elif report["kind"] == "gguf":
        meta = report["metadata"]
        seal = {k: v for k, v in meta.items() if k.startswith("seal.")}
        split = f" (first of {report['parts']} parts)" if report["parts"] > 1 else ""
        click.echo(f"{path}: GGUF{split}, architecture {meta.get('general.architecture')}")
        if not seal:
            click.echo("  no SEAL provenance (seal.* keys): not folded by seal-gguf")
        for key, value in seal.items():
            click.echo(f"  {key}: {value}")
    else:
        click.echo(f"{path}: model folder, model_type {report['model_type']}")
        fold = report["seal_fold"]
        if not fold:
            click.echo("  no SEAL scales folded in")
        else:
            for key, value in fold.items():
                click.echo(f"  seal_fold.{key}: {value}")


@cli.command()
@click.argument("model_dir", type=PATH)
@click.argument("scales", type=PATH)
@click.option("-o", "--output", "out_dir", type=PATH, required=True, help="Folder for the folded checkpoint.")
@fold_force_option
@quiet_option
@handle_errors
def fold(model_dir: Path, scales: Path, out_dir: Path, force: bool, quiet: bool) -> None:
    """Fold SEAL scales into an HF checkpoint's o_proj weights.

    Column j of every o_proj weight is multiplied by s[j]; every other tensor is copied byte for
    byte, with tokenizer, chat template and configs. Tensors are streamed one at a time.

    \b
    Example:
      seal-gguf fold smol/ scales.safetensors -o smol-seal/
    """
    result = fold_checkpoint(model_dir, scales, out_dir, force=force, progress=not quiet)
    echo_warnings(result.warnings)
    click.echo(f"Folded {result.layers} o_proj weights into {result.out_dir} "
               f"(largest |weight| {result.max_abs_weight:.4g})")


@cli.command("import-gguf")
@click.argument("gguf_file", type=PATH)
@click.argument("out_dir", type=PATH)
@click.option("--dtype", type=click.Choice(sorted(IMPORT_DTYPES)), default="float32", show_default=True,
              help="Dtype of the dequantized weights.")
@force_option
@quiet_option
@handle_errors
def import_gguf_cmd(gguf_file: Path, out_dir: Path, dtype: str, force: bool, quiet: bool) -> None:
    """Turn a GGUF into a plain HF checkpoint (dequantized) with tokenizer and chat template.

    Written only when it is the GGUF's model: config values transformers does not read are derived as
    llama.cpp derives them (head size from the key length, Gemma's attention scale), a GGUF that lacks
    weights is refused, and the imported model is checked against the GGUF in llama.cpp on a short
    token sequence (mean KL divergence within what the GGUF's type and --dtype cost) before anything
    is written. A split GGUF is given by its first part (NAME-00001-of-0000N.gguf), with every part
    beside it; they are merged into a temporary GGUF beside OUT_DIR while transformers reads them.

    \b
    Examples:
      seal-gguf import-gguf SmolLM2-135M-Instruct.Q4_1.gguf smol/
      seal-gguf import-gguf big-Q8_0-00001-of-00003.gguf big/
    """
    import_gguf(gguf_file, out_dir, dtype=dtype, force=force, progress=not quiet)
    click.echo(f"Wrote {out_dir}")
