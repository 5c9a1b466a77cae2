"""The GPU path (compiled blocks, CUDA graphs, the Triton decode attention, staged inputs)
against the eager path of the same engine. Skipped without a GPU; run on the GPU machine
with ``pytest tests/dlp/engine/test_engine_cuda.py``."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import make_engine, request, tiny_model, write_adapters

from dlp.routing.mix import AdapterMix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_kernel_matches_reference(dtype, splits):
    from dlp.engine.decode_attention import decode_attention, decode_attention_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, heads, kvh, seq, d = 9, 12, 2, 300, 128
    q = torch.randn(b, heads, d, generator=gen, device="cuda").to(dtype)
    k = torch.randn(b + 2, kvh, seq, d, generator=gen, device="cuda").to(dtype)
    v = torch.randn(b + 2, kvh, seq, d, generator=gen, device="cuda").to(dtype)
    lengths = torch.tensor([1, 2, 63, 64, 65, 130, 255, 299, 300], device="cuda")
    out = decode_attention(q, k, v, lengths, d**-0.5, splits)
    ref = decode_attention_reference(q, k, v, lengths, d**-0.5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # Through a slot table (spare cache rows): rows read other cache rows.
    slots = torch.tensor([10, 0, 3, 3, 7, 1, 9, 2, 5], device="cuda")
    out = decode_attention(q, k, v, lengths, d**-0.5, splits, slots=slots)
    ref = decode_attention_reference(q, k[slots], v[slots], lengths, d**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 100])
def test_skinny_gemm_matches_f_linear(dtype, rows):
    import torch.nn.functional as F

    from dlp.engine.skinny_gemm import GemmConfig, skinny_linear, skinny_silu_mul

    gen = torch.Generator(device="cuda").manual_seed(0)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for n, k, bias, cfg in [
        (2048, 1536, True, None),
        (1536, 8960, False, None),
        (1536, 8960, False, GemmConfig(64, 128, 3)),  # uneven split of 70 K steps
        (200, 136, True, GemmConfig(32, 64, 2)),  # ragged N and K
    ]:
        x = torch.randn(rows, k, generator=gen, device="cuda").to(dtype)
        w = (torch.randn(2 * n, k, generator=gen, device="cuda") * k**-0.5).to(dtype)
        b = torch.randn(2 * n, generator=gen, device="cuda").to(dtype) if bias else None
        ref = F.linear(x.float(), w[:n].float(), None if b is None else b[:n].float())
        out = skinny_linear(x, w[:n], None if b is None else b[:n], cfg)
        assert out.dtype == dtype and out.shape == (rows, n)
        # Against fp32 references: bf16 results are off by their final rounding only.
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        gu = F.linear(x.float(), w.float(), None if b is None else b.float())
        ref_act = F.silu(gu[:, :n]) * gu[:, n:]
        act = skinny_silu_mul(x, w, b, cfg)
        # gate and up are rounded before the product: a rounding step of each, times the other.
        scale = gu.abs().max().item()
        torch.testing.assert_close(act.float(), ref_act, atol=2 * tol * scale, rtol=2 * tol)


def test_skinny_gemm_pdl_chain_in_a_graph_gives_the_plain_bits():
    """PDL lets each kernel start before the one it reads from ends: a chain of GEMMs, each
    reading the previous output, captured in one CUDA graph, must give the plain launches'
    bits (a missing or misplaced wait would read a stale input)."""
    from dlp.engine.skinny_gemm import GemmConfig, launch_partials

    gen = torch.Generator(device="cuda").manual_seed(0)
    m, h = 64, 1536
    ws = [(torch.randn(h, h, generator=gen, device="cuda") * h**-0.5).bfloat16() for _ in range(8)]
    x0 = torch.randn(m, h, generator=gen, device="cuda").bfloat16()
    results = []
    for pdl in (False, True):
        bufs = [torch.zeros(m, h, device="cuda", dtype=torch.bfloat16) for _ in ws]

        def chain(pdl=pdl, bufs=bufs):
            x = x0
            for w, out in zip(ws, bufs, strict=True):
                x = launch_partials(x, w, None, m, h, h, GemmConfig(32, 64, 1), False, pdl, out)

        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        for b in bufs:
            b.zero_()
        graph.replay()
        torch.cuda.synchronize()
        results.append(bufs[-1].clone())
    assert results[0].abs().sum() > 0
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_launch_settings_keep_the_result(splits):
    from dlp.engine.decode_attention import (
        LaunchConfig,
        decode_attention,
        decode_attention_reference,
    )

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, heads, kvh, seq, d = 5, 12, 2, 256, 128
    q = torch.randn(b, heads, d, generator=gen, device="cuda").bfloat16()
    k = torch.randn(b, kvh, seq, d, generator=gen, device="cuda").bfloat16()
    v = torch.randn(b, kvh, seq, d, generator=gen, device="cuda").bfloat16()
    lengths = torch.tensor([1, 32, 33, 193, 256], device="cuda")
    ref = decode_attention_reference(q, k, v, lengths, d**-0.5).float()
    for launch in (LaunchConfig(32, 8, 2), LaunchConfig(128, 4, 1), LaunchConfig(64, 2, 3)):
        out = decode_attention(q, k, v, lengths, d**-0.5, splits, launch=launch)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_snapshot_upload_survives_a_rewrite_before_the_copy_runs():
    """The copy of a snapshot upload runs after a long kernel; the host buffer is rewritten
    meanwhile; the device still gets what was staged."""
    from dlp.engine.staging import StagingBuffer

    buf = StagingBuffer({"tokens": (torch.long, 1024)}, torch.device("cuda"))
    for step in range(4):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time queued before the copy
        buf.host("tokens")[:] = step
        buf.upload(snapshot=True)
        buf.host("tokens")[:] = -1
        assert buf.device("tokens").tolist() == [step] * 1024


def _requests():
    mixes = [
        AdapterMix.base(),
        AdapterMix.single("t0"),
        AdapterMix.from_weights({"t0": 0.6, "t1": 0.4}),
        AdapterMix.from_weights({"t1": 0.3, "t2": 0.5, "t0": 0.2}),
    ]
    gen = torch.Generator().manual_seed(1)
    reqs = []
    for i in range(12):
        ids = torch.randint(1, 200, (3 + 7 * i,), generator=gen).tolist()
        reqs.append(request(i, mixes[i % 4], ids=ids, max_tokens=10, ignore_eos=True))
    return reqs


def _engine_tokens(model, adapters, **cfg):
    """The tokens of _requests() through an engine built with ``cfg``, and the engine."""
    engine = make_engine(model, None, adapters, device="cuda", max_batch=8, max_seq_len=128, **cfg)

    async def run():
        async with engine:
            return await asyncio.gather(*(engine.generate(r) for r in _requests()))

    return [r.token_ids for r in asyncio.run(run())], engine


# The engine's fastest decode step: one compiled graph, every kernel a PDL launch.
PDL_STEP = dict(
    compile=True,
    cuda_graph=True,
    compile_scope="step",
    decode_attention="triton_rope",
    decode_gemm="triton_pdl",
)


def _eager_and_pdl_step_tokens(model, adapters):
    """The tokens of the eager engine and of the PDL whole-step engine (captured, no
    fallback to the eager step), and the latter engine."""
    eager, _ = _engine_tokens(model, adapters, compile=False, cuda_graph=False)
    fast, engine = _engine_tokens(model, adapters, **PDL_STEP)
    assert engine.runner.captured and not engine.runner.compile_failed
    return eager, fast, engine


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="the fast decode path needs a Hopper or later GPU",
)
def test_default_settings_take_the_fast_path_and_give_the_eager_tokens(tmp_path):
    """fp32: an engine on the GPU with every speed setting left at its default resolves the
    "auto"s to the whole-step PDL path (decode_path.py), with overlapped steps (also a
    default on CUDA), and == the eager engine, token for token, on _requests()' mixes."""
    model = tiny_model("qwen2").to("cuda")
    adapters = write_adapters(model, tmp_path, ["t0", "t1", "t2"])
    eager, _ = _engine_tokens(model, adapters, compile=False, cuda_graph=False)
    default, engine = _engine_tokens(model, adapters)
    assert engine.runner.decode_path.fast
    assert engine.stats()["decode_path"]["gemm"] == "triton_pdl"
    assert engine.runner.captured and not engine.runner.compile_failed
    assert default == eager


