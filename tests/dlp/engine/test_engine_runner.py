"""DecodeRunner's prefill buckets (the CUDA-graph shapes) and its eager CPU path."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import TINY_VOCAB, tiny_model

from dlp.engine.config import EngineConfig
from dlp.engine.model import CompactLM, prefill_layer
from dlp.engine.runner import PREFILL_GRAPH_TOKENS, DecodeRunner
from dlp.errors import DlpError


def _runner(max_batch: int = 64, max_seq: int = 256) -> DecodeRunner:
    model = tiny_model("qwen2")
    return DecodeRunner(CompactLM(model, max_batch=max_batch, max_seq=max_seq), n_slots=0)


def test_every_prefill_shape_has_a_bucket_that_holds_it():
    runner = _runner(max_batch=64, max_seq=256)
    rows = {runner._row_bucket(n) for n in range(1, 65)}
    assert rows == {1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64}
    for n in range(1, 65):
        assert n <= runner._row_bucket(n) <= 64
    # Small admissions waste little: at most one padded row up to 16 rows.
    assert max(runner._row_bucket(n) - n for n in range(5, 17)) == 1
    for t in range(1, 256):
        bucket = runner._token_bucket(t)
        assert t <= bucket <= 256 and bucket % 16 == 0
    # Padding stays small where prefills are host-bound: at most 15 tokens up to 256.
    assert max(runner._token_bucket(t) - t for t in range(1, 257)) == 15
    long_runner = _runner(max_batch=4, max_seq=2048)
    assert long_runner._token_bucket(300) == 512
    assert long_runner._token_bucket(2000) == 2048  # capped at the cache length


def test_cpu_runner_runs_prefill_directly():
    """No graphs on the CPU: prefill is the eager block, its logits the model's own."""
    runner = _runner(max_batch=4, max_seq=64)
    assert runner.graph_tokens == 0 and not runner.prefill_compiled
    assert runner.prefill_fn is prefill_layer
    assert PREFILL_GRAPH_TOKENS >= 1024
    ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    lengths, rows = torch.tensor([9, 4]), torch.tensor([3, 1])
    logits = runner.prefill(ids, lengths, rows, None)
    model = runner.model.hf
    with torch.no_grad():
        for i in range(2):
            ref = model(ids[i : i + 1, : lengths[i]]).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)


def test_compile_mode_is_checked():
    EngineConfig(compile_mode="max-autotune-no-cudagraphs").validate()
    # reduce-overhead would capture CUDA graphs inside the engine's own graph capture.
    with pytest.raises(DlpError, match="compile_mode"):
        EngineConfig(compile_mode="reduce-overhead").validate()


def test_prefill_from_host_lists_matches_tensor_prefill():
    """The engine's prefill (host lists) and the tensor one agree, greedy tokens included."""
    runner = _runner(max_batch=4, max_seq=64)
    prompts = [[5, 9, 2, 7, 1, 3], [8, 4], [11, 12, 13]]
    rows = [2, 0, 3]
    logits, greedy = runner.prefill_host(prompts, rows, None)
    ids = torch.zeros(3, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    ref = runner.prefill(ids, torch.tensor([6, 2, 3]), torch.tensor(rows), None)
    torch.testing.assert_close(logits, ref)
    assert greedy == ref.argmax(-1).tolist()


def test_step_inputs_are_sent_in_one_upload():
    runner = _runner(max_batch=4, max_seq=64)
    runner.host_tokens[:] = [3, 1, 4, 1]
    runner.host_positions[:] = [0, 5, 9, 2]
    runner.upload_step_inputs()
    assert runner.tokens.tolist() == [3, 1, 4, 1]
    assert runner.positions.tolist() == [0, 5, 9, 2]


def test_decode_attention_choice_on_the_cpu():
    """auto keeps the matmul attention on the CPU; the Triton kernel is refused there."""
    model = tiny_model("qwen2")
    runner = DecodeRunner(CompactLM(model, max_batch=2, max_seq=1024), n_slots=0)
    assert runner.model.attn_splits == 0
    with pytest.raises(DlpError, match="triton"):
        DecodeRunner(CompactLM(model, max_batch=2, max_seq=64), n_slots=0, attention="triton")
    with pytest.raises(DlpError, match="decode_attention"):
        EngineConfig(decode_attention="triton").validate()
    EngineConfig(decode_attention="triton", device="cuda").validate()


def test_decode_gemm_choice_on_the_cpu():
    """auto keeps F.linear on the CPU; the Triton GEMMs are refused there."""
    model = tiny_model("qwen2")
    runner = DecodeRunner(CompactLM(model, max_batch=2, max_seq=64), n_slots=0)
    assert runner.model.decode_gemm is False
    with pytest.raises(DlpError, match="decode_gemm"):
        DecodeRunner(CompactLM(model, max_batch=2, max_seq=64), n_slots=0, gemm="triton")
    with pytest.raises(DlpError, match="decode_gemm"):
        EngineConfig(decode_gemm="triton").validate()
    with pytest.raises(DlpError, match="decode_gemm"):
        DecodeRunner(CompactLM(model, max_batch=2, max_seq=64), n_slots=0, gemm="triton_pdl")
    with pytest.raises(DlpError, match="decode_gemm"):
        EngineConfig(decode_gemm="triton_pdl").validate()
    with pytest.raises(DlpError, match="decode_gemm"):
        EngineConfig(decode_gemm="magma").validate()
    EngineConfig(decode_gemm="triton", device="cuda").validate()
    EngineConfig(decode_gemm="triton_pdl", device="cuda").validate()
