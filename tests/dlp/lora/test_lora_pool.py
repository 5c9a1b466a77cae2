"""AdapterPool: slots, LRU, pinning, budgets, counters, concurrency, splitting, catalogue."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch
from lora_helpers import VOCAB, make_tiny_llama

from dlp.errors import AdapterValidationError, DlpError, InvalidMixError
from dlp.lora.adapter import LoraAdapter, random_adapter, save_adapter
from dlp.lora.inject import inject_fused_lora
from dlp.lora.pool import (
    AdapterInUseError,
    AdapterPool,
    PoolBusyError,
    PoolCapacityError,
    UnknownAdapterError,
    plan_batches,
)
from dlp.lora.reference import loop_lora_delta
from dlp.routing.mix import AdapterMix

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def make_pool(shapes, n_slots=3, **kwargs) -> AdapterPool:
    kwargs.setdefault("max_rank", 16)
    return AdapterPool(shapes, n_slots=n_slots, **kwargs)


def assert_slot_holds(pool: AdapterPool, slot: int, adapter: LoraAdapter) -> None:
    """The slot holds exactly the adapter's A and B (zero-padded), and nothing else."""
    for module in pool.modules:
        a_slot, b_slot = pool.a_stack(module)[slot], pool.b_stack(module)[slot]
        if module not in adapter.weights:
            assert not a_slot.any() and not b_slot.any(), module
            continue
        a, b = adapter.weights[module]
        r = a.shape[0]
        ratio = adapter.scaling_of(module) / adapter.scaling
        assert torch.equal(a_slot[:r], a)
        assert torch.allclose(b_slot[:, :r], b * ratio)
        assert not a_slot[r:].any() and not b_slot[:, r:].any()


@pytest.fixture
def adapters(tiny_shapes) -> dict[str, LoraAdapter]:
    return {
        f"ad{i}": random_adapter(f"ad{i}", tiny_shapes, rank=(4, 8, 16)[i % 3], seed=i)
        for i in range(6)
    }


def test_lru_eviction_order_and_slot_contents(tiny_shapes, adapters):
    pool = make_pool(tiny_shapes, n_slots=3)
    for name in ("ad0", "ad1", "ad2", "ad3"):
        pool.add(adapters[name])
    for name in ("ad0", "ad1", "ad2"):
        pool.release(pool.acquire_sync([name]))
    assert pool.resident() == ["ad0", "ad1", "ad2"]
    pool.release(pool.acquire_sync(["ad0"]))  # hit: ad0 becomes most recent
    assert pool.resident() == ["ad1", "ad2", "ad0"]
    assert pool.stats()["evictions"] == 0
    with pool.acquire_sync(["ad3"]) as lease:  # evicts ad1, the least recently used
        assert pool.resident() == ["ad2", "ad0", "ad3"]
        assert_slot_holds(pool, lease.slot_of("ad3"), adapters["ad3"])
    stats = pool.stats()
    assert (stats["loads"], stats["hits"], stats["evictions"]) == (4, 1, 1)
    assert stats["bytes_loaded"] == sum(adapters[n].nbytes for n in ("ad0", "ad1", "ad2", "ad3"))
    assert stats["pinned"] == [] and stats["free_slots"] == 0


def test_pinned_adapters_are_never_evicted(tiny_shapes, adapters):
    pool = make_pool(tiny_shapes, n_slots=2)
    for adapter in adapters.values():
        pool.add(adapter)
    running = pool.acquire_sync(["ad0", "ad1"])
    with pytest.raises(PoolBusyError) as info:
        pool.acquire_sync(["ad2"], wait=False)
    assert info.value.max_fit == 0
    with pytest.raises(PoolBusyError):
        pool.acquire_sync(["ad2"], timeout=0.05)
    assert pool.resident() == ["ad0", "ad1"]
    with pool.acquire_sync(["ad1"]) as shared:  # already resident + pinned: shares the slot
        assert shared.slot_of("ad1") == running.slot_of("ad1")
    assert_slot_holds(pool, running.slot_of("ad0"), adapters["ad0"])
    pool.release(running)
    pool.release(running)  # idempotent
    with pool.acquire_sync(["ad2", "ad1"]) as lease:
        assert pool.resident() == ["ad1", "ad2"]  # ad0 (LRU, unpinned) was evicted
        assert_slot_holds(pool, lease.slot_of("ad2"), adapters["ad2"])


