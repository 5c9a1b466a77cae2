"""The fused multi-LoRA layer against PEFT (each adapter applied separately), the loop
reference, and the kernel-count promise."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lora_helpers import VOCAB, make_tiny_llama
from peft import PeftModel
from torch import nn
from torch.profiler import ProfilerActivity, profile

from dlp.errors import DlpError
from dlp.lora.adapter import (
    LoraAdapter,
    base_linear_shapes,
    load_adapter,
    random_adapter,
    save_adapter,
)
from dlp.lora.fused import FusedLoraLinear, LoraBatchContext, LoraContextHolder
from dlp.lora.fused_ops import lora_delta
from dlp.lora.inject import inject_fused_lora, remove_fused_lora
from dlp.lora.pool import AdapterPool
from dlp.lora.reference import inject_loop_lora, loop_lora_delta, remove_loop_lora
from dlp.routing.mix import AdapterMix

MIXES = [
    AdapterMix.from_weights({"a0": 1.0}),
    AdapterMix.from_weights({"a0": 0.5, "a1": 0.5}),
    AdapterMix.from_weights({"a1": 0.3, "a2": 0.7}),
    AdapterMix.base(),
    AdapterMix.from_weights({"a0": 0.2, "a2": 0.3, "a3": 0.5}),
    AdapterMix.from_weights({"a4": 0.6, "a1": 0.4}),
]


def build_adapters(shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> list[LoraAdapter]:
    """Different ranks, alphas, rsLoRA, per-module rank/alpha patterns and a q-only adapter."""
    a0 = random_adapter("a0", shapes, rank=8, alpha=16, seed=10, dtype=dtype, b_std=0.2)
    a1 = random_adapter(
        "a1", shapes, rank=4, alpha=8, seed=11, dtype=dtype, b_std=0.2, use_rslora=True
    )
    a2 = random_adapter("a2", shapes, rank=16, alpha=4, seed=12, dtype=dtype, b_std=0.2)
    a3 = random_adapter("a3", shapes, rank=8, alpha=8, seed=13, dtype=dtype, b_std=0.2)
    # rank_pattern/alpha_pattern: v_proj gets rank 2 and alpha 6 (its own scaling 3 vs 1).
    a3.rank_pattern, a3.alpha_pattern = {"v_proj": 2}, {"v_proj": 6.0}
    for module, (a, b) in list(a3.weights.items()):
        if module.endswith("v_proj"):
            a3.weights[module] = (a[:2].contiguous(), b[:, :2].contiguous())
    a4 = random_adapter(
        "a4", shapes, targets=("q_proj",), rank=2, alpha=3, seed=14, dtype=dtype, b_std=0.2
    )
    return [a0, a1, a2, a3, a4]


class Setup:
    def __init__(self, tmp: Path, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.model = make_tiny_llama(dtype=dtype)
        shapes = base_linear_shapes(self.model)
        self.pool = AdapterPool.for_model(self.model, n_slots=6, max_rank=16)
        self.peft: PeftModel | None = None
        self.adapters = {}
        for adapter in build_adapters(shapes, dtype):
            path = save_adapter(adapter, tmp / adapter.name, base_model_name="tiny")
            self.pool.register(adapter.name, path)
            # what the server sees (rank/alpha patterns resolved), for the loop reference
            self.adapters[adapter.name] = load_adapter(path, base_shapes=shapes)
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    copy.deepcopy(self.model), str(path), adapter_name=adapter.name
                ).eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=adapter.name)
        self.handle = inject_fused_lora(self.model, self.pool)

    def capture(self, run):
        """Run ``run()`` and return {module: [(input, output), ...]} of every fused layer."""
        records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        hooks = []
        for name, layer in self.handle.fused.items():

            def hook(module, args, output, name=name):
                records.setdefault(name, []).append((args[0].detach().clone(), output.clone()))

            hooks.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                run()
        finally:
            for h in hooks:
                h.remove()
        return records

    def peft_reference(self, module: str, x: torch.Tensor, mixes: list[AdapterMix]):
        """Per row: base + sum_i w_i (PEFT output with adapter i alone - base), in float64."""
        layer = self.peft.base_model.model.get_submodule(module)
        rows = []
        with torch.no_grad():
            for row, mix in enumerate(mixes):
                xr = x[row : row + 1]
                base = layer.base_layer(xr).double()
                total = base.clone()
                for name, weight in mix.entries:
                    self.peft.set_adapter(name)
                    total += weight * (layer(xr).double() - base)
                rows.append(total)
        return torch.cat(rows)


@pytest.fixture(scope="module")
def fp32_setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("fp32"), torch.float32)


@pytest.fixture(scope="module")
def bf16_setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


def prefill_and_decode(setup: Setup, mixes: list[AdapterMix], steps: int = 2):
    """Prefill a [rows, 7] prompt, then decode ``steps`` tokens with the KV cache, fused."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (len(mixes), 7), generator=generator)
    names = {n for m in mixes for n in m.names}
    lease = setup.pool.acquire_sync(names)
    context = setup.pool.batch_context(lease, mixes)

    def run():
        with setup.handle.use(context):
            out = setup.model(ids, use_cache=True)
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                out = setup.model(nxt, cache=out.cache, use_cache=True)

    try:
        return setup.capture(run)
    finally:
        setup.pool.release(lease)


