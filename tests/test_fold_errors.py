"""Bad input to fold and import-gguf: one line on stderr, exit 1, nothing written, inputs unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seal_gguf.cli.app import cli
from seal_gguf.model.architectures import model_layout, supported_model_types
from seal_gguf.scales import expected_shape, save_scales


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(item.name.encode() + item.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def model(tiny_model, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), copy)
    return copy


@pytest.fixture()
def scales(model: Path, tmp_path: Path) -> Path:
    layout = model_layout(model)
    save_scales(tmp_path / "s.safetensors", torch.full(expected_shape(layout, "head"), 1.5), layout, "head")
    return tmp_path / "s.safetensors"


def run_fails(args: list[str], expect: str, inputs: list[Path], out: Path) -> None:
    before = [tree_hash(p) for p in inputs if p.exists()]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], result.output
    assert "Traceback" not in result.output
    assert [tree_hash(p) for p in inputs if p.exists()] == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers and (not out.exists() or out.name == "existing")


BREAKERS: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "missing model": (lambda m, s: [str(m.parent / "nope"), str(s)], "no such folder"),
    "file as model": (lambda m, s: [str(s), str(s)], "found a file"),
    "missing scales": (lambda m, s: [str(m), str(s.parent / "nope.safetensors")], "no such scales file"),
    "folder as scales": (lambda m, s: [str(m), str(m)], "found a folder"),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_paths(model: Path, scales: Path, tmp_path: Path, case: str) -> None:
    make_args, expect = BREAKERS[case]
    out = tmp_path / "out"
    run_fails(["fold", *make_args(model, scales), "-o", str(out), "-q"], expect, [model, scales], out)


def test_corrupt_config(model: Path, scales: Path, tmp_path: Path) -> None:
    (model / "config.json").write_text("{not json")
    run_fails(["fold", str(model), str(scales), "-o", str(tmp_path / "out")], "not valid JSON", [model], tmp_path / "out")


def test_unsupported_architecture(model: Path, scales: Path, tmp_path: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    run_fails(["fold", str(model), str(scales), "-o", str(tmp_path / "out")], "model_type 'gpt2' is not supported; supported: " + ", ".join(sorted(supported_model_types())), [model],
              tmp_path / "out")


def test_truncated_weights(model: Path, scales: Path, tmp_path: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run_fails(["fold", str(model), str(scales), "-o", str(tmp_path / "out"), "-q"], "truncated", [model, scales],
              tmp_path / "out")


def test_pickled_weights_not_loaded(model: Path, scales: Path, tmp_path: Path) -> None:
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    run_fails(["fold", str(model), str(scales), "-o", str(tmp_path / "out")], "pickled", [model], tmp_path / "out")


def test_scales_for_other_model(model: Path, tmp_path: Path, tiny_model) -> None:
    other = tiny_model("mistral")
    layout = model_layout(other)
    save_scales(tmp_path / "m.safetensors", torch.ones(expected_shape(layout, "head")), layout, "head")
    run_fails(["fold", str(model), str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "out")],
              "model_type 'mistral'", [model], tmp_path / "out")


def test_existing_output_refused(model: Path, scales: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    run_fails(["fold", str(model), str(scales), "-o", str(existing)], "already exists", [model, existing], existing)
    assert (existing / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(model: Path, scales: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    run_fails(["fold", str(model), str(scales), "-o", str(locked / "out")], "not writable", [model], locked / "out")


def test_interrupt_leaves_nothing(model: Path, scales: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import seal_gguf.fold.hf as fold_module

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fold_module, "_copy_side_files", interrupted)
    result = CliRunner().invoke(cli, ["fold", str(model), str(scales), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 130
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]


def test_import_gguf_rejects_non_gguf(tmp_path: Path, scales: Path) -> None:
    run_fails(["import-gguf", str(scales), str(tmp_path / "out")], "not a GGUF file", [scales], tmp_path / "out")
