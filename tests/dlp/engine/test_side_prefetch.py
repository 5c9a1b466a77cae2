"""The side-stream L2 prefetch's plan and address table (dlp.engine.side_prefetch). The
kernel itself needs a Hopper GPU (bulk prefetch, inline asm): its GPU test is
``test_engine_cuda.py::test_side_stream_prefetch_gives_the_eager_tokens``."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import tiny_model

from dlp.engine import side_prefetch as sp
from dlp.engine.model import CompactLM


def test_plans_parse_from_the_benchmark_spelling():
    assert sp.SidePrefetchPlan.parse("kv.o.gu25.down50") == sp.SidePrefetchPlan(
        kv=True, o=True, gu=0.25, down=0.5
    )
    assert sp.SidePrefetchPlan.parse("") == sp.NOTHING
    assert not sp.SidePrefetchPlan.parse("none").active
    assert sp.SidePrefetchPlan.parse("gu100").gu == 1.0
    for bad in ("gu0", "gu101", "down", "qkv", "kv,o"):
        with pytest.raises(ValueError, match="side prefetch"):
            sp.SidePrefetchPlan.parse(bad)


def test_row_prefixes_cover_whole_k_steps_of_every_piece_of_every_row():
    w = torch.zeros(6, 1000, dtype=torch.bfloat16)  # rows of 2000 bytes
    region = sp.row_prefix_region(w, 0.25, segment_elems=256, step_elems=64)
    # Pieces of 256 elements (the last one 232): 4 a row; a quarter of 256 = one K step of 64.
    assert (region.rows, region.segments, region.segment_stride) == (6, 4, 512)
    assert region.prefix == 128
    requests = region.requests()
    assert len(requests) == 24
    base = w.data_ptr()
    assert requests[:5] == [
        (base, 128), (base + 512, 128), (base + 1024, 128), (base + 1536, 128), (base + 2000, 128)
    ]  # fmt: skip
    # A prefix under one K step is nothing; a whole row is capped at one request's bytes.
    assert sp.row_prefix_region(w, 0.1, segment_elems=256, step_elems=64) is None
    big = torch.zeros(2, 40000, dtype=torch.bfloat16)
    assert sp.row_prefix_region(big, 1.0).prefix == sp.CHUNK_BYTES
    assert sp.row_prefix_region(w, 0.0) is None
    assert sp.row_prefix_region(w.t(), 0.5) is None  # K not contiguous


def test_whole_weights_and_kv_caches_become_table_rows():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    region = sp.whole_region(w)
    assert region.requests() == [(w.data_ptr() + 128 * r, 128) for r in range(8)]
    assert sp.whole_region(w.t()) is None
    k = torch.zeros(3, 2, 16, 32, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    kv = sp.kv_fields(k, v)
    assert kv == [k.data_ptr(), v.data_ptr(), 2 * 16 * 64, 16 * 64, 64, 15 * 64]
    with pytest.raises(ValueError, match="one shape"):
        sp.kv_fields(k, v[:2])
    row = sp.layer_table_row(kv, [None, region, None])
    assert len(row) == sp.FIELDS
    assert row[: sp.KV_FIELDS] == kv
    assert row[sp.KV_FIELDS : sp.KV_FIELDS + sp.WEIGHT_FIELDS] == region.fields()
    assert row[sp.KV_FIELDS + sp.WEIGHT_FIELDS :] == [0] * (2 * sp.WEIGHT_FIELDS)
    assert sp.layer_table_row(None, [])[:1] == [0]
    with pytest.raises(ValueError, match="at most"):
        sp.layer_table_row(None, [region] * 4)


def test_a_cpu_model_prefetches_nothing_and_decodes_as_before():
    """On the CPU (no bulk prefetch) a plan is recorded but no table is built, so the step
    has no prefetch op and its logits are unchanged."""
    hf = tiny_model("qwen2")
    model = CompactLM(hf, 2, 16)
    tokens = torch.tensor([3, 5])
    positions = torch.tensor([0, 0])
    before = model.decode(tokens, positions, None)
    assert not sp.enabled(torch.device("cpu"))
    assert model.set_side_prefetch(sp.SidePrefetchPlan(kv=True, gu=0.5)) is False
    assert model._side_table is None
    positions = torch.tensor([0, 0])
    after = model.decode(tokens, positions, None)
    torch.testing.assert_close(after, before)
    sp.join(torch.device("cpu"))  # nothing forked: a no-op