def test_fp32_matches_peft_per_adapter_prefill_and_decode(fp32_setup):
    records = prefill_and_decode(fp32_setup, MIXES)
    assert len(records) == 4  # q_proj and v_proj of 2 layers
    shapes_seen = set()
    for module, calls in records.items():
        assert len(calls) == 3  # prefill + 2 decode steps
        for x, out in calls:
            shapes_seen.add(x.shape[1])
            ref = fp32_setup.peft_reference(module, x, MIXES)
            diff = (out.double() - ref).abs().max().item()
            assert diff <= 1e-5, (module, tuple(x.shape), diff)
            # the adapters really move the output (the test is not vacuous)
            base = fp32_setup.handle.originals[module](x).double()
            assert (ref - base).abs().max().item() > 1e-2
    assert shapes_seen == {7, 1}  # prefill [B, 7, in] and decode [B, 1, in]


def test_bf16_matches_peft_within_relative_tolerance(bf16_setup):
    records = prefill_and_decode(bf16_setup, MIXES, steps=1)
    for module, calls in records.items():
        for x, out in calls:
            assert out.dtype == torch.bfloat16
            ref = bf16_setup.peft_reference(module, x, MIXES)
            rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            assert rel <= 2e-2, (module, tuple(x.shape), rel)


def test_single_adapter_rows_match_peft_logits(fp32_setup):
    """Whole-model check: each row with one adapter gives PEFT's logits with that adapter."""
    mixes = [AdapterMix.single(n) for n in ("a0", "a1", "a2", "a3", "a4")] + [AdapterMix.base()]
    ids = torch.randint(0, VOCAB, (len(mixes), 6), generator=torch.Generator().manual_seed(1))
    setup = fp32_setup
    with setup.pool.acquire_sync({"a0", "a1", "a2", "a3", "a4"}) as lease, torch.no_grad():
        with setup.handle.use(setup.pool.batch_context(lease, mixes)):
            fused = setup.model(ids).logits
        for row, mix in enumerate(mixes):
            if mix.is_base:
                with setup.peft.disable_adapter():
                    ref = setup.peft(ids[row : row + 1]).logits
            else:
                setup.peft.set_adapter(mix.names[0])
                ref = setup.peft(ids[row : row + 1]).logits
            assert (fused[row] - ref[0]).abs().max().item() <= 1e-5, mix.key


def test_no_context_is_exactly_the_base_model(fp32_setup):
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = fp32_setup.model(ids).logits
        with fp32_setup.peft.disable_adapter():
            base = fp32_setup.peft(ids).logits
        empty = fp32_setup.pool.batch_context(None, [AdapterMix.base()] * 3)
        assert empty.is_empty
        with fp32_setup.handle.use(empty):
            fused_empty = fp32_setup.model(ids).logits
    assert torch.equal(fused, base)
    assert torch.equal(fused_empty, base)


