"""The engine's custom ops get their Inductor fallbacks before a step is compiled
(dlp/engine/inductor_ops.py), with the layout constraint Inductor's implicit path chooses."""

from __future__ import annotations

import pytest
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


_ENGINE_CHILD = """
import asyncio
import logging
import os
import pathlib
import tempfile

# A graph found in Inductor's caches is not lowered again: a fresh cache, every graph lowered.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()

from engine_helpers import make_engine, request, tiny_model, write_adapters

from dlp.engine import residual_norm
from dlp.routing.mix import AdapterMix

# Inductor's implicit-fallback path logs each op it meets without a lowering: listen for ours.
implicit = []
class Listen(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "implicit fallback" in message and "target: dlp." in message:
            implicit.append(message.split("target: ")[1].split()[0])
graph_log = logging.getLogger("torch._inductor.graph")
graph_log.setLevel(logging.INFO)
graph_log.addHandler(Listen())

residual_norm.SPLIT_N = json.loads(sys.argv[1])["split_n"]
model = tiny_model("qwen2")
adapters = write_adapters(model, pathlib.Path(tempfile.mkdtemp()), ["t0", "t1"])
mix = AdapterMix.from_weights({"t0": 0.7, "t1": 0.3})
mixes = [AdapterMix.base(), AdapterMix.single("t0"), mix]

def tokens(**cfg):
    engine = make_engine(model, None, adapters, device="cpu", max_batch=4, max_seq_len=64, **cfg)
    if cfg.get("compile"):
        # The PDL step's ops (the interpreter launches them plainly), compiled by Inductor.
        m = engine.model
        m.attn_splits, m.attn_rope, m.decode_gemm, m.decode_pdl = 1, True, True, True
        m.decode_fuse_norms = m.decode_prescale_norm = True
    async def go():
        async with engine:
            reqs = [request(i, mix, ids=[3, 4, 5 + i], max_tokens=6) for i, mix in enumerate(mixes)]
            return await asyncio.gather(*(engine.generate(r) for r in reqs))
    return [list(r.token_ids) for r in asyncio.run(go())]

eager = tokens(compile=False)
compiled = tokens(compile=True, compile_scope="step")
print(json.dumps({"eager": eager, "compiled": compiled, "implicit": implicit}))
"""


@pytest.mark.parametrize("split_n", [0, 1])
def test_the_compiled_pdl_step_takes_the_registered_fallbacks(split_n):
    """The engine's PDL step compiled by Inductor (CPU, ops under Triton's interpreter) with
    the fallbacks registered up front: Inductor never takes its implicit path for our ops
    (the one that printed their IR), and the step still writes its KV cache (mutating ops)
    and gives the eager engine's tokens for base, single and mixed rows."""
    pytest.importorskip("triton")
    from triton_interpreter import run_interpreted

    out = run_interpreted(_ENGINE_CHILD, {"split_n": split_n}, timeout=600)
    assert out["implicit"] == []
    assert out["compiled"] == out["eager"]
    assert all(len(t) == 6 for t in out["eager"])
