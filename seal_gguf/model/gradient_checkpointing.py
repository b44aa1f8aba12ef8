"""Gradient checkpointing for the frozen model: only the SEAL scales (hooks on o_proj) need gradients,
so each decoder layer's activations are recomputed in the backward pass instead of kept (train, and
the attribution pass of heads). Memory then grows with one layer's activations, not all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def enable_checkpointing(model: Any) -> None:  # a transformers model
    """Non-reentrant checkpointing: gradients reach the hooked scales without input grads."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # checkpointing enables input grads for PEFT; frozen embeddings need none
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


@contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[None]:
    """Turn on training mode for the checkpointed decoder layers only (transformers checkpoints a
    layer only in training mode), so dropout elsewhere stays off and the frozen model deterministic."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