def test_slot_path_equals_packed_path_and_loop_reference(fp32_setup):
    setup = fp32_setup
    names = {n for m in MIXES for n in m.names}
    x = torch.randn(len(MIXES), 3, 64, generator=torch.Generator().manual_seed(3))
    module = "model.layers.1.self_attn.v_proj"
    layer = setup.handle.fused[module]
    with setup.pool.acquire_sync(names) as lease, torch.no_grad():
        packed = setup.pool.batch_context(lease, MIXES)
        slot_level = replace(packed, col_index=None, col_scales=None)
        with setup.handle.use(packed):
            out_packed = layer(x)
        with setup.handle.use(slot_level):
            out_slots = layer(x)
        base = setup.handle.originals[module](x)
        loop = base + loop_lora_delta(x, module, setup.adapters, MIXES)
    assert packed.col_index.numel() < packed.slot_ids.numel() * setup.pool.max_rank
    assert (out_packed - out_slots).abs().max().item() <= 1e-6
    assert (out_packed - loop).abs().max().item() <= 1e-5


def test_lora_delta_per_token_scales_and_all_slots():
    """Per-token scale rows ([B*T, U]) and slot_ids=None behave as documented."""
    g = torch.Generator().manual_seed(4)
    slots, rank, d_in, d_out = 5, 4, 16, 12
    a = torch.randn(slots, rank, d_in, generator=g)
    b = torch.randn(slots, d_out, rank, generator=g)
    x = torch.randn(2, 3, d_in, generator=g)
    per_token = torch.rand(6, slots, generator=g)
    out = lora_delta(x, a, b, None, per_token)
    expected = torch.zeros(2, 3, d_out)
    for i in range(2):
        for t in range(3):
            for s in range(slots):
                expected[i, t] += per_token[i * 3 + t, s] * (b[s] @ (a[s] @ x[i, t]))
    assert (out - expected).abs().max().item() <= 1e-5
    ids = torch.tensor([3, 1])
    per_seq = torch.rand(2, 2, generator=g)
    out = lora_delta(x, a, b, ids, per_seq)
    expected = torch.stack(
        [
            sum(per_seq[i, j] * (x[i] @ a[s].t() @ b[s].t()) for j, s in enumerate([3, 1]))
            for i in range(2)
        ]
    )
    assert (out - expected).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="row scales have 4 rows"):
        lora_delta(x, a, b, ids, torch.rand(4, 2))


def test_loop_reference_model_matches_fused_model(fp32_setup):
    """The benchmark baseline computes the same function as the fused layers."""
    setup = fp32_setup
    ids = torch.randint(0, VOCAB, (len(MIXES), 5), generator=torch.Generator().manual_seed(5))
    names = {n for m in MIXES for n in m.names}
    with setup.pool.acquire_sync(names) as lease, torch.no_grad():
        context = setup.pool.batch_context(lease, MIXES)
        with setup.handle.use(context):
            fused = setup.model(ids).logits
    loop_model = make_tiny_llama()
    state = inject_loop_lora(loop_model, setup.adapters)
    state.set_mixes(MIXES)
    with torch.no_grad():
        loop = loop_model(ids).logits
    remove_loop_lora(loop_model, state)
    assert (fused - loop).abs().max().item() <= 1e-5


COMPUTE_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::index_select",
    "aten::mul",
    "aten::mul_",
    "aten::add",
    "aten::add_",
    "aten::copy_",
    "aten::repeat_interleave",
    "aten::cat",
    "aten::index",
    "aten::gather",
}


