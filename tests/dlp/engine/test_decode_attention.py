"""decode_attention: the Triton flash-decoding kernel against the plain-torch reference.

There is no GPU in CI, so the kernel runs under Triton's CPU interpreter. TRITON_INTERPRET=1
must be set before triton and the kernel module are imported, hence one child process runs
every kernel case (one interpreter start, ~5 s) and each test checks its case's numbers.
The CUDA tests at the end run only where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import run_interpreted

import dlp.engine.decode_attention as da
from dlp.engine import triton_support
from dlp.engine.decode_attention import decode_attention_reference, pick_splits

# name -> (dtype, b, B, n_heads, kvh, d, S, lengths, splits, strided). B > b everywhere (the
# kernel must ignore extra cache rows); lengths cover 1, S and non-multiples of BLOCK_N=64.
CASES = {
    "mha_f32": ("float32", 4, 6, 4, 4, 32, 200, [1, 200, 65, 130], 1, False),
    # Split ranges for these lengths: some splits lie wholly past the row's length.
    "mha_f32_split3": ("float32", 4, 6, 4, 4, 32, 200, [1, 200, 65, 130], 3, False),
    "gqa6_bf16": ("bfloat16", 3, 5, 12, 2, 64, 200, [200, 1, 129], 1, False),
    "gqa6_bf16_split4": ("bfloat16", 3, 5, 12, 2, 64, 200, [200, 1, 129], 4, False),
    # Cache laid out [B, S, kvh, d] and viewed as [B, kvh, S, d]; q a slice of a wider tensor.
    "gqa2_f32_strided_split16": ("float32", 3, 4, 8, 4, 32, 160, [160, 64, 3], 16, True),
    "gqa2_bf16_strided_split2": ("bfloat16", 3, 4, 8, 4, 32, 160, [97, 160, 2], 2, True),
    # Group 32 > 16: the padded group is a power of two above the tl.dot minimum.
    "group32_f32_split2": ("float32", 2, 3, 32, 1, 32, 70, [70, 5], 2, False),
    # Qwen2-like heads: group 6, head_dim 128.
    "qwen2_bf16_split2": ("bfloat16", 2, 2, 12, 2, 128, 96, [96, 33], 2, False),
    # A slot table (the engine's spare cache rows): row r reads cache row slots[r]; two rows
    # may read the same one, and the cache may have fewer rows than b.
    "slots_f32": ("float32", 4, 5, 4, 4, 32, 100, [1, 100, 65, 30], 1, False, [4, 2, 2, 0]),
    "slots_bf16_split2": ("bfloat16", 3, 2, 12, 2, 64, 200, [200, 1, 129], 2, False, [1, 0, 1]),
}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

_CHILD = """
    import torch

    from dlp.engine.decode_attention import decode_attention, decode_attention_reference

    def kernel_results(cases):
        results = {}
        for name, (dtype, b, B, h, kvh, d, S, lengths, splits, strided, *slots) in cases.items():
            torch.manual_seed(0)
            dt = getattr(torch, dtype)
            if strided:
                k = torch.randn(B, S, kvh, d).to(dt).transpose(1, 2)
                v = torch.randn(B, S, kvh, d).to(dt).transpose(1, 2)
                q = torch.randn(b, h, 2 * d).to(dt)[:, :, d:]
            else:
                k = torch.randn(B, kvh, S, d).to(dt)
                v = torch.randn(B, kvh, S, d).to(dt)
                q = torch.randn(b, h, d).to(dt)
            lens = torch.tensor(lengths, dtype=torch.int32 if strided else torch.int64)
            if slots:
                table = torch.tensor(slots[0])
                out = decode_attention(q, k, v, lens, d**-0.5, splits=splits, slots=table)
                # Independent of the slot code paths: the cache rows gathered by hand.
                ref = decode_attention_reference(q, k[table], v[table], lens, d**-0.5)
            else:
                out = decode_attention(q, k, v, lens, d**-0.5, splits=splits)
                ref = decode_attention_reference(q, k, v, lens, d**-0.5)
            results[name] = {
                "shape": list(out.shape),
                "dtype": str(out.dtype),
                "nan": bool(out.isnan().any()),
                "err": (out.float() - ref.float()).abs().max().item(),
            }
        return results
