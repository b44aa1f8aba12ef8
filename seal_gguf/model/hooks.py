"""SEAL applied at run time in PyTorch: a forward pre-hook on every layer's o_proj.

This is the unfolded reference that training learns through and validation compares against.
The hook multiplies o_proj's input (the concatenated head outputs) by the scales, expanded over
each head's channels for head granularity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seal_gguf.errors import ArchitectureError
from seal_gguf.model.architectures import ModelLayout


class ScaleHooks:
    """Handles of the attached hooks; `remove()` (or leaving the `with` block) detaches them."""

    def __init__(self, handles: list[Any]):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ScaleHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def o_proj_modules(model: nn.Module, layout: ModelLayout) -> list[nn.Linear]:
    modules = []
    for layer in range(layout.num_layers):
        name = layout.o_proj_module(layer)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArchitectureError(f"model has no module {name!r}; is it a {layout.model_type} model?") from None
        if not isinstance(module, nn.Linear) or module.in_features != layout.attn_width:
            raise ArchitectureError(
                f"{name}: expected a Linear with {layout.attn_width} inputs "
                f"({layout.num_heads} heads x {layout.head_dim}), found {module}"
            )
        modules.append(module)
    return modules


def attach_scales(model: nn.Module, layout: ModelLayout, values: torch.Tensor) -> ScaleHooks:
    """Scale every head's output by `values` ([L, H] or [L, H, D]; may be a trainable Parameter).

    A forward pre-hook on each layer's o_proj multiplies its input (the heads' outputs, concatenated
    in head order, [..., heads·head_dim]) by the values expanded to that width: where SEAL acts
    (arXiv 2501.15225). The returned ScaleHooks removes them (remove(), or use it in a `with`).
    Raises ArchitectureError when the model has no o_proj where the layout says."""
    head_wise = values.dim() == 2

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            s = values[layer]
            s = s.repeat_interleave(layout.head_dim) if head_wise else s.reshape(-1)
            # a dispatched model's layers may sit on other devices than the scales
            return (args[0] * s.to(args[0].device, args[0].dtype), *args[1:])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(o_proj_modules(model, layout))]
    return ScaleHooks(handles)