def count_ops(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def test_kernel_count_does_not_grow_with_distinct_mixes(tmp_path, tiny_shapes):
    model = make_tiny_llama()
    pool = AdapterPool.for_model(model, n_slots=8, max_rank=8)
    adapters = {}
    for i in range(8):
        adapter = random_adapter(f"k{i}", tiny_shapes, rank=8, alpha=16, seed=100 + i)
        pool.add(adapter)
        adapters[adapter.name] = adapter
    handle = inject_fused_lora(model, pool)
    layer = handle.fused["model.layers.0.self_attn.q_proj"]
    x = torch.randn(32, 1, 64)
    same = [AdapterMix.from_weights({"k0": 0.5, "k1": 0.25, "k2": 0.25})] * 32
    names = sorted(adapters)
    distinct = [
        AdapterMix.from_weights({names[i % 8]: 1 + i, names[(i + 3) % 8]: 2, names[(i + 5) % 8]: 1})
        for i in range(32)
    ]
    assert len({m.key for m in distinct}) == 32
    with pool.acquire_sync(names) as lease, torch.no_grad():
        counts = {}
        for label, mixes in (("one", same), ("distinct", distinct)):
            context = pool.batch_context(lease, mixes)
            with handle.use(context):
                layer(x)  # warm-up
                counts[label] = count_ops(lambda: layer(x))
        # The loop baseline on the same inputs grows with the number of mixes.
        loop_counts = {
            label: count_ops(
                lambda mixes=mixes: loop_lora_delta(x, layer.module_name, adapters, mixes)
            )
            for label, mixes in (("one", same), ("distinct", distinct))
        }
    assert counts["one"] == counts["distinct"]
    # base GEMM + 2 gathers + 2 LoRA GEMMs + scale mul + add: a handful of real kernels
    compute = {k: v for k, v in counts["one"].items() if k in COMPUTE_OPS}
    assert sum(compute.values()) <= 8, compute
    assert sum(loop_counts["distinct"].values()) > 10 * sum(loop_counts["one"].values())


def test_inject_and_remove_restore_the_module_tree(tiny_model, tiny_shapes):
    before = list(tiny_model.named_modules())
    ids_before = {name: id(m) for name, m in before}
    state_keys = list(tiny_model.state_dict())
    pool = AdapterPool(tiny_shapes, target_modules=("q_proj", "v_proj", "down_proj"), n_slots=2)
    handle = inject_fused_lora(tiny_model, pool)
    fused_names = sorted(n for n, m in tiny_model.named_modules() if isinstance(m, FusedLoraLinear))
    assert fused_names == sorted(pool.modules) and len(fused_names) == 6
    with pytest.raises(Exception, match="injected twice"):
        inject_fused_lora(tiny_model, pool)
    remove_fused_lora(tiny_model, handle)
    after = list(tiny_model.named_modules())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert {name: id(m) for name, m in after} == ids_before
    assert list(tiny_model.state_dict()) == state_keys
    assert not any(isinstance(m, FusedLoraLinear) for m in tiny_model.modules())
    # a subset of the pool's modules can be injected too
    handle = inject_fused_lora(tiny_model, pool, target_modules=["down_proj"])
    assert sorted(handle.fused) == [m for m in pool.modules if m.endswith("down_proj")]
    remove_fused_lora(tiny_model, handle)


def test_inject_refuses_a_pool_of_another_dtype(tiny_model, tiny_shapes):
    pool = AdapterPool(tiny_shapes, n_slots=1, dtype=torch.bfloat16)
    with pytest.raises(DlpError, match=r"float32 on cpu, the pool holds torch\.bfloat16"):
        inject_fused_lora(tiny_model, pool)
    assert not any(isinstance(m, FusedLoraLinear) for m in tiny_model.modules())


def test_fused_layer_rejects_stacks_of_the_wrong_shape():
    with pytest.raises(ValueError, match="do not fit"):
        FusedLoraLinear(
            nn.Linear(8, 4), torch.zeros(2, 4, 8), torch.zeros(2, 4, 5), LoraContextHolder()
        )


def test_context_holder_restores_previous_context():
    holder = LoraContextHolder()
    outer = LoraBatchContext(torch.tensor([0]), torch.ones(1, 1))
    inner = LoraBatchContext(torch.tensor([1]), torch.ones(1, 1))
    holder.set_context(outer)
    with holder.use(inner):
        assert holder.context is inner
    assert holder.context is outer
