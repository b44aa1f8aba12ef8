"""Decoding in PyTorch: the one argmax continuation (held-out scoring in train, the PyTorch runner of
eval), as llama.cpp's greedy sampler gives it; and a seeded sample from the model's own distribution
(anchor text the model writes itself, seal_gguf.learn.anchor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def greedy_continuation(model: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                        stop_ids: set[int], device: torch.device) -> list[int]:
    """The argmax continuation: a fresh generation config, so no sampling or repetition penalty
    that the model's own generation_config may carry."""
    from transformers import GenerationConfig

    ids = torch.tensor([list(prompt_ids)], device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids) or None,
                              pad_token_id=min(stop_ids, default=0))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [t for t in out[0, ids.shape[1]:].tolist() if t not in stop_ids]


@torch.no_grad()
def sampled_continuations(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                          device: torch.device, seed: int) -> list[list[int]]:
    """One continuation per prompt, sampled as a batch (prompts padded on the left) from the model's own
    next-token distribution: temperature 1, no top-k or top-p truncation, no repetition penalty.
    Reproducible for a given `seed`, batch and device; the global RNG is left as it was. The stop token
    that ends a continuation, if any, is kept: the model's reply ends there."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    pad = min(stop_ids, default=0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=sorted(stop_ids) or None, pad_token_id=pad)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    continuations = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        continuations.append(row[:end])
    return continuations


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The ids that end a reply: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


