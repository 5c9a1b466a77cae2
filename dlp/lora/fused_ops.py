"""The fused multi-LoRA delta: one gather + two GEMMs for a batch of rows with different mixes.

For rows b with mixes {i: w_bi}, the exact DLP-LoRA update is
    delta_b = sum_i w_bi * s_i * B_i (A_i x_b)
Stacking the U adapters the batch uses along the rank axis turns the sum into
    delta = ((x @ A_u^T) * scale_b) @ B_u^T
where scale_b repeats w_bi * s_i over adapter i's rank columns (zero where row b does not use
adapter i). Kernel count does not depend on how many distinct mixes the batch holds.
Ranks smaller than the slot rank are zero-padded, so padding adds nothing.
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
    b_stack:    [S, out, R]
    slot_ids:   [U] long or None    slots this batch uses (None: all S slots, no gather)
    row_scales: [rows, U]           w_bi * s_i per row and used slot (0 when unused);
                                    rows = x.shape[0], or x.shape[0]*x.shape[1] flattened
    returns     [..., out]
    """
    if slot_ids is not None:
        a_stack = a_stack.index_select(0, slot_ids)
        b_stack = b_stack.index_select(0, slot_ids)
    n_slots, rank, d_in = a_stack.shape
    d_out = b_stack.shape[1]
    a_flat = a_stack.reshape(n_slots * rank, d_in)  # [U*R, in]
    b_flat = b_stack.permute(1, 0, 2).reshape(d_out, n_slots * rank)  # [out, U*R]
    hidden = torch.matmul(x, a_flat.t())  # [..., U*R]
    scale = row_scales.to(hidden.dtype).repeat_interleave(rank, dim=-1)  # [rows, U*R]
    while scale.dim() < hidden.dim():
        scale = scale.unsqueeze(-2)
    return torch.matmul(hidden * scale, b_flat.t())
