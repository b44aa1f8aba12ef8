"""Planning a training step's memory, placing layers over devices, and training a dispatched model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seal_gguf.cli.app import cli
from seal_gguf.errors import InputError
from seal_gguf.learn.measure_step import measure_step
from seal_gguf.learn.plan import DISK, estimate_step, model_shape, parse_max_memory, parse_size, place_layers
from seal_gguf.learn.train import train_scales
from seal_gguf.model.architectures import supported_model_types
from seal_gguf.model.loading import load_model

MiB = 2**20


@pytest.fixture(scope="module")
def llama4(tiny_model) -> Path:
    return tiny_model("llama", num_hidden_layers=4)


def test_shape_counts_the_real_parameters(llama4: Path) -> None:
    shape = model_shape(llama4)
    model, _ = load_model(llama4, torch.device("cpu"), "float32", progress=False)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layout.layers_prefix == "model.layers" and len(shape.layer_params) == 4
    assert not shape.tied_embeddings and "lm_head" in shape.other_params


@pytest.mark.slow
def test_tied_lm_head_is_placed_with_the_embeddings(smollm2_dir: Path) -> None:
    shape = model_shape(smollm2_dir)  # its lm_head is the embedding matrix
    assert shape.tied_embeddings and shape.other_params["lm_head"] == 0
    step = estimate_step(shape, 1024)
    placement = place_layers(shape, step, {"cuda:0": step.total // 2, "cuda:1": step.total})
    assert placement.device_map["lm_head"] == placement.device_map["model.embed_tokens"] == "cuda:0"
    assert placement.device_map["model.norm"] == "cuda:1"


def test_shape_needs_only_config_json(llama4: Path, tmp_path: Path) -> None:
    shutil.copy(llama4 / "config.json", tmp_path / "config.json")
    assert model_shape(tmp_path) == model_shape(llama4)


@pytest.mark.parametrize("model_type", sorted(supported_model_types()))
def test_shape_of_every_architecture(tiny_model, model_type: str) -> None:
    """transformers builds each on the meta device with the class the loader uses (multimodal ones
    included), and every decoder layer is counted."""
    model_dir = tiny_model(model_type)
    shape = model_shape(model_dir)
    assert len(shape.layer_params) == shape.layout.num_layers and all(n > 0 for n in shape.layer_params)


def test_estimate_grows_with_length_and_checkpointing_saves_memory(llama4: Path) -> None:
    shape = model_shape(llama4)
    short, long = estimate_step(shape, 1024), estimate_step(shape, 4096)
    assert long.total > short.total and long.weights == short.weights
    assert estimate_step(shape, 4096, checkpointing=False).total > long.total
    assert estimate_step(shape, 1024, dtype="bfloat16").weights * 2 == short.weights


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("70GB", 70 * 10**9), ("512 MiB", 512 * MiB),
                                            ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000)])
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_max_memory_spec() -> None:
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=1TiB") == {"cuda:0": 70 * 2**30, "cuda:1": 70 * 2**30, "cpu": 2**40}
    for bad in ("", "0:70GiB", "gpu=1GiB", "0=lots"):
        with pytest.raises(InputError):
            parse_max_memory(bad)


def test_placement_fills_devices_in_order_within_their_budgets(llama4: Path) -> None:
    shape = model_shape(llama4)
    step = estimate_step(shape, 512)
    budgets = {"cuda:0": step.total - 2 * MiB, "cuda:1": 2**30, "cpu": 2**30}
    placement = place_layers(shape, step, budgets)
    assert [load.device for load in placement.loads] == ["cuda:0", "cuda:1"]
    assert all(load.peak <= budgets[load.device] for load in placement.loads)
    assert placement.loads[0].layers + placement.loads[1].layers == [0, 1, 2, 3]
    # every module that holds weights has a device; the untied lm_head goes with the last layer
    assert set(placement.device_map) == {*shape.other_params, *(f"model.layers.{i}" for i in range(4))}
    assert placement.device_map["model.embed_tokens"] == "cuda:0"
    assert placement.device_map["lm_head"] == placement.device_map["model.norm"] == "cuda:1"
    assert placement.execution_device == "cuda:0" and not placement.offloaded


def test_placement_offloads_what_fits_nowhere_and_refuses_what_cannot_run(llama4: Path) -> None:
    shape = model_shape(llama4)
    step = estimate_step(shape, 512)
    placement = place_layers(shape, step, {"cuda:0": step.total - 4 * MiB, "cpu": 4 * MiB})
    devices = set(placement.device_map.values())
    assert {"cuda:0"} < devices and placement.offloaded
    assert placement.loads[0].peak <= step.total - 4 * MiB
    with pytest.raises(InputError, match="does not fit"):
        place_layers(shape, step, {"cuda:0": step.weights // 4})


def _disk_budget(shape, step) -> int:
    """A CPU budget small enough that some layers, not all, go to disk."""
    for budget in range(step.total, 0, -MiB // 4):
        placement = place_layers(shape, step, {"cpu": budget})
        on_disk = [i for load in placement.loads if load.device == DISK for i in load.layers]
        if on_disk and len(on_disk) < shape.layout.num_layers:
            return budget
    raise AssertionError("no budget splits the layers")


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_dispatched_model_with_disk_offload_learns_the_same_scales(llama4: Path, granularity: str) -> None:
    shape = model_shape(llama4)
    budget = _disk_budget(shape, estimate_step(shape, 300, granularity=granularity))
    common = dict(granularity=granularity, samples=3, length=300, eval_samples=2, progress=False)
    plain = train_scales(llama4, device="cpu", **common)
    dispatched = train_scales(llama4, device_map="auto", max_memory=f"cpu={budget}B", **common)
    assert DISK in dispatched.device_map.values() and "cpu" in dispatched.device_map.values()
    assert plain.device_map is None
    assert torch.allclose(plain.scales, dispatched.scales, atol=1e-6)
    assert not torch.equal(plain.scales, torch.ones_like(plain.scales))
    assert plain.losses == pytest.approx(dispatched.losses, rel=1e-5)
    assert plain.heldout_after == dispatched.heldout_after


def test_cli_plan_writes_a_device_map_that_train_uses(llama4: Path, tmp_path: Path) -> None:
    shape = model_shape(llama4)
    budget = _disk_budget(shape, estimate_step(shape, 300))
    runner = CliRunner()
    map_file = tmp_path / "map.json"
    result = runner.invoke(cli, ["plan", str(llama4), "--length", "300", "--max-memory", f"cpu={budget}B",
                                 "--write-device-map", str(map_file)])
    assert result.exit_code == 0, result.output
    assert "disk" in result.output and "--device-map auto" in result.output
    assert DISK in json.loads(map_file.read_text()).values()
    out = tmp_path / "scales.safetensors"
    result = runner.invoke(cli, ["train", str(llama4), "-o", str(out), "--samples", "2", "--length", "300",
                                 "--eval-samples", "0", "--device-map", str(map_file), "-q"])
    assert result.exit_code == 0, result.output
    assert "Device map: cpu:" in result.output and "disk:" in result.output and out.is_file()


def test_cli_plan_errors_are_one_line(llama4: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    existing = tmp_path / "map.json"
    existing.write_text("{}")
    cases = [
        ["plan", str(llama4), "--max-memory", "0=lots"],
        ["plan", str(llama4), "--write-device-map", str(existing)],
        ["plan", str(tmp_path / "missing")],
        ["train", str(llama4), "-o", str(tmp_path / "s.safetensors"), "--max-memory", "cpu=1GiB"],
        ["train", str(llama4), "-o", str(tmp_path / "s.safetensors"), "--device-map", str(existing)],
    ]
    for args in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.strip().splitlines()[-1].startswith("Error: "), result.output
        assert "Traceback" not in result.output
    assert existing.read_text() == "{}"
    assert not (tmp_path / "s.safetensors").exists()


LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
LLAMA_3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
               "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072}


@pytest.mark.parametrize("config, max_memory, expected", [
    (LLAMA_2_7B, "0=70GiB", "Fits on cuda:0: seal-gguf train ... --device cuda"),
    (LLAMA_3_70B, "0=70GiB,1=70GiB,2=70GiB,3=70GiB,cpu=200GiB", "Spread over 4 devices: seal-gguf train ..."),
])
def test_readme_recipes_plan_as_documented(tmp_path: Path, config: dict, max_memory: str, expected: str) -> None:
    """The README's big-model recipes, planned from a config.json alone (no weights exist here)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["plan", str(tmp_path), "--length", "32768", "--dtype", "bfloat16",
                                      "--max-memory", max_memory])
    assert result.exit_code == 0, result.output
    assert expected in result.output
    assert "cpu " not in result.output and "disk " not in result.output  # nothing offloaded


@pytest.mark.slow
@pytest.mark.parametrize("length, checkpointing", [(512, True), (2048, True), (1024, False)])
def test_estimate_is_within_30_percent_of_a_measured_step(smollm2_dir: Path, length: int, checkpointing: bool) -> None:
    """One real SmolLM2 training step in a fresh process against the plan, in total and for what the
    step adds to the weights (activations, backward, logits)."""
    estimate = estimate_step(model_shape(smollm2_dir), length, checkpointing=checkpointing)
    measured = measure_step(smollm2_dir, length, checkpointing=checkpointing, device="cpu")
    assert measured.weights_bytes == estimate.weights
    assert 0.7 < estimate.total / measured.peak_bytes < 1.3
    assert 0.7 < (estimate.total - estimate.weights) / (measured.peak_bytes - measured.weights_bytes) < 1.3
