"""Greedy decoding in PyTorch: the one argmax continuation (held-out scoring in train, the PyTorch
runner of eval), as llama.cpp's greedy sampler gives it.
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


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The ids that end a reply: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


