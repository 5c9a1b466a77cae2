"""Merged decode weights: fewer, larger GEMMs per layer (the decode step is launch-bound at
small model sizes, so kernel count matters as much as bytes).

Per layer:
  w_in  [q + k + v + T*S*R, hidden]: the q/k/v projections stacked, then the LoRA A rows of
        every pool slot for the T attention projections the pool targets. One GEMM gives
        q, k, v and every slot's LoRA hidden state at once.
  bt    [T*S*R, q + k + v]: the slots' B matrices (transposed) as a block-diagonal matrix, so a
        second GEMM maps the row-scaled hidden states back onto q/k/v.
  w_gu  [2 * intermediate, hidden]: gate and up stacked.

The HF modules' own parameters are re-pointed at slices of these buffers (no second copy;
transformers/PEFT keep working on the same weights). The LoRA parts are engine-owned copies
of the pool's slots, refreshed by :meth:`FusedDecodeWeights.refresh_slots` whenever the engine
pins adapters (a few small copies per admission).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")


@dataclass
class FusedLayer:
    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_gu: torch.Tensor
    b_gu: torch.Tensor | None
    bt: torch.Tensor | None  # None when the pool targets none of q/k/v
    qkv_sizes: tuple[int, int, int]
    targets: tuple[int, ...]  # indices into ATTN_INPUTS with LoRA rows in w_in

    @property
    def qkv(self) -> int:
        return sum(self.qkv_sizes)

    def base_in(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q/k/v rows only (the decode step of a batch without adapters)."""
        b = self.b_in[: self.qkv] if self.b_in is not None else None
        return self.w_in[: self.qkv], b


def _rebind(module: nn.Linear, name: str, view: torch.Tensor) -> None:
    param = getattr(module, name)
    view.copy_(param.data)
    param.data = view


def fuse_layer(
    modules: Mapping[str, nn.Linear],
    prefix_attn: str,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    bt: torch.Tensor | None = None,
) -> FusedLayer:
    """The layer's merged weights. ``bt``: a zeroed buffer of the bt shape to use (a layer's
    slice of one tensor for every layer, so that a slot's B blocks of all layers are one
    strided view: see :func:`slot_b_blocks`); allocated here when None."""
    q, k, v = (modules[n] for n in ATTN_INPUTS)
    sizes = (q.out_features, k.out_features, v.out_features)
    qkv = sum(sizes)
    hidden = q.in_features
    weight = q.weight
    targets = tuple(i for i, n in enumerate(ATTN_INPUTS) if f"{prefix_attn}.{n}" in lora)
    slot_rows = 0
    if targets:
        a0 = lora[f"{prefix_attn}.{ATTN_INPUTS[targets[0]]}"][0]
        slot_rows = a0.shape[0] * a0.shape[1]  # S * R
    w_in = torch.zeros(
        qkv + len(targets) * slot_rows, hidden, dtype=weight.dtype, device=weight.device
    )
    has_bias = any(m.bias is not None for m in (q, k, v))
    b_in = (
        torch.zeros(w_in.shape[0], dtype=weight.dtype, device=weight.device) if has_bias else None
    )
    offset = 0
    for module, size in zip((q, k, v), sizes, strict=True):
        _rebind(module, "weight", w_in[offset : offset + size])
        if module.bias is not None:
            _rebind(module, "bias", b_in[offset : offset + size])
        offset += size
    gate, up = modules["gate_proj"], modules["up_proj"]
    w_gu = torch.empty(
        gate.out_features + up.out_features, hidden, dtype=weight.dtype, device=weight.device
    )
    _rebind(gate, "weight", w_gu[: gate.out_features])
    _rebind(up, "weight", w_gu[gate.out_features :])
    b_gu = None
    if gate.bias is not None or up.bias is not None:
        b_gu = torch.zeros(w_gu.shape[0], dtype=weight.dtype, device=weight.device)
        for module, part in ((gate, b_gu[: gate.out_features]), (up, b_gu[gate.out_features :])):
            if module.bias is not None:
                _rebind(module, "bias", part)
    if not targets:
        bt = None
    elif bt is None:
        bt = torch.zeros(len(targets) * slot_rows, qkv, dtype=weight.dtype, device=weight.device)
    elif tuple(bt.shape) != (len(targets) * slot_rows, qkv):
        raise ValueError(f"bt buffer {tuple(bt.shape)} != {(len(targets) * slot_rows, qkv)}")
    return FusedLayer(w_in, b_in, w_gu, b_gu, bt, sizes, targets)


