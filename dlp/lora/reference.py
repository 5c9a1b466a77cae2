"""The baseline the fused layer must beat: a Python loop over mixes and over adapters.

This is what the DLP-LoRA released code does (one LoRA forward per adapter per layer). It reads
the adapters' own weights (not the pool), so it is also an independent check of the pool's
slot layout in tests. Benchmarks inject it with :func:`inject_loop_lora`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dlp.errors import DlpError
from dlp.lora.adapter import LoraAdapter, module_matches
from dlp.routing.mix import AdapterMix


def loop_lora_delta(
    x: torch.Tensor,
    module: str,
    adapters: Mapping[str, LoraAdapter],
    mixes: Sequence[AdapterMix],
) -> torch.Tensor:
    """``sum_i w_bi s_i B_i A_i x_b`` for row b of ``x [rows, ..., in]``, one mix at a time."""
    out_features = next(
        b.shape[0] for a in adapters.values() for m, (_, b) in a.weights.items() if m == module
    )
    delta = x.new_zeros(*x.shape[:-1], out_features)
    groups: dict[str, list[int]] = {}
    for row, mix in enumerate(mixes):
        groups.setdefault(mix.key, []).append(row)
    for rows in groups.values():
        mix = mixes[rows[0]]
        index = torch.tensor(rows, device=x.device)
        x_rows = x.index_select(0, index)
        acc = torch.zeros_like(delta.index_select(0, index))
        for name, weight in mix.entries:
            adapter = adapters[name]
            if module not in adapter.weights:
                continue
            a, b = adapter.weights[module]
            a, b = a.to(x.device, x.dtype), b.to(x.device, x.dtype)
            acc = acc + (weight * adapter.scaling_of(module)) * ((x_rows @ a.t()) @ b.t())
        delta.index_copy_(0, index, acc)
    return delta


class LoopLoraLinear(nn.Module):
    """nn.Linear + the Python-loop multi-LoRA delta (baseline, not for serving)."""

    def __init__(self, base_layer: nn.Linear, module_name: str, state: LoopLoraState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.state.mixes or all(m.is_base for m in self.state.mixes):
            return out
        return out + loop_lora_delta(x, self.module_name, self.state.adapters, self.state.mixes)


@dataclass
class LoopLoraState:
    adapters: dict[str, LoraAdapter]
    mixes: list[AdapterMix] = field(default_factory=list)
    originals: dict[str, nn.Linear] = field(default_factory=dict)

    def set_mixes(self, mixes: Sequence[AdapterMix]) -> None:
        self.mixes = list(mixes)


def inject_loop_lora(
    model: nn.Module,
    adapters: Mapping[str, LoraAdapter],
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
) -> LoopLoraState:
    """Wrap every nn.Linear matching ``target_modules`` with :class:`LoopLoraLinear`."""
    state = LoopLoraState(dict(adapters))
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and module_matches(target_modules, n)
    ]
    if not names:
        raise DlpError(f"target_modules {target_modules!r} match no nn.Linear of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        setattr(parent, child, LoopLoraLinear(original, name, state))
        state.originals[name] = original
    return state


def remove_loop_lora(model: nn.Module, state: LoopLoraState) -> None:
    for name, original in state.originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, original)
    state.originals.clear()
