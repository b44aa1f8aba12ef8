"""patches/: applies cleanly to the converter of the pinned llama.cpp, by every route users take."""

from __future__ import annotations

import py_compile
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from seal_gguf.convert.to_gguf import (
    CONVERTER_SCRIPT,
    SEAL_MODULE,
    apply_patch,
    download_sdist,
    extract_converter,
    patch_files,
    pinned_llama_cpp_version,
)
from seal_gguf.errors import EngineError
from seal_gguf.model.architectures import ModelLayout, model_layout
from seal_gguf.scales import save_scales


@pytest.fixture(scope="module")
def pristine(module_tmp: Callable[[str], Path]) -> Path:
    """convert_hf_to_gguf.py as vendored in the pinned llama-cpp-python's source distribution."""
    work = module_tmp("sdist")
    sdist = download_sdist(pinned_llama_cpp_version(), work / "download")
    return extract_converter(sdist, work / "llama.cpp")


def fresh_copy(pristine: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy2(pristine / CONVERTER_SCRIPT, dest / CONVERTER_SCRIPT)
    return dest


def patched_files(root: Path) -> dict[str, str]:
    return {name: (root / name).read_text(encoding="utf-8") for name in (CONVERTER_SCRIPT, SEAL_MODULE)}


@pytest.fixture(scope="module")
def ours(pristine: Path, module_tmp: Callable[[str], Path]) -> Path:
    root = fresh_copy(pristine, module_tmp("ours") / "llama.cpp")
    for patch in patch_files():
        apply_patch(patch, root)
    return root


def test_patch_applies_to_pinned_converter(ours: Path) -> None:
    files = patched_files(ours)
    assert '"--seal-scales"' in files[CONVERTER_SCRIPT] and "apply_seal_scales(model_instance" in files[CONVERTER_SCRIPT]
    for name in files:
        py_compile.compile(str(ours / name), doraise=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_apply_gives_the_same_files(pristine: Path, ours: Path, tmp_path: Path) -> None:
    root = fresh_copy(pristine, tmp_path / "llama.cpp")
    for patch in patch_files():
        subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, check=True)
        subprocess.run(["git", "apply", str(patch)], cwd=root, check=True)
    assert patched_files(root) == patched_files(ours)


@pytest.mark.skipif(shutil.which("patch") is None, reason="patch is not installed")
def test_patch_p1_gives_the_same_files(pristine: Path, ours: Path, tmp_path: Path) -> None:
    root = fresh_copy(pristine, tmp_path / "llama.cpp")
    for patch in patch_files():
        result = subprocess.run(["patch", "-p1", "--forward", "-i", str(patch)], cwd=root, capture_output=True,
                                text=True)
        assert result.returncode == 0 and "fuzz" not in result.stdout and "offset" not in result.stdout, result.stdout
    assert patched_files(root) == patched_files(ours)


def test_apply_patch_refuses_another_version(pristine: Path, ours: Path, tmp_path: Path) -> None:
    changed = fresh_copy(pristine, tmp_path / "changed")
    script = changed / CONVERTER_SCRIPT
    script.write_text(script.read_text().replace('"--fuse-qkv", action="store_true"', '"--fuse-qkv", type=int'))
    with pytest.raises(EngineError, match="does not apply"):
        apply_patch(patch_files()[0], changed)
    with pytest.raises(EngineError, match="does not apply"):
        apply_patch(patch_files()[0], ours)  # applied twice


def test_patched_converter_checks_scales_itself(converter: Path, tiny_model, tmp_path: Path) -> None:  # noqa: F811
    # users run the patched converter by hand too: it refuses scales made for another model
    model_dir = tiny_model("llama")
    layout = model_layout(model_dir)
    deeper = ModelLayout(layout.model_type, layout.num_layers + 1, layout.num_heads, layout.head_dim,
                         layout.o_proj_template)
    save_scales(tmp_path / "deeper.safetensors", torch.ones(3, layout.num_heads), deeper, "head")
    out = tmp_path / "out.gguf"
    result = subprocess.run([sys.executable, str(converter / CONVERTER_SCRIPT), str(model_dir), "--outfile", str(out),
                             "--outtype", "f32", "--seal-scales", str(tmp_path / "deeper.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "scales of shape (3, 4) do not fit this model: 2 layers x 4 heads" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_patch_knows_no_architecture() -> None:
    """Where o_proj is and which config keys give the head layout come from architectures.json, through
    the scales file: the converter-side module names none of them itself."""
    added = "\n".join(line[1:] for line in patch_files()[0].read_text(encoding="utf-8").splitlines()
                      if line.startswith("+") and not line.startswith("+++"))
    for name in ("self_attn", "o_proj.weight", "num_attention_heads", "num_hidden_layers", "n_head", "layers\\."):
        assert name not in added, name


def test_patched_converter_refuses_scales_without_layout(converter: Path, tiny_model, tmp_path: Path) -> None:  # noqa: F811
    from safetensors import safe_open
    from safetensors.torch import save_file

    from seal_gguf.constants import ScalesMeta

    model_dir = tiny_model("llama")
    layout = model_layout(model_dir)
    save_scales(tmp_path / "new.safetensors", torch.ones(layout.num_layers, layout.num_heads), layout, "head")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != ScalesMeta.LAYOUT}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "old.safetensors"), metadata=meta)
    out = tmp_path / "out.gguf"
    result = subprocess.run([sys.executable, str(converter / CONVERTER_SCRIPT), str(model_dir), "--outfile", str(out),
                             "--outtype", "f32", "--seal-scales", str(tmp_path / "old.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and not out.exists()
    assert "its metadata does not say where the model's o_proj weights are" in result.stderr
    assert "save the scales again with a current seal-gguf" in result.stderr and "Traceback" not in result.stderr