def test_slot_reuse_clears_what_the_previous_adapter_left(tiny_shapes):
    pool = make_pool(tiny_shapes, n_slots=1)
    big = random_adapter("big", tiny_shapes, rank=16, seed=1)
    small = random_adapter("small", tiny_shapes, targets=("q_proj",), rank=2, seed=2)
    pool.add(big)
    pool.add(small)
    pool.release(pool.acquire_sync(["big"]))
    with pool.acquire_sync(["small"]) as lease:
        assert_slot_holds(pool, lease.slot_of("small"), small)
    with pool.acquire_sync(["big"]) as lease:
        assert_slot_holds(pool, lease.slot_of("big"), big)


def test_byte_budgets(tiny_shapes, adapters, tmp_path):
    element = 4
    slot_bytes = sum(
        8 * (i + o) * element
        for m, (i, o) in tiny_shapes.items()
        if m.endswith(("q_proj", "v_proj"))
    )
    pool = AdapterPool(tiny_shapes, max_rank=8, device_budget_bytes=int(2.5 * slot_bytes))
    assert pool.slot_bytes == slot_bytes
    assert pool.n_slots == 2 and pool.device_bytes == 2 * slot_bytes
    assert pool.a_stack(Q0).shape == (2, 8, 64)
    assert pool.b_stack(V1).shape == (2, 32, 8)
    with pytest.raises(DlpError, match="no adapter slot"):
        AdapterPool(tiny_shapes, max_rank=8, device_budget_bytes=slot_bytes - 1)
    # host tier: room for two rank-8 adapters, not three
    same_rank = [random_adapter(f"h{i}", tiny_shapes, rank=8, seed=i) for i in range(3)]
    host_pool = AdapterPool(
        tiny_shapes, max_rank=8, n_slots=1, host_budget_bytes=2 * same_rank[0].nbytes
    )
    for adapter in same_rank:
        host_pool.register(
            adapter.name, save_adapter(adapter, tmp_path / adapter.name), validate=False
        )
    for adapter in same_rank:
        host_pool.release(host_pool.acquire_sync([adapter.name]))
    stats = host_pool.stats()
    assert stats["host_resident"] == ["h1", "h2"]
    assert stats["host_bytes"] == 2 * same_rank[0].nbytes <= stats["host_budget_bytes"]
    assert (stats["host_loads"], stats["host_evictions"]) == (3, 1)
    with host_pool.acquire_sync(["h0"]) as lease:  # gone from both tiers: read from disk again
        assert_slot_holds(host_pool, lease.slot_of("h0"), same_rank[0])
    assert host_pool.stats()["host_loads"] == 4
    host_pool.release(host_pool.acquire_sync(["h2"]))  # device miss, host hit
    assert host_pool.stats()["host_loads"] == 4


async def test_concurrent_async_acquirers(tiny_shapes, tmp_path):
    adapters = {
        f"c{i}": random_adapter(f"c{i}", tiny_shapes, rank=(2, 8)[i % 2], seed=50 + i)
        for i in range(8)
    }
    pool = make_pool(tiny_shapes, n_slots=4, max_rank=8)
    for name, adapter in adapters.items():  # lazily loaded: disk reads race on first use
        pool.register(name, save_adapter(adapter, tmp_path / name), validate=False)
    rng = random.Random(0)
    requests = [rng.sample(sorted(adapters), rng.randint(1, 3)) for _ in range(60)]
    holders: list[int] = []
    max_parallel = 0

    async def worker(names: list[str]) -> None:
        nonlocal max_parallel
        async with await pool.acquire(names) as lease:
            holders.append(1)
            max_parallel = max(max_parallel, len(holders))
            slots = [lease.slot_of(n) for n in names]
            assert len(set(slots)) == len(slots)
            await asyncio.sleep(rng.random() * 0.003)
            for name in names:  # nobody evicted our pinned adapters meanwhile
                assert_slot_holds(pool, lease.slot_of(name), adapters[name])
            holders.pop()

    await asyncio.gather(*(worker(names) for names in requests))
    stats = pool.stats()
    assert stats["pinned"] == []
    assert stats["hits"] + stats["loads"] == sum(len(r) for r in requests)
    assert stats["host_loads"] == 8  # each adapter read from disk once despite the races
    assert stats["evictions"] == stats["loads"] - 4
    assert max_parallel > 1


