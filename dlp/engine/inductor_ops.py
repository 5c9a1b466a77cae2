"""The engine's custom ops registered with Inductor before it compiles a step with them.

Inductor lowers an op it has no lowering for by calling it (an "implicit fallback") and
registers that fallback the first time it meets the op. torch 2.11 (the H200's) logs that
first meeting with a message it builds eagerly from the op's arguments' IR, and an IR node
prints its inputs, recursively. In the PDL decode step every kernel is an op of ours, and
ops with several outputs (the o GEMM's residual, the residual + norm kernel) feed the next
layer along more than one path, so the IR under the greedy argmax, first met after the last
layer, prints exponentially many times: with ``residual_norm.SPLIT_N = 1`` (Inductor's own
norm kernels, which cut that chain, gone) the H200 engine's step compile did not finish in
7 minutes (the stack: ``graph.call_function`` -> ``exc.operator_str`` -> ``ir.__str__``).
Registering the fallbacks up front, with the layout constraint Inductor's implicit path would
choose, means Inductor never takes that path. (torch 2.13 builds the message lazily.)
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Every torch.library.custom_op of the engine ("dlp::NAME"): the decode step's kernels.
OP_NAMES = (
    "rope_rows",
    "decode_attention_rope_pdl",
    "skinny_pdl",
    "skinny_residual_pdl",
    "residual_norm_pdl",
    "greedy_pdl",
)


def dlp_ops() -> list[torch._ops.OpOverload]:
    """The engine's ops that are registered in this process (their modules imported)."""
    packets = (getattr(torch.ops.dlp, name, None) for name in OP_NAMES)
    return [packet.default for packet in packets if packet is not None]


def register_inductor_fallbacks() -> list[str]:
    """Register a fallback lowering for each of :func:`dlp_ops` that Inductor has none for,
    as its implicit fallback would (the op's layout constraint tag, else the default one).
    Returns the names registered now; none where this torch lacks the helpers (then Inductor
    registers them itself, as before)."""
    try:
        from torch._inductor import lowering
        from torch._inductor.lowering import tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # pragma: no cover - older torch: Inductor's own path
        return []
    registered = []
    for op in dlp_ops():
        if op in lowering.lowerings:
            continue
        try:
            constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint)
        except Exception:  # never worse than before: Inductor's own path still works
            log.warning("could not register an Inductor fallback for %s", op, exc_info=True)
            continue
        registered.append(op.name())
    if registered:
        log.debug("registered Inductor fallbacks for %s", registered)
    return registered
