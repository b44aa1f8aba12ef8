"""Commands that exchange scales with PEFT: export-peft, import-peft (IA3 on o_proj)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from seal_gguf.constants import GRANULARITIES, GRANULARITY_CHANNEL, GRANULARITY_HEAD, GRANULARITY_LABEL
from seal_gguf.ship.peft import export_peft, import_peft

from .app import PATH, cli, echo_warnings, force_option, handle_errors


@cli.command("export-peft")
@click.argument("scales", type=PATH)
@click.argument("model_dir", type=PATH)
@click.option("-o", "--output", "out_dir", type=PATH, required=True, help="Folder for the PEFT adapter.")
@click.option("--force", is_flag=True,
              help="Replace an existing output; also export for a model that already carries scales, or scales "
                   "whose base_fingerprint names another checkpoint (said in a warning).")
@handle_errors
def export_peft_cmd(scales: Path, model_dir: Path, out_dir: Path, force: bool) -> None:
    """Write SEAL scales as a PEFT IA3 adapter on o_proj (adapter_config.json, adapter_model.safetensors).

    PEFT loads it onto the model in MODEL_DIR; merge_and_unload() gives the folded model. SEAL-H is
    written as SEAL-C (each head's scale repeated over its channels).

    \b
    Example (then, in Python):
      seal-gguf export-peft scales.safetensors smol/ -o smol-seal-ia3/
      # model = PeftModel.from_pretrained(model, "smol-seal-ia3").merge_and_unload()
    """
    result = export_peft(scales, model_dir, out_dir, force=force)
    echo_warnings(result.warnings)
    click.echo(f"Wrote {result.out_dir}: IA3 on o_proj's input features of {result.layers} layers "
               f"({GRANULARITY_LABEL[result.granularity]}; target_modules {result.target_modules})")


@cli.command("import-peft")
@click.argument("adapter_dir", type=PATH)
@click.option("-o", "--output", "out_path", type=PATH, required=True, help="Scales file to write.")
@click.option("--model", "model_dir", type=PATH, default=None,
              help="The model the adapter is for [default: its base_model_name_or_path, if a local folder].")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=GRANULARITY_CHANNEL, show_default=True,
              help="channel: SEAL-C; head: SEAL-H, for an adapter whose vector is constant within every head.")
@force_option
@handle_errors
def import_peft_cmd(adapter_dir: Path, out_path: Path, model_dir: Path | None, granularity: str, force: bool) -> None:
    """Read a PEFT IA3 adapter on o_proj (as a feed-forward module) as a SEAL scales file.

    Other adapters (LoRA, IA3 on k_proj / v_proj / down_proj, IA3 on o_proj's outputs) are refused.

    \b
    Examples:
      seal-gguf import-peft my-ia3/ -o scales.safetensors --model smol/
      seal-gguf fold-and-convert smol/ scales.safetensors -o smol-seal.gguf --outtype q8_0
    """
    result = import_peft(adapter_dir, out_path, model_dir, granularity, force=force,
                         command=shlex.join(["seal-gguf", *sys.argv[1:]]))
    if result.layers_missing:
        echo_warnings([f"the adapter has no vector for layer(s) {', '.join(map(str, result.layers_missing))} "
                       "of the model: their scales are 1.0 (as PEFT leaves a module without weights)"])
    recipe = "; the recipe it was exported with is kept" if result.recipe_restored else ""
    click.echo(f"Wrote {result.path}: {GRANULARITY_LABEL[result.granularity]} from the IA3 vectors of "
               f"{result.layers_adapted} o_proj modules{recipe}")
    if result.head_constant and result.granularity != GRANULARITY_HEAD:
        click.echo("Note: every head's vector is constant over its channels: --granularity head writes the same "
                   "scales as SEAL-H")