def test_balanced_gate_up_columns_give_the_eager_tokens(tmp_path, monkeypatch):
    """fp32: the PDL whole-step engine with gate/up's columns shared evenly by 3 programs
    (``GemmConfig.programs``: masked, unaligned column ranges, as the 1.5B shape's default
    132) == the eager engine, token for token."""
    from dlp.engine import skinny_gemm

    model = tiny_model("qwen2").to("cuda")
    adapters = write_adapters(model, tmp_path, ["t0", "t1", "t2"])
    key = (model.config.intermediate_size, model.config.hidden_size, True)
    monkeypatch.setitem(skinny_gemm.MEASURED, key, skinny_gemm.GemmConfig(64, 32, 1, programs=3))
    eager, balanced, _ = _eager_and_pdl_step_tokens(model, adapters)
    assert balanced == eager


@pytest.mark.parametrize("split_n", [1, 2])
def test_residual_norm_kernel_gives_the_eager_tokens(tmp_path, monkeypatch, split_n):
    """fp32: the PDL whole-step engine with each layer's residual add + next input norm (and
    the final norm) as our one-pass kernel (``residual_norm.SPLIT_N`` programs a row; 1 by
    default) == the eager engine, token for token."""
    from dlp.engine import residual_norm

    monkeypatch.setattr(residual_norm, "SPLIT_N", split_n)
    model = tiny_model("qwen2").to("cuda")
    adapters = write_adapters(model, tmp_path, ["t0", "t1", "t2"])
    eager, fast, _ = _eager_and_pdl_step_tokens(model, adapters)
    assert fast == eager