def bt_shape(
    modules: Mapping[str, nn.Linear],
    prefix_attn: str,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[int, int] | None:
    """The shape :func:`fuse_layer` gives this layer's ``bt`` (None: no LoRA on q/k/v)."""
    names = [n for n in ATTN_INPUTS if f"{prefix_attn}.{n}" in lora]
    if not names:
        return None
    a0 = lora[f"{prefix_attn}.{names[0]}"][0]
    return len(names) * a0.shape[0] * a0.shape[1], sum(modules[n].out_features for n in ATTN_INPUTS)


def slot_copies(
    layer: FusedLayer,
    prefix_attn: str,
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    slots: Iterable[int] | None,
    b_blocks: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(destinations, sources) that bring ``slots`` (None: all) of the pool into ``layer``:
    the A rows, and with ``b_blocks`` the B blocks too."""
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    if layer.bt is None:
        return dst, src
    offsets = [0, layer.qkv_sizes[0], layer.qkv_sizes[0] + layer.qkv_sizes[1]]
    for t, index in enumerate(layer.targets):
        a, b = lora[f"{prefix_attn}.{ATTN_INPUTS[index]}"]  # [S, R, in], [S, out, R]
        n_slots, rank, _ = a.shape
        out = layer.qkv_sizes[index]
        rows = layer.w_in[layer.qkv + t * n_slots * rank : layer.qkv + (t + 1) * n_slots * rank]
        rows = rows.view(n_slots, rank, -1)
        block = layer.bt[t * n_slots * rank : (t + 1) * n_slots * rank]
        block = block[:, offsets[index] : offsets[index] + out].unflatten(0, (n_slots, rank))
        b_t = b.transpose(1, 2)  # [S, R, out]
        if slots is None:
            dst += [rows, block] if b_blocks else [rows]
            src += [a, b_t] if b_blocks else [a]
        else:
            for s in slots:
                dst += [rows[s], block[s]] if b_blocks else [rows[s]]
                src += [a[s], b_t[s]] if b_blocks else [a[s]]
    return dst, src


def slot_b_blocks(
    bt_all: torch.Tensor,
    layers: list[FusedLayer],
    prefixes_attn: list[str],
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    slot: int,
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """A slot's B blocks of every layer, for ``bt_all`` [L, T*S*R, q+k+v] whose slices are the
    layers' ``bt``: per target one strided view [L, R, out] and its L sources [R, out]. One
    stack and one copy per target then replace a strided copy per layer and target (the
    multi-tensor copy cannot batch strided views: each is its own kernel on CUDA)."""
    first = layers[0]
    offsets = [0, first.qkv_sizes[0], first.qkv_sizes[0] + first.qkv_sizes[1]]
    out = []
    for t, index in enumerate(first.targets):
        name = ATTN_INPUTS[index]
        sources = []
        for prefix in prefixes_attn:
            b = lora[f"{prefix}.{name}"][1]  # [S, out, R]
            sources.append(b[slot].t())  # [R, out]
        n_slots, size, rank = lora[f"{prefixes_attn[0]}.{name}"][1].shape
        start = (t * n_slots + slot) * rank
        cols = slice(offsets[index], offsets[index] + size)
        out.append((bt_all[:, start : start + rank, cols], sources))
    return out
