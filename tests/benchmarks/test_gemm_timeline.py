"""The GEMM timeline probe's summary of one traced launch (the probe itself reads the GPU's
global timer): spans, programs sharing an SM, loop times and the tail."""

from __future__ import annotations

import pytest
import torch
from bench_modules import load


def _probe():
    return load("gemm_timeline")


def test_program_stats_of_a_traced_launch() -> None:
    us = 1000  # the trace is in ns
    # (SM, start, loop end, end): SMs 0-3 run two programs at once (8 programs ending by
    # 10 us), SM 4 one after them (ends at 19 us), SM 5 one that ends late (the tail).
    rows = []
    for sm in range(4):
        rows += [[sm, 0, 8 * us, 9 * us], [sm, 1 * us, 9 * us, 10 * us]]
    rows += [[4, 10 * us, 18 * us, 19 * us], [5, 0, 30 * us, 31 * us]]
    stats = _probe().program_stats(torch.tensor(rows, dtype=torch.int64), weight_bytes=4_000_000)
    assert stats["programs"] == 10 and stats["sms"] == 6
    assert stats["max_programs_per_sm"] == 2
    assert stats["span_us"] == pytest.approx(31.0)
    assert stats["last_start_us"] == pytest.approx(10.0)
    assert stats["loop_p50_us"] == pytest.approx(8.0)
    assert stats["epilogue_p50_us"] == pytest.approx(1.0)
    # 9 of the 10 programs end by 19 us: the last 12 us are the tail.
    assert stats["end_p90_us"] == pytest.approx(19.0)
    assert stats["tail_us"] == pytest.approx(12.0)
    assert stats["tb_per_s_span"] == pytest.approx(4e6 / 31.0 / 1e6)
    assert len(stats["spans"]) == 10
