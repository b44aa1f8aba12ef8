"""`seal-gguf validate --rope-scaling`: every level runs the extended model, and each GGUF must
carry the extension it is validated under.

A tiny llama with a 64-token context, random SEAL-C scales, a yarn x4 f32 GGUF folded by
fold-and-convert, validated on chunks of up to 256 tokens: most positions lie beyond the native
context, where the extension changes the logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seal_gguf.cli.app import cli
from seal_gguf.constants import GRANULARITY_CHANNEL, ScalesMeta
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.errors import InputError
from seal_gguf.measure.identity import GGUFInfo, carried_extension, check_extension
from seal_gguf.measure.texts import builtin_documents
from seal_gguf.model.architectures import model_layout, read_config
from seal_gguf.model.rope import RopeScaling, expected_gguf_keys
from seal_gguf.scales import expected_shape, save_scales

NATIVE = 64  # the tiny model's own context
FACTOR = 4
CTX = NATIVE * FACTOR  # chunks reach the extended context
YARN = ["--rope-scaling", "yarn", "--rope-factor", str(FACTOR)]


@pytest.fixture(scope="module")
def native(tiny_model) -> Path:
    return tiny_model("llama", max_position_embeddings=NATIVE)


def scales_file(path: Path, model_dir: Path, recorded: str | None) -> Path:
    """Random SEAL-C scales (the same values every time), recorded as learned under `recorded`."""
    layout = model_layout(model_dir)
    values = torch.exp(0.5 * torch.randn(expected_shape(layout, GRANULARITY_CHANNEL),
                                         generator=torch.Generator().manual_seed(7)))
    provenance = {ScalesMeta.ROPE_SCALING: recorded} if recorded else None
    save_scales(path, values, layout, GRANULARITY_CHANNEL, provenance, force=True)
    return path


@pytest.fixture(scope="module")
def built(native: Path, module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    out = module_tmp("validate-rope")
    scales = scales_file(out / "scales-yarn.safetensors", native, f"yarn:{FACTOR}:{NATIVE}")
    yarn = out / "seal-yarn.gguf"
    result = invoke("fold-and-convert", native, scales, "-o", yarn, "--outtype", "f32", *YARN)
    assert result.exit_code == 0, result.output
    text = out / "prose.txt"
    text.write_text(builtin_documents()[0].text[:1000], encoding="utf-8")  # about 230 tokens
    return {"scales": scales, "yarn": yarn, "plain": convert_to_gguf(native, out / "seal.gguf", "f32", scales, progress=False),
            "text": text}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def validate(*args: object):
    return invoke("validate", *args, "-q")


def own_lines(stderr: str) -> list[str]:
    """seal-gguf's lines on stderr. llama.cpp logs through Python too, and opens any GGUF with at
    least 256 tokens of context: with the plain GGUF's 64 it says so ("llama_context: ...")."""
    return [line for line in stderr.splitlines() if not line.startswith("llama_")]


