"""The host tier: adapters already in the pool's layout, ready for one copy to the device.

An adapter's host copy is one flat buffer (pinned when the pool lives on CUDA, so the copy can
run asynchronously) holding, module after module, ``A [r, in]`` then ``B^T [r, out]`` in the
pool dtype, with rank_pattern / alpha_pattern scalings already folded into B. A device load is
then one H2D copy plus one multi-tensor copy into the slot views, whatever the module count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from dlp.lora.adapter import LoraAdapter


@dataclass
class HostAdapter:
    name: str
    generation: int  # catalogue generation it was built from (a replaced adapter is stale)
    scaling: float  # adapter-wide s_i
    rank: int  # largest module rank
    flat: torch.Tensor
    parts: list[tuple[str, int, int, int, int]]  # (module, rank, offset, d_in, d_out)
    nbytes: int

    @cached_property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """``((module, rank), ...)`` in buffer order: adapters with equal layouts share
        cached slot/staging views."""
        return tuple((module, rank) for module, rank, *_ in self.parts)

    @cached_property
    def own_views(self) -> list[torch.Tensor]:
        """``[A_0, B^T_0, A_1, ...]`` over this adapter's own buffer (built once)."""
        return self.view_list(self.flat)

    def ranks(self) -> dict[str, int]:
        return dict(self.layout)

    def view_list(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [t for pair in self.views(flat).values() for t in pair]

    def views(self, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B^T)}`` as views of ``flat`` (this buffer or a same-layout copy)."""
        out = {}
        for module, rank, offset, d_in, d_out in self.parts:
            a = flat[offset : offset + rank * d_in].view(rank, d_in)
            start = offset + rank * d_in
            out[module] = (a, flat[start : start + rank * d_out].view(rank, d_out))
        return out


def to_host(
    adapter: LoraAdapter,
    base_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
    *,
    generation: int = 0,
    pin: bool = False,
) -> HostAdapter:
    parts = []
    offset = 0
    for module in sorted(adapter.weights):
        rank, d_in = adapter.weights[module][0].shape
        d_out = base_shapes[module][1]
        parts.append((module, rank, offset, d_in, d_out))
        offset += rank * (d_in + d_out)
    flat = torch.empty(offset, dtype=dtype, pin_memory=pin)
    host = HostAdapter(
        adapter.name,
        generation,
        adapter.scaling,
        adapter.max_module_rank,
        flat,
        parts,
        offset * flat.element_size(),
    )
    for module, (a_view, b_t_view) in host.views(flat).items():
        a, b = adapter.weights[module]
        a_view.copy_(a)
        # Fold the module's own scaling (rank/alpha patterns) into B, so that one s_i per
        # adapter (the row_scales column) is right for every module of its slot.
        ratio = adapter.scaling_of(module) / adapter.scaling
        b_t_view.copy_(b.t() if ratio == 1.0 else (b.double() * ratio).t())
    return host


class HostTier:
    """LRU of host copies under a byte budget. Not locked: the pool calls it under its lock."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self.hits = 0
        self.evictions = 0
        self._entries: OrderedDict[str, HostAdapter] = OrderedDict()

    def get(self, name: str, generation: int, *, count: bool = True) -> HostAdapter | None:
        host = self._entries.get(name)
        if host is None or host.generation != generation:
            return None
        self._entries.move_to_end(name)
        if count:
            self.hits += 1
        return host

    def touch(self, name: str) -> None:
        if name in self._entries:
            self._entries.move_to_end(name)

    def put(self, host: HostAdapter) -> None:
        self.drop(host.name)
        if host.nbytes > self.budget_bytes:
            return  # too big to cache; the caller still holds it for the placement at hand
        self._entries[host.name] = host
        self.nbytes += host.nbytes
        while self.nbytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1

    def drop(self, name: str) -> None:
        old = self._entries.pop(name, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def names(self) -> list[str]:
        return list(self._entries)