async def test_async_acquire_waits_for_release(tiny_shapes, adapters):
    pool = make_pool(tiny_shapes, n_slots=1)
    pool.add(adapters["ad0"])
    pool.add(adapters["ad1"])
    first = await pool.acquire(["ad0"])
    waiting = asyncio.create_task(pool.acquire(["ad1"]))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    with pytest.raises(PoolBusyError):
        await pool.acquire(["ad1"], timeout=0.01)
    pool.release(first)
    second = await asyncio.wait_for(waiting, 1)
    assert second.slot_of("ad1") == 0 and pool.stats()["waits"] >= 1
    pool.release(second)


def test_sync_acquire_waits_for_release_from_another_thread(tiny_shapes, adapters):
    pool = make_pool(tiny_shapes, n_slots=1)
    pool.add(adapters["ad0"])
    pool.add(adapters["ad1"])
    first = pool.acquire_sync(["ad0"])
    threading.Timer(0.05, first.release).start()
    start = time.monotonic()
    with pool.acquire_sync(["ad1"], timeout=5) as lease:
        assert time.monotonic() - start >= 0.04
        assert lease.slot_of("ad1") == 0


def test_too_many_adapters_raise_capacity_error_and_split_runs(tiny_shapes, adapters):
    model = make_tiny_llama()
    pool = AdapterPool.for_model(model, n_slots=3, max_rank=16)
    for adapter in adapters.values():
        pool.add(adapter)
    with pytest.raises(PoolCapacityError) as info:
        pool.acquire_sync(list(adapters))
    assert (info.value.requested, info.value.max_fit) == (6, 3)
    assert not isinstance(info.value, PoolBusyError)
    assert pool.stats()["pinned"] == [] and pool.stats()["loads"] == 0

    mixes = [
        AdapterMix.from_weights({"ad0": 0.7, "ad1": 0.3}),
        AdapterMix.from_weights({"ad2": 0.5, "ad3": 0.5}),
        AdapterMix.from_weights({"ad4": 1.0}),
        AdapterMix.from_weights({"ad5": 0.6, "ad0": 0.4}),
        AdapterMix.base(),
        AdapterMix.from_weights({"ad1": 0.2, "ad2": 0.2, "ad3": 0.6}),
    ]
    groups = plan_batches(mixes, pool.n_slots)
    assert sorted(r for g in groups for r in g) == list(range(len(mixes)))
    for group in groups:
        assert len({n for r in group for n in mixes[r].names}) <= 3
        assert group == sorted(group)
    handle = inject_fused_lora(model, pool)
    ids = torch.randint(0, VOCAB, (len(mixes), 4), generator=torch.Generator().manual_seed(0))
    layer = handle.fused[Q0]
    x = torch.randn(len(mixes), 4, 64, generator=torch.Generator().manual_seed(1))
    for group in groups:  # each sub-batch runs; together they cover the batch
        sub = [mixes[r] for r in group]
        with pool.acquire_sync({n for m in sub for n in m.names}) as lease, torch.no_grad():
            with handle.use(pool.batch_context(lease, sub)):
                model(ids[group])
                out = layer(x[group])
            expected = handle.originals[Q0](x[group]) + loop_lora_delta(x[group], Q0, adapters, sub)
            assert (out - expected).abs().max().item() <= 1e-5


