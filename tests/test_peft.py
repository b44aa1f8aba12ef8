"""PEFT interchange: export-peft writes an IA3 adapter that the real peft package loads and merges into
seal-gguf's folded model; import-peft reads a real peft IA3 adapter on o_proj as scales that fold into
peft's merged model; everything else is refused in one line."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error, random_scales, scales_file
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from seal_gguf.cli.app import cli
from seal_gguf.constants import ScalesMeta
from seal_gguf.fold.hf import fold_checkpoint
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.hooks import attach_scales
from seal_gguf.model.loading import load_model
from seal_gguf.scales import read_scales
from seal_gguf.ship.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    META_SCALES_SHA256,
    PEFT_FORMAT_VERSION,
    o_proj_regex,
)

IDS = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))


def hf_model(model_dir: Path) -> Any:
    return load_model(model_dir, torch.device("cpu"), "float32", progress=False, folded_ok=True)[0]


def run_logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((got - ref).abs().max() <= 1e-5 * ref.abs().max())


def invoke(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def peft_adapter(model_dir: Path, out: Path, config: Any, values: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 **save: Any) -> Any:
    """A real peft adapter on the model: get_peft_model(config), each IA3 vector set by values(vector) (seeded
    random, > 0, when None), saved to out. Returns the PeftModel."""
    g = torch.Generator().manual_seed(3)
    model = get_peft_model(hf_model(model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l.default"):
                p.copy_(values(p) if values else torch.exp(0.4 * torch.randn(p.shape, generator=g)))
    model.save_pretrained(out, **save)
    return model


@pytest.mark.parametrize(("arch", "granularity"), [("llama", "channel"), ("llama", "head"), ("mistral3", "channel")])
def test_export_loads_and_merges_into_the_fold(tiny_model, tmp_path: Path, arch: str, granularity: str) -> None:
    model_dir = tiny_model(arch)
    scales = tmp_path / "s.safetensors"
    values = random_scales(scales, model_dir, granularity)
    adapter = tmp_path / "adapter"
    result = invoke("export-peft", scales, model_dir, "-o", adapter)
    assert result.exit_code == 0, result.output
    # the files peft itself writes for the same IA3 config on this model: same config, key names, shapes
    target = json.loads((adapter / ADAPTER_CONFIG).read_text())["target_modules"]
    own = tmp_path / "peft-own"
    get_peft_model(hf_model(model_dir), IA3Config(target_modules=target, feedforward_modules=target,
                                                  task_type="CAUSAL_LM")).save_pretrained(own)
    ours_config, peft_config = (json.loads((d / ADAPTER_CONFIG).read_text()) for d in (adapter, own))
    assert ours_config.pop("peft_version") == PEFT_FORMAT_VERSION
    peft_config.pop("peft_version")
    assert ours_config == peft_config
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as ours, safe_open(str(own / ADAPTER_WEIGHTS), "pt") as theirs:
        assert {k: ours.get_slice(k).get_shape() for k in ours.keys()} == \
            {k: theirs.get_slice(k).get_shape() for k in theirs.keys()}
        assert ours.metadata()[META_SCALES_SHA256] == read_scales(scales).sha256
    # peft loads it with no missing or unexpected keys, onto o_proj of the text layers only
    peft_model = PeftModel.from_pretrained(hf_model(model_dir), adapter)
    loaded = peft_model.load_adapter(adapter, adapter_name="again")
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    wrapped = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "ia3_l")]
    assert len(wrapped) == model_layout(model_dir).num_layers
    assert all(re.fullmatch(o_proj_regex(model_layout(model_dir)), name) for name in wrapped)
    peft_model.delete_adapter("again")
    merged = run_logits(peft_model.merge_and_unload())
    folded = fold_checkpoint(model_dir, scales, tmp_path / "folded", progress=False).out_dir
    assert close(merged, run_logits(hf_model(folded)))
    base = hf_model(model_dir)
    with attach_scales(base, model_layout(model_dir), values):
        assert close(merged, run_logits(base))
    assert not close(merged, run_logits(hf_model(model_dir)))  # the scales matter


@pytest.mark.parametrize(("arch", "target"), [("llama", ["o_proj"]), ("mistral3", r".*language_model.*\.o_proj")])
def test_peft_adapter_imports_as_its_merge(tiny_model, tmp_path: Path, arch: str, target: Any) -> None:
    model_dir = tiny_model(arch)
    peft_model = peft_adapter(model_dir, tmp_path / "adapter",
                              IA3Config(target_modules=target, feedforward_modules=target, task_type="CAUSAL_LM"))
    merged = run_logits(peft_model.merge_and_unload())
    out = tmp_path / "s.safetensors"
    result = invoke("import-peft", tmp_path / "adapter", "-o", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "SEAL-C" in result.output and "Note" not in result.output
    scales = read_scales(out)
    assert scales.granularity == "channel" and scales.values.min() != scales.values.max()
    folded = fold_checkpoint(model_dir, out, tmp_path / "folded", progress=False).out_dir
    assert close(run_logits(hf_model(folded)), merged)
    assert not close(merged, run_logits(hf_model(model_dir)))


@pytest.mark.parametrize("granularity", ["channel", "head"])
def test_round_trip_gives_the_same_scales(tiny_model, tmp_path: Path, granularity: str) -> None:
    model_dir = tiny_model("llama")
    recipe = {ScalesMeta.TASK: "lines", ScalesMeta.LR: "0.02"}
    scales = read_scales(scales_file(tmp_path / "s.safetensors", model_dir, granularity, provenance=recipe))
    assert invoke("export-peft", tmp_path / "s.safetensors", model_dir, "-o", tmp_path / "a").exit_code == 0
    # base_model_name_or_path is the model folder: --model is not needed
    result = invoke("import-peft", tmp_path / "a", "-o", tmp_path / "c.safetensors")
    assert result.exit_code == 0, result.output
    assert "recipe it was exported with is kept" in result.output
    assert ("--granularity head writes the same scales" in result.output) == (granularity == "head")
    back = read_scales(tmp_path / "c.safetensors")
    assert back.granularity == "channel"
    expanded = torch.stack([scales.columns(layer, back.values.shape[-1]) for layer in range(scales.num_layers)])
    assert torch.equal(back.values.reshape(expanded.shape), expanded)
    assert all(back.metadata[k] == v for k, v in recipe.items())
    if granularity == "head":
        result = invoke("import-peft", tmp_path / "a", "-o", tmp_path / "h.safetensors", "--granularity", "head")
        assert result.exit_code == 0, result.output
        assert torch.equal(read_scales(tmp_path / "h.safetensors").values, scales.values)



def test_layer_without_a_vector_said(tiny_model, tmp_path: Path) -> None:
    """An adapter without one layer's vector imports with scale 1.0 there, and a warning names the layer."""
    from safetensors.torch import load_file, save_file

    model_dir = tiny_model("llama")
    scales_file(tmp_path / "s.safetensors", model_dir, "channel")
    assert invoke("export-peft", tmp_path / "s.safetensors", model_dir, "-o", tmp_path / "a").exit_code == 0
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = next(key for key in tensors if ".layers.1." in key)
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})
    result = invoke("import-peft", tmp_path / "a", "-o", tmp_path / "c.safetensors")
    assert result.exit_code == 0, result.output
    assert "no vector for layer(s) 1 of the model" in result.output
    assert torch.equal(read_scales(tmp_path / "c.safetensors").values[1], torch.ones_like(read_scales(
        tmp_path / "c.safetensors").values[1]))


