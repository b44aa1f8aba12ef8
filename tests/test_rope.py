"""Training-free context extension: config.json, GGUF keys, llama.cpp = PyTorch beyond the native
context, the scales file's record of it and the CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from helpers import llama_cpp_logits

from seal_gguf.cli.app import cli
from seal_gguf.constants import ScalesMeta
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.errors import EngineError, InputError
from seal_gguf.measure.runners import HFRunner
from seal_gguf.model.architectures import read_config
from seal_gguf.model.rope import (
    RopeScaling,
    check_gguf_extension,
    extend_config,
    extension_mismatch,
    parse_rope_scaling,
    rope_from_options,
)
from seal_gguf.scales import read_scales

NATIVE = 64  # the tiny model's own context
FACTOR = 4
THETA = 10000.0  # transformers' default for llama
HEAD_DIM = 64
TOKENS = 200  # the parity input: positions 64..199 lie beyond the native context
V5_CONFIG = {"model_type": "llama", "max_position_embeddings": 4096, "head_dim": 128,
             "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}


# -- config.json (pure) --

def test_extend_config_linear() -> None:
    new = extend_config(V5_CONFIG, RopeScaling("linear", 4))
    assert new["max_position_embeddings"] == 16384
    assert new["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "linear", "factor": 4.0}
    assert V5_CONFIG["rope_parameters"]["rope_type"] == "default"  # the input is untouched


def test_extend_config_yarn_with_original_context() -> None:
    new = extend_config(V5_CONFIG, RopeScaling("yarn", 2.5, 2048))
    assert new["max_position_embeddings"] == 5120
    assert new["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "yarn", "factor": 2.5,
                                      "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0}


def test_extend_config_ntk_raises_the_base_only() -> None:
    new = extend_config(V5_CONFIG, RopeScaling("ntk", 8))
    assert new["max_position_embeddings"] == 32768
    assert new["rope_parameters"]["rope_type"] == "default"
    assert new["rope_parameters"]["rope_theta"] == pytest.approx(500000.0 * 8 ** (128 / 126))


def test_extend_config_transformers_4_layout() -> None:
    old = {"model_type": "llama", "max_position_embeddings": 4096, "hidden_size": 4096, "num_attention_heads": 32,
           "rope_theta": 10000.0, "rope_scaling": None}
    yarn = extend_config(old, RopeScaling("yarn", 4))
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                    "beta_fast": 32.0, "beta_slow": 1.0}
    assert yarn["rope_theta"] == 10000.0 and "rope_parameters" not in yarn
    ntk = extend_config(old, RopeScaling("ntk", 4))
    assert ntk["rope_scaling"] is None and ntk["rope_theta"] == pytest.approx(10000.0 * 4 ** (128 / 126))


def test_extend_config_per_layer_type_extends_full_attention() -> None:
    gemma = {"model_type": "gemma3_text", "max_position_embeddings": 32768, "head_dim": 256, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
    new = extend_config(gemma, RopeScaling("linear", 2))
    assert new["rope_parameters"]["full_attention"] == {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}
    assert new["rope_parameters"]["sliding_attention"] == gemma["rope_parameters"]["sliding_attention"]


@pytest.mark.parametrize("config", [
    {**V5_CONFIG, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}},
    {"model_type": "llama", "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}},
])
def test_an_extended_model_is_not_extended_again(config: dict) -> None:
    with pytest.raises(InputError, match="already has (llama3|linear) RoPE scaling"):
        extend_config(config, RopeScaling("yarn", 2))


def test_scaling_values_and_spec() -> None:
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(InputError, match="> 1"):
            RopeScaling("yarn", bad)
    with pytest.raises(InputError, match="unknown RoPE scaling"):
        RopeScaling("dynamic", 2)
    scaling = RopeScaling("yarn", 4, 8192)
    assert scaling.spec() == "yarn:4:8192" and parse_rope_scaling("yarn:4:8192") == scaling
    assert parse_rope_scaling("ntk:1.5") == RopeScaling("ntk", 1.5)
    with pytest.raises(InputError):
        parse_rope_scaling("yarn")
    assert RopeScaling("ntk", 2).resolved(V5_CONFIG) == RopeScaling("ntk", 2, 4096)
    assert rope_from_options(None, None) is None
    with pytest.raises(InputError, match="go together"):
        rope_from_options("yarn", None)


def test_extension_mismatch() -> None:
    yarn = RopeScaling("yarn", 4, 8192)
    assert extension_mismatch(None, None) is None
    assert extension_mismatch("yarn:4:8192", yarn) is None
    assert "learned under yarn:4:8192" in extension_mismatch("yarn:4:8192", None)
    assert "learned without RoPE scaling" in extension_mismatch(None, yarn)
    assert extension_mismatch("yarn:4:4096", yarn) is not None
    assert extension_mismatch("ntk:4:8192", yarn) is not None
    assert "unreadable" in extension_mismatch("nonsense", yarn)


# -- a tiny llama with a 64-token context, extended 4 times --

@pytest.fixture(scope="module")
def native(tiny_model) -> Path:
    return tiny_model("llama", max_position_embeddings=NATIVE)


@pytest.fixture(scope="module")
def extended_ggufs(native: Path, converter: Path, module_tmp: Callable[[str], Path]):
    folder = module_tmp("rope-ggufs")
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            made[kind] = convert_to_gguf(native, folder / f"{kind}.gguf", "f32", rope=RopeScaling(kind, FACTOR),
                                 llama_cpp=converter, progress=False)
        return made[kind]

    return make


def gguf_fields(path: Path) -> dict[str, object]:
    return {name: field.contents() for name, field in GGUFReader(str(path), "r").fields.items()
            if name.startswith("llama.")}


@pytest.mark.parametrize("kind", ["linear", "yarn", "ntk"])
def test_gguf_keys(extended_ggufs, kind: str) -> None:
    fields = gguf_fields(extended_ggufs(kind))
    assert fields["llama.context_length"] == NATIVE * FACTOR
    scaling_keys = {k: v for k, v in fields.items() if k.startswith("llama.rope.scaling.")}
    if kind == "ntk":
        assert fields["llama.rope.freq_base"] == pytest.approx(THETA * FACTOR ** (HEAD_DIM / (HEAD_DIM - 2)), rel=1e-6)
        assert scaling_keys == {}
    else:
        assert fields["llama.rope.freq_base"] == THETA
        want = {"llama.rope.scaling.type": kind, "llama.rope.scaling.factor": FACTOR}
        if kind == "yarn":
            want |= {"llama.rope.scaling.original_context_length": NATIVE,
                     "llama.rope.scaling.yarn_beta_fast": 32.0, "llama.rope.scaling.yarn_beta_slow": 1.0}
        assert scaling_keys == pytest.approx(want)


def test_the_written_keys_are_checked(extended_ggufs, native: Path) -> None:
    """The check convert_to_gguf() runs on the converter's output refuses a GGUF without the extension."""
    config = read_config(native)
    check_gguf_extension(extended_ggufs("yarn"), config, RopeScaling("yarn", FACTOR))
    with pytest.raises(EngineError, match="rope.scaling.type = linear"):
        check_gguf_extension(extended_ggufs("linear"), config, RopeScaling("yarn", FACTOR))


