"""LoRA adapters, the device/host adapter pool and the fused multi-LoRA linear layer.

Typical use (see tests/dlp/lora/ for runnable examples)::

    pool = AdapterPool.for_model(model, target_modules=("q_proj", "v_proj"), max_rank=16,
                                 n_slots=32)             # or device_budget_bytes=...
    pool.register("task_a", "/path/to/peft_adapter_dir")  # validated by load_adapter
    handle = inject_fused_lora(model, pool)               # FusedLoraLinear on q/v
    async with await pool.acquire({"task_a", "task_b"}) as lease:   # pins the slots
        ctx = pool.batch_context(lease, mixes)            # one AdapterMix per batch row
        with handle.use(ctx):
            logits = model(input_ids).logits              # per-row fused mixes
    remove_fused_lora(model, handle)                      # original modules back

Modules: adapter (load/save/validate PEFT dirs), fused_ops (the math), fused (the layer and
its batch context), inject (put layers in / take them out), pool (slots, LRU, leases,
plan_batches), host (host tier), reference (the Python-loop baseline),
coldload (cold-load timing on model-shaped pools, for benchmarks).
"""
