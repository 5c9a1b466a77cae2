"""Runs the decode step: eagerly (CPU, tests) or compiled and captured as one CUDA graph.

The step reads three static input buffers (token, position and LoRA row scales per row) and
writes two static outputs (logits, greedy token). Changing mixes only rewrites ``row_scales``;
loading an adapter rewrites pool slots in place: neither changes a shape or an address, so the
graph captured once stays valid for the engine's life.
"""

from __future__ import annotations

import logging

import torch

from dlp.engine.model import CompactLM, decode_layer

log = logging.getLogger(__name__)


class DecodeRunner:
    def __init__(
        self,
        model: CompactLM,
        n_slots: int,
        *,
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.model = model
        device = model.rope_cos.device
        b = model.max_batch
        self.device = device
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.row_scales = (
            torch.zeros(b, n_slots, dtype=torch.float32, device=device) if n_slots else None
        )
        self.layer_fn = decode_layer
        if compile:
            # One compiled block serves all layers (same shapes, weights are arguments).
            self.layer_fn = torch.compile(decode_layer, fullgraph=True, dynamic=False)
        self.use_graph = cuda_graph and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None

    def _step(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        scales = self.row_scales[:rows] if self.row_scales is not None else None
        logits = self.model.decode(
            self.tokens[:rows], self.positions[:rows], scales, layer_fn=self.layer_fn
        )
        return logits, logits.argmax(dim=-1)

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up (compiles) and capture the full-batch step. Rows' cache contents written
        during warm-up are garbage at position 0; every row is prefilled before use."""
        if not self.use_graph:
            return
        rows = self.model.max_batch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step(rows)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits, self.greedy = self._step(rows)
        torch.cuda.synchronize()
        self.graph = graph
        log.info("captured decode graph for %d rows", rows)

    @torch.no_grad()
    def step(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for rows [0, rows); inputs must already be in the buffers.
        Returns (logits [rows', V], greedy [rows']) with rows' >= rows."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits, self.greedy
        return self._step(rows)
