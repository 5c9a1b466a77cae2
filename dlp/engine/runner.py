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
        # Two graphs: with the LoRA delta of every slot, and without it for steps in which no
        # row uses an adapter (then the base model runs at full speed).
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.compile_failed = False

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _step(self, rows: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scales = None
        if lora and self.row_scales is not None:
            scales = self.row_scales[:rows]
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
        try:
            self._capture()
        except Exception:
            if self.layer_fn is decode_layer:
                raise
            # A compiler failure must not take the engine down: graphs of the eager layer
            # are slower but still correct.
            log.exception("compiled decode step failed; capturing the eager one instead")
            self.compile_failed = True
            self.graphs.clear()
            self.layer_fn = decode_layer
            self._capture()

    def _capture(self) -> None:
        rows = self.model.max_batch
        variants = [False] + ([True] if self.row_scales is not None and self.model.lora else [])
        pool = None
        for lora in variants:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step(rows, lora)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, greedy = self._step(rows, lora)
            pool = graph.pool()  # the two graphs never run at once: share their memory
            torch.cuda.synchronize()
            self.graphs[lora] = (graph, logits, greedy)
            log.info("captured decode graph for %d rows (lora=%s)", rows, lora)

    @torch.no_grad()
    def step(self, rows: int, lora: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for rows [0, rows); inputs must already be in the buffers.
        ``lora=False`` skips the adapter path (no row uses one). Returns (logits [rows', V],
        greedy [rows']) with rows' >= rows (a captured graph always runs every row)."""
        lora = lora and self.row_scales is not None and bool(self.model.lora)
        captured = self.graphs.get(lora)
        if captured is not None:
            graph, logits, greedy = captured
            graph.replay()
            return logits, greedy
        return self._step(rows, lora)
