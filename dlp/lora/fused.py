"""FusedLoraLinear: ``base(x) + sum_i w_i s_i B_i A_i x`` per row, a constant number of kernels.

The per-batch adapter selection (which slots, which weight per row) lives in a
:class:`LoraBatchContext` that the caller sets once per forward on a :class:`LoraContextHolder`
shared by every fused layer of the model, so the model's own forward signature is untouched.
No context (or an empty one) means "base model": the layer is then exactly the base linear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dlp.lora.fused_ops import lora_delta, lora_delta_packed


@dataclass
class LoraBatchContext:
    """What one forward needs to apply per-row adapter mixes.

    slot_ids:   [U] long, pool slots the batch uses (column order of ``row_scales``)
    row_scales: [rows, U], w_bi * s_i (0 where row b does not use that adapter)
    col_index / col_scales (optional, built by the pool): the same selection at rank-column
    granularity, [K] indices into the flattened [S*R] slot rows and [rows, K] scales, so that
    only the adapters' real ranks are computed. When set, the fused layers use them.
    """

    slot_ids: torch.Tensor
    row_scales: torch.Tensor
    col_index: torch.Tensor | None = None
    col_scales: torch.Tensor | None = None

    @property
    def is_empty(self) -> bool:
        return self.slot_ids.numel() == 0


class LoraContextHolder:
    """The one mutable cell all fused layers of a model read their batch context from."""

    def __init__(self) -> None:
        self.context: LoraBatchContext | None = None

    def set_context(self, context: LoraBatchContext | None) -> None:
        self.context = context

    def clear(self) -> None:
        self.context = None

    @contextmanager
    def use(self, context: LoraBatchContext | None) -> Iterator[None]:
        previous = self.context
        self.context = context
        try:
            yield
        finally:
            self.context = previous


class FusedLoraLinear(nn.Module):
    """An nn.Linear plus the pool's stacked LoRA slots for this module.

    ``a_stack`` [S, R, in] and ``b_t_stack`` [S, R, out] (B transposed, so a slot's rank rows
    are contiguous) are the pool's tensors, shared, never copied; they are plain attributes,
    not parameters or buffers, so they do not enter the model's state_dict.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        a_stack: torch.Tensor,
        b_t_stack: torch.Tensor,
        holder: LoraContextHolder,
        module_name: str = "",
    ) -> None:
        super().__init__()
        slots, rank, d_in = a_stack.shape
        if d_in != base_layer.in_features or b_t_stack.shape != (
            slots,
            rank,
            base_layer.out_features,
        ):
            raise ValueError(
                f"{module_name}: pool stacks {tuple(a_stack.shape)}/{tuple(b_t_stack.shape)} do "
                f"not fit Linear({base_layer.in_features}, {base_layer.out_features})"
            )
        self.base_layer = base_layer
        self.a_stack = a_stack
        self.b_t_stack = b_t_stack
        # Flat views for the column-packed path (views: no copy, follow the pool's writes).
        self._a_flat = a_stack.view(slots * rank, d_in)
        self._b_flat = b_t_stack.view(slots * rank, base_layer.out_features)
        self.holder = holder
        self.module_name = module_name

    # A few attributes code sometimes reads off a Linear.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        context = self.holder.context
        if context is None or context.is_empty:
            return out
        if context.col_index is not None and context.col_scales is not None:
            a_cols = self._a_flat.index_select(0, context.col_index)
            b_cols = self._b_flat.index_select(0, context.col_index)
            delta = lora_delta_packed(x, a_cols, b_cols, context.col_scales)
        else:
            delta = lora_delta(
                x,
                self.a_stack,
                self.b_t_stack.transpose(1, 2),
                context.slot_ids,
                context.row_scales,
            )
        if out.requires_grad and torch.is_grad_enabled():
            return out + delta
        return out.add_(delta)

    def extra_repr(self) -> str:
        slots, rank, _ = self.a_stack.shape
        return f"module={self.module_name!r}, slots={slots}, max_rank={rank}"
