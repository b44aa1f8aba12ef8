"""One real training step in a fresh process, and its peak memory: `seal-gguf plan --measure`.

On a Linux CPU, RSS can read higher than what is live: the measured process fixes malloc's mmap
threshold (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal_gguf.errors import EngineError, InputError

# malloc's mmap threshold for measured runs: large blocks come from mmap and leave RSS when freed.
MEASURE_MMAP_THRESHOLD = 128 * 1024
@dataclass(frozen=True)
class MeasuredStep:
    device: str
    length: int
    peak_bytes: int  # CUDA: max_memory_allocated; CPU: the weights' bytes + the growth of RSS during the step
    weights_bytes: int


def measure_step(model_dir: Path, length: int, dtype: str = "float32", checkpointing: bool = True,
                 granularity: str = "head", device: str = "cpu", task: str = "lines") -> MeasuredStep:
    """Run one real training step in a fresh process and return its peak memory: CUDA's
    max_memory_allocated; on a Linux CPU the weights' bytes plus the growth of RSS during the step
    (with malloc's mmap threshold fixed, see the module docstring)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MEASURE_MMAP_THRESHOLD)}
    args = [sys.executable, "-m", "seal_gguf.learn.measure_step", str(model_dir), str(length), dtype,
            "on" if checkpointing else "off", granularity, device, task]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(f"the measured training step failed: {reason}")
    result = json.loads(lines[-1])
    return MeasuredStep(**result)


def _measure_in_this_process(model_dir: str, length: int, dtype: str, checkpointing: bool, granularity: str,
                             device_name: str, task: str) -> dict[str, Any]:
    import torch

    from seal_gguf.learn.train import fit_scales
    from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
    from seal_gguf.tasks import make_cases

    def status(key: str) -> int:
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise EngineError(f"cannot read {key} of this process (/proc/self/status)")

    device = resolve_device(device_name)
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not os.path.exists("/proc/self/clear_refs")):
        raise InputError(f"measuring a step needs CUDA or a Linux CPU, not {device}")
    tokenizer = load_tokenizer(Path(model_dir))
    cases = make_cases(tokenizer, task, length, 1, 0, split="train")
    model, layout = load_model(Path(model_dir), device, dtype, progress=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Weights memory-mapped from safetensors become resident only when first read, and loading
        # may leave file pages behind: count the weights by their size instead, and the step by
        # the growth of RSS above the loaded model (its high-water mark reset through clear_refs).
        with torch.no_grad():
            for param in model.parameters():
                param.sum()
        Path("/proc/self/clear_refs").write_text("5")
        loaded = status("VmRSS")
    fit_scales(model, layout, tokenizer, cases, granularity, 1e-3, device, checkpointing, progress=False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = weights + status("VmHWM") - loaded
    return {"device": str(device), "length": length, "peak_bytes": int(peak), "weights_bytes": int(weights)}


if __name__ == "__main__":  # the measured process of measure_step
    model_arg, length_arg, dtype_arg, ckpt_arg, gran_arg, device_arg, task_arg = sys.argv[1:8]
    print(json.dumps(_measure_in_this_process(model_arg, int(length_arg), dtype_arg, ckpt_arg == "on",
                                              gran_arg, device_arg, task_arg)))
