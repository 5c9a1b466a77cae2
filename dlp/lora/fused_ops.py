"""The fused multi-LoRA delta: one gather + two GEMMs for a batch of rows with different mixes.

For rows b with mixes {i: w_bi}, the exact DLP-LoRA update is
    delta_b = sum_i w_bi * s_i * B_i (A_i x_b)
Stacking the U adapters the batch uses along the rank axis turns the sum into
    delta = ((x @ A_u^T) * scale_b) @ B_u^T
where scale_b repeats w_bi * s_i over adapter i's rank columns (zero where row b does not use
adapter i). Kernel count does not depend on how many distinct mixes the batch holds.
Ranks smaller than the slot rank are zero-padded, so padding adds nothing.

Two entry points:
- :func:`lora_delta` takes whole slots (rank padded to the slot rank R).
- :func:`lora_delta_packed` takes the gathered rank *columns* only (sum of the real ranks), which
  the pool precomputes once per batch (``col_index``) so that an r=8 adapter in R=64 slots
  costs r, not R, columns. Same kernels, less work.
"""

from __future__ import annotations

import torch


def lora_delta(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor | None,
    row_scales: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of LoRA outputs.

    x:          [..., in]           rows are the leading dims of ``row_scales``
    a_stack:    [S, R, in]          all resident slots (zero-padded to rank R)
    b_stack:    [S, out, R]         (a transposed view of [S, R, out] storage is fastest)
    slot_ids:   [U] long or None    slots this batch uses (None: all S slots, no gather)
    row_scales: [rows, U]           w_bi * s_i per row and used slot (0 when unused);
                                    rows = x.shape[0] (one scale per sequence, broadcast over
                                    tokens) or the product of x's leading dims (one per token)
    returns     [..., out]
    """
    b_t = b_stack.transpose(1, 2)  # [S, R, out]
    if slot_ids is not None:
        a_stack = a_stack.index_select(0, slot_ids)
        b_t = b_t.index_select(0, slot_ids)  # contiguous [U, R, out] whatever the storage
    n_slots, rank, d_in = a_stack.shape
    a_cols = a_stack.reshape(n_slots * rank, d_in)  # [U*R, in]
    b_cols = b_t.reshape(n_slots * rank, b_t.shape[-1])  # [U*R, out]
    # repeat each slot's scale over its R rank columns; expand+reshape (not repeat_interleave)
    # so nothing depends on tensor values: no host sync, CUDA-graph safe.
    rows = row_scales.shape[0]
    col_scales = row_scales.unsqueeze(-1).expand(rows, n_slots, rank).reshape(rows, -1)
    return lora_delta_packed(x, a_cols, b_cols, col_scales)


def lora_delta_packed(
    x: torch.Tensor,
    a_cols: torch.Tensor,
    b_cols: torch.Tensor,
    col_scales: torch.Tensor,
) -> torch.Tensor:
    """``((x @ a_cols^T) * col_scales) @ b_cols`` with scales broadcast over tokens.

    x: [..., in]; a_cols: [K, in]; b_cols: [K, out] (B transposed); col_scales: [rows, K].
    """
    hidden = torch.matmul(x, a_cols.t())  # [..., K]
    scales = broadcast_rows(col_scales.to(hidden.dtype), hidden)
    # in place when no autograd graph needs ``hidden``: one temporary less per layer
    hidden = hidden * scales if hidden.requires_grad else hidden.mul_(scales)
    return torch.matmul(hidden, b_cols)


def broadcast_rows(scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View ``scales [rows, K]`` so it broadcasts against ``like [..., K]``.

    rows == like.shape[0]: one scale row per sequence, shared by all its tokens.
    rows == prod(like.shape[:-1]): one scale row per token (packed / flattened batches).
    """
    lead = like.shape[:-1]
    rows = scales.shape[0]
    if like.dim() == 2:
        if rows != lead[0]:
            raise ValueError(f"row scales have {rows} rows, input has {lead[0]}")
        return scales
    if rows == lead[0]:
        return scales.view(rows, *([1] * (len(lead) - 1)), scales.shape[-1])
    if rows == like.numel() // like.shape[-1]:
        return scales.view(*lead, scales.shape[-1])
    raise ValueError(
        f"row scales have {rows} rows, input has leading shape {tuple(lead)}: need one row "
        f"per sequence ({lead[0]}) or per token"
    )
