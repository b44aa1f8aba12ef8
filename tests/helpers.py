"""Helpers the test modules share (fixtures live in conftest.py): scales files, logits from both
engines, and the one-line error check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seal_gguf.gguffile.llama import open_llama
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.hooks import attach_scales
from seal_gguf.scales import expected_shape, read_scales, save_scales


def random_scales(path: Path, model_dir: Path, granularity: str, seed: int = 1) -> torch.Tensor:
    """scales_file's random scales, returned as a tensor."""
    return read_scales(scales_file(path, model_dir, granularity, seed=seed)).values


def logits(model_dir: Path, ids: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if scales is None:
            return model(ids).logits
        with attach_scales(model, model_layout(model_dir), scales):
            return model(ids).logits




def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    with open_llama(path, n_ctx=len(ids)) as llm:  # f32 KV cache, logits at every position
        llm.eval(ids)
        return np.asarray(llm.scores[:len(ids)], dtype=np.float32)




def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def scales_file(path: Path, model_dir: Path, granularity: str = "head", values: torch.Tensor | None = None,
                seed: int = 7, provenance: dict[str, str] | None = None) -> Path:
    """A scales file for the model at `path` (replaced if it exists): `values`, or log-normal random
    scales (σ 0.5) from `seed`."""
    layout = model_layout(model_dir)
    if values is None:
        g = torch.Generator().manual_seed(seed)
        values = torch.exp(0.5 * torch.randn(expected_shape(layout, granularity), generator=g))
    save_scales(path, values, layout, granularity, provenance=provenance, force=True)
    return path


def tensors_gguf(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A GGUF written by gguf-py holding float32 zeros of these names and shapes, nothing else: for what reads
    only tensor names and sizes (split parts, per-tensor patterns)."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    return path