def test_extended_gguf_matches_the_extended_model(native: Path, built: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = validate(native, built["scales"], built["yarn"], *YARN, "--text", built["text"], "--ctx", CTX,
                      "--json", report_path, "--task", "passkey", "--length", 200, "--samples", 1)
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr  # the scales were learned under this extension
    assert f"Context extension: yarn RoPE scaling x4 (yarn:4:64): {NATIVE} -> {CTX} tokens" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["rope_scaling"] == "yarn:4:64" and report["warnings"] == []
    tokens = report["documents"][0][1]
    assert report["chunks"] == 1 and tokens > 3 * NATIVE  # most positions lie beyond the native context
    # Level 1: the folded checkpoint, loaded with the same extension
    assert report["folded"]["relative"] <= 1e-4
    # Level 2: llama.cpp runs the GGUF's keys; PyTorch the extended config
    (gguf,) = report["ggufs"]
    assert gguf["info"]["rope_keys"]["rope.scaling.type"] == "yarn"
    assert gguf["summary"]["tokens"] == tokens - 1
    assert gguf["summary"]["same_top"] == 1.0 and gguf["summary"]["mean_kld"] < 1e-5
    # Level 3: the hooked reference ran extended too
    assert [m["rope_scaling"] for m in report["retrieval"]["models"]] == ["yarn:4:64", None]


def test_extended_gguf_without_the_option_is_refused(native: Path, built: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = validate(native, built["scales"], built["yarn"], "--text", built["text"], "--ctx", CTX,
                      "--json", report_path)
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = own_lines(result.stderr)
    assert line.startswith("Error: seal-yarn.gguf carries a RoPE context extension")
    assert "pass --rope-scaling yarn --rope-factor 4" in line
    assert not report_path.exists()


def test_gguf_without_the_extension_is_refused(native: Path, built: dict[str, Path]) -> None:
    result = validate(native, built["scales"], built["plain"], *YARN, "--text", built["text"], "--ctx", CTX)
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = own_lines(result.stderr)
    assert line.startswith("Error: seal.gguf does not carry the yarn:4:64 RoPE context extension given")
    assert "context_length = 64 (expected 256)" in line and "rope.scaling.type = missing" in line
    assert line.endswith("it was converted without --rope-scaling")
    # a GGUF made with another extension than the one given
    result = validate(native, built["scales"], built["yarn"], "--rope-scaling", "linear", "--rope-factor", FACTOR)
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = own_lines(result.stderr)
    assert "rope.scaling.type = yarn (expected linear)" in line
    assert line.endswith("it was converted with --rope-scaling yarn --rope-factor 4")


def test_scales_learned_under_another_extension_warn(native: Path, built: dict[str, Path], tmp_path: Path) -> None:
    scales = scales_file(tmp_path / "scales-linear.safetensors", native, f"linear:{FACTOR}:{NATIVE}")
    report_path = tmp_path / "report.json"
    result = validate(native, scales, *YARN, "--text", built["text"], "--ctx", CTX, "--json", report_path)
    assert result.exit_code == 0, result.output
    (line,) = own_lines(result.stderr)
    assert line.startswith("Warning: the scales were learned under linear:4:64 RoPE scaling")
    report = json.loads(report_path.read_text())
    assert report["rope_scaling"] == "yarn:4:64" and len(report["warnings"]) == 1
    assert report["folded"]["relative"] <= 1e-4


# -- which extension a GGUF's keys name (pure: metadata as llama.cpp reports it) --

def info_with(keys: dict[str, object]) -> GGUFInfo:
    text = {name: f"{v:f}" if isinstance(v, float) else str(v) for name, v in keys.items()}  # llama.cpp's format
    return GGUFInfo("x.gguf", "llama", "f32", 2, 4, 2, 64, 256, 49152, {}, text)


@pytest.mark.parametrize("scaling", [RopeScaling("linear", 2.5), RopeScaling("yarn", 4, 32), RopeScaling("ntk", 8)])
def test_carried_extension_is_read_back(native: Path, scaling: RopeScaling) -> None:
    config = read_config(native)
    resolved = scaling.resolved(config)
    info = info_with(expected_gguf_keys(config, scaling))
    assert carried_extension(info, config) == resolved
    check_extension(info, config, resolved)
    with pytest.raises(InputError, match="carries a RoPE context extension"):
        check_extension(info, config, None)
    others = [RopeScaling(k, f, NATIVE) for k, f in [("linear", 4), ("yarn", 4), ("ntk", 4), ("yarn", 8)]]
    for other in (o for o in others if o != resolved):
        with pytest.raises(InputError, match=f"does not carry the {other} RoPE context extension"):
            check_extension(info, config, other)


def test_unextended_keys(native: Path) -> None:
    config = read_config(native)
    info = info_with({"context_length": NATIVE, "rope.freq_base": 10000.0, "rope.dimension_count": 64})
    assert carried_extension(info, config) is None
    check_extension(info, config, None)
    with pytest.raises(InputError, match="converted without --rope-scaling"):
        check_extension(info, config, RopeScaling("ntk", 2, NATIVE))
