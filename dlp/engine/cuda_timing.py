"""Timing a piece of GPU work as the engine runs it: captured once as a CUDA graph, replayed,
each replay timed by CUDA events. The GPU benchmarks' kernel measurements use it
(``benchmarks/gemm_bench.py``, ``pdl_bench.py``, ``decode_ops_bench.py``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any


def graph_replay_us(fn: Callable[[int], Any], calls: int = 1, iters: int = 50) -> float:
    """Median microseconds per call of ``fn(0) .. fn(calls - 1)``, captured as one CUDA graph
    (after a warm-up on a side stream: compiles, allocator pools) and replayed ``iters`` times
    after one untimed replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)