def test_packed_weights_give_the_eager_tokens(tmp_path, monkeypatch):
    """fp32: the PDL whole-step engine with every decode GEMM's weight packed K step by K
    step (``runner.PACKED_WEIGHTS``) == the eager engine, token for token (q/v adapters in
    the mixes: the LoRA step keeps q/k/v's merged weight plain)."""
    from dlp.engine import runner

    monkeypatch.setattr(runner, "PACKED_WEIGHTS", ("qkv", "o", "gu", "down"))
    model = tiny_model("qwen2").to("cuda")
    adapters = write_adapters(model, tmp_path, ["t0", "t1", "t2"])
    eager, fast, engine = _eager_and_pdl_step_tokens(model, adapters)
    assert engine.runner.model.decode_packed == ("qkv", "o", "gu", "down")
    assert fast == eager


@pytest.mark.parametrize("prescale", [True, False])
def test_prescaled_norm_gives_the_eager_tokens(tmp_path, monkeypatch, prescale):
    """fp32: the PDL whole-step engine with gate/up reading o's rows prescaled by the norm
    weight and applying the rstd after its product (``runner.PRESCALE_NORM``, the default),
    and with the norm inside gate/up's K steps instead, == the eager engine, token for token."""
    from dlp.engine import runner

    monkeypatch.setattr(runner, "PRESCALE_NORM", prescale)
    model = tiny_model("qwen2").to("cuda")
    adapters = write_adapters(model, tmp_path, ["t0", "t1", "t2"])
    eager, fast, engine = _eager_and_pdl_step_tokens(model, adapters)
    assert engine.runner.model.decode_prescale_norm == prescale
    assert fast == eager


def test_graphs_kernel_and_staging_give_the_eager_tokens(tmp_path):
    """fp32: compiled + graphs + Triton attention == eager matmul attention, token for token,
    through prefill graphs (several buckets, LoRA scales staged) and decode graphs, with
    synchronous and with overlapped steps, and with the Triton decode GEMMs."""
    model = tiny_model("qwen2").to("cuda")
    adapters = write_adapters(model, tmp_path, ["t0", "t1", "t2"])
    outputs = {}
    for name, cfg in {
        "eager": dict(compile=False, cuda_graph=False, decode_attention="matmul"),
        "graphs": dict(compile=True, cuda_graph=True, decode_attention="triton"),
        "overlap": dict(
            compile=True,
            cuda_graph=True,
            decode_attention="triton",
            overlap_steps=True,
            overlap_queue_ahead=False,
        ),
        "gemm": dict(
            compile=True, cuda_graph=True, decode_attention="triton", decode_gemm="triton"
        ),
        "queue_ahead": dict(
            compile=True,
            cuda_graph=True,
            decode_attention="triton",
            overlap_steps=True,
            overlap_queue_ahead=True,
        ),
        "spare_rows": dict(
            compile=True,
            cuda_graph=True,
            decode_attention="triton",
            overlap_steps=True,
            spare_rows=4,
        ),
        # Rope and the cache write inside the attention kernel, also through the slot table
        # (cuBLAS named: on Hopper "auto" would take the PDL GEMMs with it, tested below).
        "rope": dict(
            compile=True, cuda_graph=True, decode_attention="triton_rope", decode_gemm="cublas"
        ),
        "rope_spare_rows": dict(
            compile=True,
            cuda_graph=True,
            decode_attention="triton_rope",
            decode_gemm="cublas",
            spare_rows=4,
        ),
        # Every kernel a programmatic dependent launch, per compiled layer and whole step.
        "pdl": dict(
            compile=True,
            cuda_graph=True,
            compile_scope="layer",
            decode_attention="triton_rope",
            decode_gemm="triton_pdl",
        ),
        "pdl_step": dict(
            compile=True,
            cuda_graph=True,
            compile_scope="step",
            decode_attention="triton_rope",
            decode_gemm="triton_pdl",
        ),
    }.items():
        outputs[name], engine = _engine_tokens(model, adapters, **cfg)
        if name != "eager":
            assert engine.runner.captured and engine.model.attn_splits >= 1
            assert engine.runner._prefill_graphs
            assert not engine.runner.compile_failed  # no silent fallback to the eager step
        if name.startswith("pdl"):
            assert engine.model.decode_pdl
        # Each entry runs the step it names ("auto"s resolved around the explicit settings).
        expected_scope = "step" if name == "pdl_step" else "layer"
        assert engine.runner.decode_path.compile_scope == expected_scope
    assert outputs["graphs"] == outputs["eager"]
    assert outputs["overlap"] == outputs["eager"]
    assert outputs["gemm"] == outputs["eager"]
    assert outputs["queue_ahead"] == outputs["eager"]
    assert outputs["spare_rows"] == outputs["eager"]
    assert outputs["rope"] == outputs["eager"]
    assert outputs["rope_spare_rows"] == outputs["eager"]
    assert outputs["pdl"] == outputs["eager"]
    assert outputs["pdl_step"] == outputs["eager"]