def test_plan_batches_edge_cases():
    assert plan_batches([], 2) == []
    assert plan_batches([["a"], ["b"], ["a", "b"], ["c"]], 2) == [[0, 1, 2], [3]]
    assert plan_batches([set(), ["a"]], 1) == [[0, 1]]
    with pytest.raises(PoolCapacityError, match="row 1 needs 3 adapters"):
        plan_batches([["a"], ["a", "b", "c"]], 2)


def test_catalogue_register_unregister_replace(tiny_shapes, tmp_path):
    pool = make_pool(tiny_shapes, n_slots=2, max_rank=8)
    v1 = random_adapter("task", tiny_shapes, seed=1)
    v2 = random_adapter("task", tiny_shapes, seed=2)
    pool.register("task", save_adapter(v1, tmp_path / "v1"))
    assert pool.names() == ["task"] and pool.path_of("task") == tmp_path / "v1"
    with pytest.raises(DlpError, match="already registered"):
        pool.register("task", tmp_path / "v1")
    lease = pool.acquire_sync(["task"])
    with pytest.raises(AdapterInUseError):
        pool.register("task", save_adapter(v2, tmp_path / "v2"), replace=True)
    pool.release(lease)
    pool.register("task", tmp_path / "v2", replace=True)
    with pool.acquire_sync(["task"]) as lease:  # the new weights, not the stale slot
        assert_slot_holds(pool, lease.slot_of("task"), v2)
        assert pool.unregister("task") is False  # deferred while pinned
        assert pool.names() == []
        with pytest.raises(UnknownAdapterError):
            pool.acquire_sync(["task"])
        with pytest.raises(AdapterInUseError):  # the running batch still reads its slot
            pool.register("task", tmp_path / "v1")
        assert_slot_holds(pool, lease.slot_of("task"), v2)
    assert pool.stats()["resident"] == [] and pool.stats()["free_slots"] == 2
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        pool.acquire_sync(["nope"])
    assert issubclass(UnknownAdapterError, InvalidMixError)
    with pytest.raises(UnknownAdapterError):
        pool.unregister("task")
    # register_dir picks up every adapter directory
    assert pool.register_dir(tmp_path) == ["v1", "v2"]
    assert pool.unregister("v1") is True


def test_slot_version_counts_writes_only(tiny_shapes, tmp_path):
    """A slot's version moves when its tensors are written (a load, a replaced adapter's
    zeroing) and not on a hit, so a copy made at a version is current while it matches."""
    pool = make_pool(tiny_shapes, n_slots=1, max_rank=8)
    for seed, name in enumerate(["a", "b"]):
        pool.add(random_adapter(name, tiny_shapes, seed=seed))
    with pool.acquire_sync(["a"]) as lease:
        slot = lease.slot_of("a")
    loaded = pool.slot_version(slot)
    assert loaded > 0
    with pool.acquire_sync(["a"]):  # resident: no write
        pass
    assert pool.slot_version(slot) == loaded
    with pool.acquire_sync(["b"]) as lease:  # evicts a into the same slot
        assert lease.slot_of("b") == slot
    assert pool.slot_version(slot) == loaded + 1
    pool.register("b", save_adapter(random_adapter("b", tiny_shapes, seed=9), tmp_path / "b2"),
                  replace=True)  # fmt: skip
    zeroed = pool.slot_version(slot)
    assert zeroed > loaded + 1
    with pool.acquire_sync(["b"]) as lease:
        assert_slot_holds(pool, lease.slot_of("b"), random_adapter("b", tiny_shapes, seed=9))
    assert pool.slot_version(slot) == zeroed + 1