"""


@pytest.fixture(scope="module")
def interpreted():
    """Every kernel case of this module in one TRITON_INTERPRET=1 child (one interpreter
    start): part ("kernel", "rope", "step") -> case name -> its numbers."""
    pytest.importorskip("triton")
    script = _CHILD + _ROPE_CHILD + _STEP_CHILD + _ROWS_CHILD + _CHILD_MAIN
    cases = {"kernel": CASES, "rope": ROPE_CASES, "step": STEP_CASES, "rows": ROWS_CASES}
    return run_interpreted(script, cases)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(interpreted, name):
    dtype, b, _, h, _, d, *_ = CASES[name]
    res = interpreted["kernel"][name]
    assert res["shape"] == [b, h, d]
    assert res["dtype"] == f"torch.{dtype}"
    assert not res["nan"]
    assert res["err"] < TOL[dtype], res


# Rope fused in (decode_attention_rope): name -> (dtype, b, B, n_heads, kvh, d, S, lengths,
# splits, slots or None). q/k/v are slices of one wider qkv tensor, as the engine's GEMM gives.
ROPE_CASES = {
    "rope_f32": ("float32", 4, 6, 4, 4, 32, 200, [1, 200, 65, 130], 1, None),
    # The new key lands in different splits; some splits lie wholly past the row's length.
    "rope_f32_split3": ("float32", 4, 6, 4, 4, 32, 200, [1, 200, 65, 130], 3, None),
    "rope_gqa6_bf16_split2": ("bfloat16", 3, 5, 12, 2, 64, 200, [200, 2, 129], 2, None),
    "rope_slots_f32": ("float32", 3, 4, 8, 2, 32, 100, [100, 1, 64], 1, [3, 0, 2]),
    "rope_slots_bf16_split4": ("bfloat16", 3, 4, 8, 2, 32, 160, [97, 160, 1], 4, [1, 3, 0]),
    # q/k/v as the GEMM's split-K pieces (fp32), summed and rounded in the kernel.
    "rope_pieces3_bf16": ("bfloat16", 3, 5, 12, 2, 64, 200, [200, 2, 129], 1, None, 3),
    "rope_pieces4_slots_f32": ("float32", 3, 4, 8, 2, 32, 100, [100, 1, 64], 1, [3, 0, 2], 4),
}

_ROPE_CHILD = """
    import torch

    from dlp.engine.decode_attention import decode_attention_reference, decode_attention_rope
    from dlp.engine.model import apply_rope

    def rope_results(cases):
        results = {}
        for name, (dtype, b, B, h, kvh, d, S, lengths, splits, slots, *pieces) in cases.items():
            torch.manual_seed(0)
            dt = getattr(torch, dtype)
            if pieces:  # the kernel's input: fp32 pieces; the reference's: their rounded sum
                parts = torch.randn(pieces[0], b, (h + 2 * kvh) * d)
                if dt != torch.float32:
                    # Sums exact in the model dtype (sixteenths below 2): the interpreter's
                    # fp32 -> bf16 cast truncates where the GPU rounds, so test the sum only.
                    parts = torch.randint(-8, 9, parts.shape) / 16.0
                qkv = parts.sum(0).to(dt)
                q_in = parts[..., : h * d].view(-1, b, h, d)
                k_in = parts[..., h * d : (h + kvh) * d].view(-1, b, kvh, d)
                v_in = parts[..., (h + kvh) * d :].view(-1, b, kvh, d)
            qkv = qkv if pieces else torch.randn(b, (h + 2 * kvh) * d).to(dt)
            q = qkv[:, : h * d].view(b, h, d)
            k_new = qkv[:, h * d : (h + kvh) * d].view(b, kvh, d)
            v_new = qkv[:, (h + kvh) * d :].view(b, kvh, d)
            angles = torch.rand(b, d // 2) * 6.0
            cos = torch.cat([angles.cos()] * 2, -1).to(dt)
            sin = torch.cat([angles.sin()] * 2, -1).to(dt)
            k_cache = torch.randn(B, kvh, S, d).to(dt)
            v_cache = torch.randn(B, kvh, S, d).to(dt)
            lens = torch.tensor(lengths)
            table = torch.tensor(slots) if slots else torch.arange(b)
            # The reference: rope in fp32 rounded once (the compiled step's pointwise), the cache
            # written by indexing, then the plain-torch attention over the gathered rows.
            c, s_ = cos.float()[:, None, None, :], sin.float()[:, None, None, :]
            q_ref = apply_rope(q.float()[:, :, None], c, s_)[:, :, 0].to(dt)
            k_ref = apply_rope(k_new.float()[:, :, None], c, s_)[:, :, 0].to(dt)
            k_exp, v_exp = k_cache.clone(), v_cache.clone()
            k_exp[table, :, lens - 1] = k_ref
            v_exp[table, :, lens - 1] = v_new
            ref = decode_attention_reference(q_ref, k_exp[table], v_exp[table], lens, d**-0.5)
            inputs = (q_in, k_in, v_in) if pieces else (q, k_new, v_new)
            out = decode_attention_rope(
                *inputs, cos, sin, k_cache, v_cache, lens, d**-0.5, splits=splits,
                slots=torch.tensor(slots) if slots else None,
            )
            results[name] = {
                "shape": list(out.shape),
                "dtype": str(out.dtype),
                "nan": bool(out.isnan().any()),
                "err": (out.float() - ref.float()).abs().max().item(),
                "k_cache_err": (k_cache.float() - k_exp.float()).abs().max().item(),
                "v_cache_err": (v_cache.float() - v_exp.float()).abs().max().item(),
            }
        return results
"""


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_kernel_writes_the_cache_and_matches_reference(interpreted, name):
    """Rope on q and k, this token's k/v written into the row's cache row at its position
    (and nothing else written), attention over the row's keys up to it."""
    dtype, b, _, h, _, d, *_ = ROPE_CASES[name]
    res = interpreted["rope"][name]
    assert res["shape"] == [b, h, d] and not res["nan"]
    assert res["dtype"] == f"torch.{dtype}"  # the cache dtype, also from fp32 pieces
    assert res["err"] < TOL[dtype], res
    # The rotated key is rounded to the cache dtype once, as the reference's: exact in fp32;
    # in bf16 within one rounding step (the interpreter's fp32 -> bf16 cast may truncate).
    assert res["v_cache_err"] == 0.0, res
    assert res["k_cache_err"] <= (0.0 if dtype == "float32" else TOL[dtype]), res


_STEP_CHILD = """
    import torch

    MODES = ("matmul", "kernel", "kernel_rope", "kernel_rope_gemm", "kernel_rope_gemm_pdl")

    from dlp.engine.model import CompactLM
    from engine_helpers import tiny_model

    def step_results(cases):
        results = {}
        for name, (kind, spare, slots) in cases.items():
            logits, caches = {}, {}
            for mode in MODES:
                # Same random weights and the same random (filled) caches for every mode.
                model = CompactLM(tiny_model(kind), max_batch=3, max_seq=96, spare_rows=spare)
                torch.manual_seed(1)
                for kc, vc in zip(model.k_caches, model.v_caches):
                    kc.copy_(torch.randn_like(kc))
                    vc.copy_(torch.randn_like(vc))
                model.attn_splits = 0 if mode == "matmul" else 1 if "gemm" in mode else 2
                model.attn_rope = mode.startswith("kernel_rope")
                # Weight-streaming GEMMs: q/k/v reach the kernel as their split-K pieces;
                # with pdl through the ops the compiled step uses (plain launches here).
                model.decode_gemm = "gemm" in mode
                model.decode_pdl = mode == "kernel_rope_gemm_pdl"
                tokens = torch.tensor([5, 17, 200])
                positions = torch.tensor([0, 40, 95])
                table = torch.tensor(slots) if slots else None
                with torch.no_grad():
                    logits[mode] = model.decode(tokens, positions, None, slots=table)
                pairs = zip(model.k_caches, model.v_caches)
                caches[mode] = torch.stack([torch.stack([k, v]) for k, v in pairs])
            base = logits["matmul"]
            results[name] = {
                mode: {
                    "err": (logits[mode] - base).abs().max().item(),
                    "argmax_same": bool((logits[mode].argmax(-1) == base.argmax(-1)).all()),
                    "cache_err": (caches[mode] - caches["matmul"]).abs().max().item(),
                }
                for mode in MODES[1:]
            }
        return results
"""
_ROWS_CHILD = """
    from dlp.engine.decode_attention import rope_rows

    def rows_results(cases):
        results = {}
        for name, (s, d, dtype, positions) in cases.items():
            torch.manual_seed(2)
            cos_t = torch.randn(s, d).to(getattr(torch, dtype))
            sin_t = torch.randn(s, d).to(getattr(torch, dtype))
            pos = torch.tensor(positions[0], dtype=getattr(torch, positions[1]))
            cos, sin, lengths = rope_rows(cos_t, sin_t, pos)
            results[name] = {
                "cos_same": torch.equal(cos, cos_t[pos]),
                "sin_same": torch.equal(sin, sin_t[pos]),
                "lengths": lengths.tolist(),
                "lengths_dtype": str(lengths.dtype),
                "shapes": [list(cos.shape), list(sin.shape)],
            }
        return results
"""
_CHILD_MAIN = """
    parts = {
        "kernel": kernel_results, "rope": rope_results, "step": step_results, "rows": rows_results
    }
    print(json.dumps({part: parts[part](cases) for part, cases in json.loads(sys.argv[1]).items()}))
"""
# name -> (model kind, spare cache rows, slot table or None)
STEP_CASES = {
    "qwen2": ("qwen2", 0, None),
    "llama": ("llama", 0, None),  # llama3 rope scaling: cos/sin from HF's own tables
    "llama_slots": ("llama", 2, [4, 0, 2]),
}


# name -> (table rows, head dim, dtype, (positions, their dtype))
ROWS_CASES = {
    "bf16_d128": (96, 128, "bfloat16", ([0, 40, 95, 40], "int64")),
    "f32_d24_int32": (10, 24, "float32", ([9, 0, 3], "int32")),  # d padded to 32 in the kernel
}


@pytest.mark.parametrize("name", list(ROWS_CASES))
def test_rope_rows_are_the_table_rows_and_lengths(interpreted, name):
    """The rope attention's per-row inputs (one kernel behind the dlp::rope_rows op): each
    row's cos/sin table row at its position, and position + 1 in the positions' dtype."""
    _, d, _, (positions, pos_dtype) = ROWS_CASES[name]
    res = interpreted["rows"][name]
    assert res["cos_same"] and res["sin_same"], res
    assert res["lengths"] == [p + 1 for p in positions], res
    assert res["lengths_dtype"] == f"torch.{pos_dtype}"
    assert res["shapes"] == [[len(positions), d]] * 2


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_decode_step_with_rope_in_the_kernel_matches_eager(interpreted, name):
    """The model's decode step (fp32) with the attention kernel, and with rope and the cache
    write in it, against the eager matmul attention: same logits, same caches after (up to
    fp32 rounding: a layer's K/V follow from the layer before's attention)."""
    for mode, res in interpreted["step"][name].items():
        assert res["err"] < 1e-4 and res["argmax_same"], (mode, res)
        assert res["cache_err"] < 1e-4, (mode, res)


def _eager_attention(q, k_cache, v_cache, lengths, scale):
    """The engine's eager decode attention (model.decode_layer), with its additive mask."""
    b, n_heads, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache = k_cache[:b], v_cache[:b]
    positions = lengths - 1
    visible = torch.arange(s)[None, :] <= positions[:, None]
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[:, None, None, :]
    qg = q.reshape(b, kvh, n_heads // kvh, d)
    att = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scale + bias
    att = torch.softmax(att, dim=-1).to(v_cache.dtype)
    return torch.matmul(att, v_cache).reshape(b, n_heads, d)


def test_reference_reads_the_slot_table():
    torch.manual_seed(2)
    q = torch.randn(3, 4, 16)
    k, v = torch.randn(5, 2, 10, 16), torch.randn(5, 2, 10, 16)
    lengths = torch.tensor([10, 3, 7])
    slots = torch.tensor([4, 4, 1])
    out = decode_attention_reference(q, k, v, lengths, 0.25, slots=slots)
    gathered = decode_attention_reference(q, k[slots], v[slots], lengths, 0.25)
    torch.testing.assert_close(out, gathered)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(("n_heads", "kvh"), [(4, 4), (12, 2)])
def test_reference_matches_eager_formula(dtype, tol, n_heads, kvh):
    torch.manual_seed(1)
    b, big_b, s, d = 4, 6, 100, 32
    q = torch.randn(b, n_heads, d).to(dtype)
    k = torch.randn(big_b, kvh, s, d).to(dtype)
    v = torch.randn(big_b, kvh, s, d).to(dtype)
    lengths = torch.tensor([1, 100, 37, 64])
    ref = decode_attention_reference(q, k, v, lengths, d**-0.5)
    eager = _eager_attention(q, k, v, lengths, d**-0.5)
    assert ref.dtype == dtype and ref.shape == (b, n_heads, d)
    torch.testing.assert_close(ref.float(), eager.float(), atol=tol, rtol=tol)
    # Length 1 attends only key 0, so the output is exactly v[0] of that row.
    first = v[0, :, 0].repeat_interleave(n_heads // kvh, 0)
    torch.testing.assert_close(ref[0].float(), first.float())


@pytest.mark.parametrize(
    ("max_seq", "splits"),
    [(1, 1), (256, 1), (512, 1), (513, 3), (768, 3), (1024, 4), (2048, 8), (4096, 16), (32768, 16)],
)
def test_pick_splits(max_seq, splits):
    assert pick_splits(max_seq) == splits


def test_pick_splits_stops_splitting_once_rows_fill_the_gpu():
    assert pick_splits(4096, rows=8, kv_heads=1) == 16
    assert pick_splits(4096, rows=8, kv_heads=2) == 8
    assert pick_splits(2048, rows=64, kv_heads=2) == 1  # 128 programs already
    assert pick_splits(2048, rows=64, kv_heads=8) == 1
    assert pick_splits(256, rows=1, kv_heads=1) == 1  # short caches never split


def test_pick_splits_bounds_split_size():
    for max_seq in range(513, 4097, 37):
        n = pick_splits(max_seq)
        assert 2 <= n <= 16 and -(-max_seq // n) <= 256


def test_without_triton_raises_clearly(monkeypatch):
    monkeypatch.setattr(da, "triton", None)
    monkeypatch.setattr(triton_support, "triton", None)
    assert not da.triton_available()
    q = torch.zeros(1, 2, 32)
    cache = torch.zeros(1, 2, 8, 32)
    with pytest.raises(RuntimeError, match="needs triton"):
        da.decode_attention(q, cache, cache, torch.ones(1, dtype=torch.long), 1.0)


def test_rejects_bad_shapes():
    pytest.importorskip("triton")
    q = torch.zeros(2, 6, 32)
    cache = torch.zeros(2, 4, 8, 32)
    lengths = torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple"):
        da.decode_attention(q, cache, cache, lengths, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        da.decode_attention(torch.zeros(2, 4, 24), *[torch.zeros(2, 4, 8, 24)] * 2, lengths, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        da.decode_attention(torch.zeros(3, 4, 32), cache, cache, torch.ones(3), 1.0)


# --- real GPU (skipped in CI) -------------------------------------------------------------

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and da.triton_available()), reason="needs CUDA and triton"
)


def _cuda_inputs(dtype=torch.bfloat16, b=8, big_b=10, n_heads=12, kvh=2, d=128, s=2048):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, n_heads, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(big_b, kvh, s, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(big_b, kvh, s, d, device="cuda", generator=g).to(dtype)
    lengths = torch.randint(1, s + 1, (b,), device="cuda", generator=g)
    lengths[0], lengths[1] = 1, s
    return q, k, v, lengths


@cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("splits", [1, 3, 8, 16])
def test_cuda_matches_reference(d, splits):
    q, k, v, lengths = _cuda_inputs(d=d)
    out = da.decode_attention(q, k, v, lengths, d**-0.5, splits=splits)
    ref = decode_attention_reference(q, k, v, lengths, d**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    q, k, v, lengths = _cuda_inputs(torch.float32, d=d, s=300)
    out = da.decode_attention(q, k, v, lengths, d**-0.5, splits=splits)
    ref = decode_attention_reference(q, k, v, lengths, d**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@cuda
def test_cuda_compile_fullgraph_and_graph_capture():
    q, k, v, lengths = _cuda_inputs()
    splits = pick_splits(k.shape[2])

    @torch.compile(fullgraph=True)
    def step(q, k, v, lengths):
        return da.decode_attention(q, k, v, lengths, 128**-0.5, splits=splits) * 2

    ref = decode_attention_reference(q, k, v, lengths, 128**-0.5) * 2
    torch.testing.assert_close(step(q, k, v, lengths), ref, atol=4e-2, rtol=2e-2)

    static_lengths = lengths.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(q, k, v, static_lengths)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(q, k, v, static_lengths)
    static_lengths.copy_(torch.flip(lengths, [0]))  # new lengths, same graph
    graph.replay()
    ref = decode_attention_reference(q, k, v, static_lengths, 128**-0.5) * 2
    torch.testing.assert_close(static_out, ref, atol=4e-2, rtol=2e-2)


@cuda
def test_cuda_rope_kernel_compiled_writes_the_cache():
    """decode_attention_rope under torch.compile(fullgraph): the output, and the cache written
    in place (what the compiled decode step relies on)."""
    from dlp.engine.model import apply_rope

    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, kvh, d, s, dt = 8, 12, 2, 128, 1024, torch.bfloat16
    qkv = torch.randn(b, (h + 2 * kvh) * d, device="cuda", generator=g).to(dt)
    q = qkv[:, : h * d].view(b, h, d)
    k_new = qkv[:, h * d : (h + kvh) * d].view(b, kvh, d)
    v_new = qkv[:, (h + kvh) * d :].view(b, kvh, d)
    angles = torch.rand(b, d // 2, device="cuda", generator=g) * 6.0
    cos = torch.cat([angles.cos()] * 2, -1).to(dt)
    sin = torch.cat([angles.sin()] * 2, -1).to(dt)
    k_cache = torch.randn(b + 2, kvh, s, d, device="cuda", generator=g).to(dt)
    v_cache = torch.randn(b + 2, kvh, s, d, device="cuda", generator=g).to(dt)
    lengths = torch.randint(1, s + 1, (b,), device="cuda", generator=g)
    lengths[0], lengths[1] = 1, s
    rows = torch.arange(b, device="cuda")
    c, sn = cos.float()[:, None, None, :], sin.float()[:, None, None, :]
    q_ref = apply_rope(q.float()[:, :, None], c, sn)[:, :, 0].to(dt)
    k_ref = apply_rope(k_new.float()[:, :, None], c, sn)[:, :, 0].to(dt)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    k_exp[rows, :, lengths - 1] = k_ref
    v_exp[rows, :, lengths - 1] = v_new
    ref = decode_attention_reference(q_ref, k_exp, v_exp, lengths, d**-0.5) * 2
    splits = pick_splits(s, b, kvh)

    @torch.compile(fullgraph=True)
    def step(q, k_new, v_new, cos, sin, k_cache, v_cache, lengths):
        out = da.decode_attention_rope(
            q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, d**-0.5, splits=splits
        )
        return out * 2

    out = step(q, k_new, v_new, cos, sin, k_cache, v_cache, lengths)
    torch.testing.assert_close(out, ref, atol=4e-2, rtol=2e-2)
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0)
    torch.testing.assert_close(k_cache.float(), k_exp.float(), atol=2e-2, rtol=1e-2)
