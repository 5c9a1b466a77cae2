"""The engine's custom ops get their Inductor fallbacks before a step is compiled
(dlp/engine/inductor_ops.py), with the layout constraint Inductor's implicit path chooses."""

from __future__ import annotations

import torch

from dlp.engine import runner  # noqa: F401 - imports every module that defines an op
from dlp.engine.inductor_ops import OP_NAMES, dlp_ops, register_inductor_fallbacks


def test_every_engine_op_is_listed():
    loaded = {n for n in dir(torch.ops.dlp) if not n.startswith("_") and n != "name"}
    assert loaded == set(OP_NAMES)
    assert [op.name() for op in dlp_ops()] == [f"dlp::{n}" for n in OP_NAMES]


def test_fallbacks_registered_once_with_inductors_own_constraint():
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    register_inductor_fallbacks()
    assert register_inductor_fallbacks() == []  # already there: nothing registered twice
    for op in dlp_ops():
        assert op in lowering.lowerings
        tag = get_layout_constraint_tag(op, with_default=True)
        # The same constraint the implicit fallback would have added for this op.
        expected = lowering.tag_to_layout_constraint(tag)
        assert lowering._maybe_layout_constraints.get(op) is expected


def test_compiling_the_runner_registers_them():
    from engine_helpers import tiny_model
    from torch._inductor import lowering

    from dlp.engine.model import CompactLM
    from dlp.engine.runner import DecodeRunner

    register_inductor_fallbacks()
    for op in dlp_ops():  # as in a fresh process: Inductor has not met them yet
        lowering.lowerings.pop(op)
    DecodeRunner(CompactLM(tiny_model("qwen2"), 2, 32), 0, compile=True)
    assert all(op in lowering.lowerings for op in dlp_ops())