def test_register_refuses_bad_adapters(tiny_shapes, tmp_path):
    pool = make_pool(tiny_shapes, n_slots=2, max_rank=8)
    with pytest.raises(AdapterValidationError, match="not a directory"):
        pool.register("missing", tmp_path / "missing")
    high = random_adapter("high", tiny_shapes, rank=16, seed=1)
    with pytest.raises(AdapterValidationError, match="above the maximum rank 8"):
        pool.register("high", save_adapter(high, tmp_path / "high"))
    other = random_adapter("other", tiny_shapes, targets=("o_proj",), seed=1)
    with pytest.raises(AdapterValidationError, match="only serves LoRA on"):
        pool.register("other", save_adapter(other, tmp_path / "other"))
    with pytest.raises(AdapterValidationError, match="only serves LoRA on"):
        pool.add(other)
    assert pool.names() == []
    # without validation at registration, the refusal comes at first use, cleanly
    pool.register("high", tmp_path / "high", validate=False)
    with pytest.raises(AdapterValidationError, match="above the maximum rank 8"):
        pool.acquire_sync(["high"])
    stats = pool.stats()
    assert (stats["pinned"], stats["resident"], stats["loads"]) == ([], [], 0)
    with pytest.raises(InvalidMixError, match="adapter name"):
        pool.add(random_adapter("a,b", tiny_shapes, seed=1))


def test_row_scales_and_batch_context(tiny_shapes):
    pool = make_pool(tiny_shapes, n_slots=3)
    a = random_adapter("a", tiny_shapes, rank=8, alpha=16, seed=1)  # s = 2
    b = random_adapter("b", tiny_shapes, rank=4, alpha=4, seed=2, use_rslora=True)  # s = 2
    c = random_adapter("c", tiny_shapes, rank=16, alpha=8, seed=3)  # s = 0.5
    for adapter in (a, b, c):
        pool.add(adapter)
    mixes = [
        AdapterMix.from_weights({"a": 0.25, "c": 0.75}),
        AdapterMix.base(),
        AdapterMix.single("b"),
    ]
    with pool.acquire_sync(["a", "b", "c"]) as lease:
        assert lease.scaling("b") == pytest.approx(2.0)
        slots = [lease.slot_of(n) for n in ("a", "b", "c")]
        scales = pool.row_scales(lease, mixes, slot_ids=slots)
        expected = torch.tensor([[0.5, 0.0, 0.375], [0, 0, 0], [0.0, 2.0, 0.0]])
        assert torch.allclose(scales, expected)
        assert torch.equal(pool.row_scales(None, mixes, slots), scales)  # pinned by any lease
        context = pool.batch_context(lease, mixes)
        assert context.slot_ids.tolist() == sorted(slots)
        assert context.col_index.numel() == 8 + 4 + 16
        assert context.col_scales.shape == (3, 28)
    with pytest.raises(InvalidMixError, match="not pinned"):
        pool.row_scales(None, mixes)
    with pytest.raises(DlpError, match="already released"):
        pool.row_scales(lease, mixes)


def test_loads_copy_into_the_preallocated_stacks(tiny_shapes, adapters):
    pool = make_pool(tiny_shapes, n_slots=2)
    for adapter in adapters.values():
        pool.add(adapter)
    pointers = {m: (pool.a_stack(m).data_ptr(), pool.b_stack(m).data_ptr()) for m in pool.modules}
    for name in adapters:  # 6 adapters through 2 slots: loads and evictions
        pool.release(pool.acquire_sync([name]))
    assert pool.stats()["evictions"] == 4
    assert pointers == {
        m: (pool.a_stack(m).data_ptr(), pool.b_stack(m).data_ptr()) for m in pool.modules
    }


def test_cold_load_measurement_on_an_8b_shaped_pool():
    from dlp.lora.coldload import measure_cold_load, qv_shapes

    result = measure_cold_load("llama3-8b", repeats=3)
    # r=8 q/v adapter of Llama-3-8B in bf16: 32 layers x 8 x (4096+4096 + 4096+1024) x 2 bytes
    assert result.adapter_bytes == 32 * 8 * (4096 + 4096 + 4096 + 1024) * 2
    assert len(result.samples_ms) == 3 and all(s > 0 for s in result.samples_ms)
    assert result.as_dict()["median_ms"] == result.median_ms
    assert len(qv_shapes("qwen2-1.5b")) == 56