def pytorch_logits(model_dir: Path, ids: list[int], rope: RopeScaling | None) -> np.ndarray:
    runner = HFRunner(model_dir, rope=rope)  # what `seal-gguf eval` runs
    try:
        with torch.no_grad():
            return runner.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    finally:
        runner.close()


@pytest.mark.parametrize("kind", ["linear", "yarn", "ntk"])
def test_llama_cpp_matches_pytorch_beyond_the_native_context(extended_ggufs, native: Path, kind: str) -> None:
    ids = np.random.default_rng(0).integers(3, 49152, TOKENS).tolist()
    rope = RopeScaling(kind, FACTOR)
    theirs = llama_cpp_logits(extended_ggufs(kind), ids)[NATIVE:]
    ours = pytorch_logits(native, ids, rope)[NATIVE:]
    unextended = pytorch_logits(native, ids, None)[NATIVE:]
    gap = np.abs(theirs - ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert gap < 1e-3, gap
    # the extension changes the logits far beyond that: the comparison sees the keys at work
    assert np.abs(unextended - ours).max() > 100 * max(gap, 1e-4)


# -- the scales file records the extension; fold-and-convert warns on a mismatch --

def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_train_records_the_extension_and_fold_and_convert_checks_it(native: Path, converter: Path,
                                                                    tmp_path: Path) -> None:
    scales = tmp_path / "scales.safetensors"
    result = invoke("train", native, "-o", scales, "--task", "passkey", "--samples", 2, "--length", TOKENS,
                    "--eval-samples", 0, "--device", "cpu", "--rope-scaling", "yarn", "--rope-factor", FACTOR, "-q")
    assert result.exit_code == 0, result.output
    assert "under yarn:4:64 RoPE scaling" in result.output
    assert read_scales(scales).metadata[ScalesMeta.ROPE_SCALING] == "yarn:4:64"

    # the same extension: no warning, and the quantizer keeps the keys
    same = tmp_path / "same.gguf"
    result = invoke("fold-and-convert", native, scales, "-o", same, "--outtype", "q4_k_m", "--rope-scaling", "yarn",
                    "--rope-factor", FACTOR, "--llama-cpp", converter, "-q")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr.lower()
    fields = gguf_fields(same)
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.context_length"] == NATIVE * FACTOR

    # converted without it: one warning line, the GGUF is still written
    plain = tmp_path / "plain.gguf"
    result = invoke("fold-and-convert", native, scales, "-o", plain, "--outtype", "f32", "--llama-cpp", converter, "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("Warning: the scales were learned under yarn:4:64 RoPE scaling")
    assert result.stderr.count("\n") == 1 and plain.is_file()


# -- bad options: one line, exit 1, nothing written --

def test_option_errors_are_one_line(native: Path, extended_ggufs, tmp_path: Path) -> None:
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for item in native.iterdir():
        (scaled / item.name).symlink_to(item)
    (scaled / "config.json").unlink()
    config = read_config(native)
    config["rope_parameters"] = {"rope_theta": THETA, "rope_type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (["convert", native, "-o", out / "a.gguf", "--rope-scaling", "yarn"], "go together"),
        (["convert", native, "-o", out / "a.gguf", "--rope-factor", 2], "go together"),
        (["convert", native, "-o", out / "a.gguf", "--rope-original-context", 32], "needs --rope-scaling"),
        (["convert", native, "-o", out / "a.gguf", "--rope-scaling", "ntk", "--rope-factor", 1], "> 1"),
        (["convert", native, "-o", out / "a.gguf", "--rope-scaling", "yarn", "--rope-factor", 2,
          "--rope-original-context", 0], "positive"),
        (["convert", scaled, "-o", out / "a.gguf", "--rope-scaling", "ntk", "--rope-factor", 2], "already has linear"),
        (["train", native, "-o", out / "s.safetensors", "--rope-scaling", "linear"], "go together"),
        (["eval", extended_ggufs("ntk"), "--rope-scaling", "ntk", "--rope-factor", 2], "HF model folders"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert message in result.output, result.output
    assert list(out.iterdir()) == []
    shutil.rmtree(scaled)
