"""CompactLM (the engine's own forward) against the transformers forward and PEFT."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import TINY_VOCAB, tiny_model, write_adapters
from peft import PeftModel

from dlp.engine.model import CompactLM
from dlp.errors import DlpError
from dlp.lora.pool import AdapterPool
from dlp.routing.mix import AdapterMix


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_and_decode_match_transformers(kind):
    model = tiny_model(kind)
    lm = CompactLM(model, max_batch=4, max_seq=32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_VOCAB, (3, 10), generator=gen)
    lengths = torch.tensor([10, 7, 3])
    rows = torch.tensor([0, 3, 1])  # rows out of order, one row left free
    with torch.no_grad():
        logits = lm.prefill(ids, lengths, rows, None)
        for i in range(3):
            ref = model(ids[i : i + 1, : lengths[i]]).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)
        # Two decode steps with rows at different lengths in one batch.
        seqs = [ids[i, : lengths[i]].tolist() for i in range(3)]
        for _ in range(2):
            tokens = torch.zeros(4, dtype=torch.long)
            positions = torch.zeros(4, dtype=torch.long)
            new = torch.randint(0, TINY_VOCAB, (3,), generator=gen)
            for i, r in enumerate(rows.tolist()):
                tokens[r] = new[i]
                positions[r] = len(seqs[i])
                seqs[i].append(int(new[i]))
            out = lm.decode(tokens, positions, None)
            for i, r in enumerate(rows.tolist()):
                ref = model(torch.tensor([seqs[i]])).logits[0, -1]
                torch.testing.assert_close(out[r], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "targets",
    [("q_proj", "v_proj", "down_proj"), ("k_proj", "o_proj", "gate_proj", "up_proj")],
)
def test_lora_rows_match_peft(tmp_path, targets):
    """One batch, three rows: base, one adapter, a weighted mix (PEFT 'cat' is exact).
    q/k/v go through the merged decode weights, the others through lora_delta."""
    model = tiny_model("qwen2")
    paths = write_adapters(model, tmp_path, ["a", "b"], targets=targets)
    pool = AdapterPool.for_model(model, n_slots=3, max_rank=8, target_modules=targets)
    for name, path in paths.items():
        pool.register(name, path)
    lease = pool.acquire_sync(["a", "b"])
    lora = {m: (pool.a_stack(m), pool.b_stack(m)) for m in pool.modules}
    lm = CompactLM(model, max_batch=3, max_seq=16, lora=lora)
    mixes = [AdapterMix.base(), AdapterMix.single("a"), AdapterMix.from_weights({"a": 3, "b": 1})]
    scales = pool.row_scales(lease, mixes, slot_ids=list(range(pool.n_slots)))
    ids = torch.randint(0, TINY_VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = lm.prefill(ids, torch.tensor([6, 6, 6]), torch.arange(3), scales)
        step = lm.decode(torch.tensor([5, 6, 7]), torch.tensor([6, 6, 6]), scales)
    peft = PeftModel.from_pretrained(model, paths["a"], adapter_name="a")
    peft.load_adapter(paths["b"], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.75, 0.25], "ab", combination_type="cat")
    with torch.no_grad():
        for row, mix in enumerate(mixes):
            full = torch.cat([ids[row], torch.tensor([5 + row])])[None]
            if mix.is_base:
                with peft.disable_adapter():
                    ref = peft(full).logits[0]
            else:
                peft.set_adapter("a" if len(mix) == 1 else "ab")
                ref = peft(full).logits[0]
            torch.testing.assert_close(ours[row], ref[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[row], ref[-1], atol=1e-5, rtol=1e-5)
    lease.release()


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(DlpError, match="model_type 'gpt2'"):
        CompactLM(model, max_batch=1, max_seq=8)


@pytest.mark.parametrize("stacked", [True, False], ids=["bt_all", "per_layer"])
def test_refresh_slots_copies_the_slot_and_nothing_else(tmp_path, stacked):
    """After a load into a slot, refresh_slots([slot]) makes every layer's merged A rows and
    B block of that slot the pool's, and leaves the other slots' as they were; through the
    one-tensor bt of all layers (stack + one copy per target) and through per-layer copies."""
    model = tiny_model("qwen2")
    paths = write_adapters(model, tmp_path, ["a", "b"])
    pool = AdapterPool.for_model(model, n_slots=3, max_rank=8)
    for name, path in paths.items():
        pool.register(name, path)
    lora = {m: (pool.a_stack(m), pool.b_stack(m)) for m in pool.modules}
    lm = CompactLM(model, max_batch=2, max_seq=16, lora=lora)
    assert lm._bt_all is not None and lm.fused[1].bt.data_ptr() != lm.fused[0].bt.data_ptr()
    if not stacked:
        lm._bt_all = None  # the fallback for layers whose bt shapes differ
    with pool.acquire_sync(["a"]) as first:
        lm.refresh_slots([first.slot_of("a")])
    before = [(f.w_in.clone(), f.bt.clone()) for f in lm.fused]
    with pool.acquire_sync(["b"]) as lease:
        slot = lease.slot_of("b")
        lm.refresh_slots([slot])
    n_slots, rank = 3, 8
    for i, (fused, w) in enumerate(zip(lm.fused, lm.layers, strict=True)):
        prefix = w["attn_prefix"]
        for t, index in enumerate(fused.targets):
            name = ("q_proj", "k_proj", "v_proj")[index]
            a, b = lora[f"{prefix}.{name}"]  # [S, R, in], [S, out, R]
            start = fused.qkv + (t * n_slots + slot) * rank
            torch.testing.assert_close(fused.w_in[start : start + rank], a[slot], rtol=0, atol=0)
            col = sum(fused.qkv_sizes[:index])
            rows = slice((t * n_slots + slot) * rank, (t * n_slots + slot + 1) * rank)
            block = fused.bt[rows, col : col + fused.qkv_sizes[index]]
            torch.testing.assert_close(block, b[slot].t(), rtol=0, atol=0)
        # Everything outside this slot's rows is as it was.
        w_in, bt = before[i]
        changed_w = (fused.w_in != w_in).any(dim=1).nonzero().flatten().tolist()
        changed_b = (fused.bt != bt).any(dim=1).nonzero().flatten().tolist()
        allowed = {
            (t * n_slots + slot) * rank + r for t in range(len(fused.targets)) for r in range(rank)
        }
        assert set(changed_b) <= allowed and changed_b
        assert {r - fused.qkv for r in changed_w} <= allowed and changed_w