def lora(model_dir: Path, out: Path) -> None:
    peft_adapter(model_dir, out, LoraConfig(target_modules=["o_proj"], r=2))


def ia3_on_k_proj(model_dir: Path, out: Path) -> None:
    peft_adapter(model_dir, out, IA3Config(target_modules=["k_proj", "o_proj"], feedforward_modules=["o_proj"]))


def ia3_on_o_proj_outputs(model_dir: Path, out: Path) -> None:
    peft_adapter(model_dir, out, IA3Config(target_modules=["o_proj"], feedforward_modules=[]))


def non_positive(model_dir: Path, out: Path) -> None:
    peft_adapter(model_dir, out, IA3Config(target_modules=["o_proj"], feedforward_modules=["o_proj"]),
                 values=lambda p: torch.linspace(-0.5, 1.5, p.numel()).reshape(p.shape))


def pickled(model_dir: Path, out: Path) -> None:
    peft_adapter(model_dir, out, IA3Config(target_modules=["o_proj"], feedforward_modules=["o_proj"]),
                 safe_serialization=False)


def channel_wise(model_dir: Path, out: Path) -> None:
    peft_adapter(model_dir, out, IA3Config(target_modules=["o_proj"], feedforward_modules=["o_proj"]))


REFUSED = {  # adapter, extra options, what the one line says
    "lora": (lora, [], ["peft_type 'LORA'", "IA3 adapters only"]),
    "k_proj": (ia3_on_k_proj, [], ["other modules than this model's o_proj", "k_proj"]),
    "o_proj outputs": (ia3_on_o_proj_outputs, [], ["not a feed-forward module", "output features"]),
    "non-positive": (non_positive, [], ["is -0.5", "must be > 0"]),
    "pickled": (pickled, [], ["adapter_model.bin", "pickled"]),
    "head of channels": (channel_wise, ["--granularity", "head"], ["varies over its 64 channels", "--granularity channel"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_import_refuses(tiny_model, tmp_path: Path, case: str) -> None:
    model_dir = tiny_model("llama")
    make, options, fragments = REFUSED[case]
    make(model_dir, tmp_path / "adapter")
    out = tmp_path / "s.safetensors"
    one_line_error(invoke("import-peft", tmp_path / "adapter", "-o", out, "--model", model_dir, *options), *fragments)
    assert not out.exists()


def test_existing_outputs_and_missing_model_refused(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    random_scales(tmp_path / "s.safetensors", model_dir, "channel")
    (tmp_path / "a").mkdir()
    one_line_error(invoke("export-peft", tmp_path / "s.safetensors", model_dir, "-o", tmp_path / "a"),
                   "already exists", "--force")
    assert invoke("export-peft", tmp_path / "s.safetensors", model_dir, "-o", tmp_path / "a", "--force").exit_code == 0
    (tmp_path / "c.safetensors").write_bytes(b"old")
    one_line_error(invoke("import-peft", tmp_path / "a", "-o", tmp_path / "c.safetensors"), "already exists", "--force")
    assert (tmp_path / "c.safetensors").read_bytes() == b"old"
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": "org/model"}))
    one_line_error(invoke("import-peft", tmp_path / "a", "-o", tmp_path / "d.safetensors"),
                   "'org/model' is not a local model folder", "--model")
