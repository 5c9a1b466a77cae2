"""A compact forward pass for Llama / Qwen2 family models that reads the HF module weights.

Why not call the transformers model: its forward is dynamic (cache objects, masks rebuilt per
call, Python-level branching), which is ~58x off the memory floor eagerly and ~6.8x compiled.
This forward has fixed shapes per batch size, a static KV cache with a position per row, and
the LoRA delta of every resident adapter slot in one fused op, so one decode step can be
compiled and captured as a CUDA graph once and replayed whatever the mixes are.

The weights are the HF modules' own parameters (no copies): the same model object can still be
used by transformers / PEFT baselines side by side.

Layout (gpt-fast style): ``k_caches[layer]`` / ``v_caches[layer]`` are ``[rows, kv_heads,
max_seq, head_dim]``. Row ``b`` holds one request; its valid prefix is positions ``< length[b]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlp.engine import residual_norm
from dlp.engine.decode_attention import decode_attention, decode_attention_rope, rope_rows
from dlp.engine.fused_weights import bt_shape, fuse_layer, slot_b_blocks, slot_copies
from dlp.engine.skinny_gemm import (
    NormInput,
    pack_k_steps,
    pick_config,
    skinny_linear,
    skinny_pieces,
    skinny_residual,
    skinny_silu_mul,
)
from dlp.errors import DlpError
from dlp.lora.fused_ops import lora_delta

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The decode GEMMs whose weights CompactLM.pack_decode_weights can re-lay for the kernels.
PACKABLE = ("qkv", "o", "gu", "down")

# (a_stack [S, R, in], b_stack [S, out, R]) for one linear module: every resident slot.
LoraStacks = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    rms_eps: float

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:  # transformers PretrainedConfig
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DlpError(
                f"model_type {model_type!r} is not supported by the engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "use_sliding_window", False):
            raise DlpError("model config: sliding-window attention is not supported")
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            model_type=model_type,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden=config.hidden_size,
            vocab=config.vocab_size,
            rms_eps=config.rms_norm_eps,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same arithmetic as LlamaRMSNorm / Qwen2RMSNorm (variance in float32), so greedy outputs
    match transformers token for token."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, t, d]; cos/sin [b, 1, t, d] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _SlotCopies:
    """What brings one pool slot into the merged decode weights: the A rows of every layer
    (``dst`` <- ``src``, dense, one multi-tensor copy) and the B blocks (``b_blocks``: a
    strided destination over all layers and its per-layer sources; per layer in ``dst`` /
    ``src`` instead when the layers' bt are not one tensor)."""

    dst: list[torch.Tensor]
    src: list[torch.Tensor]
    b_blocks: list[tuple[torch.Tensor, list[torch.Tensor]]]


class CompactLM(nn.Module):
    """Prefill and decode over a static KV cache with per-row positions and per-row LoRA mixes.

    ``lora`` maps a linear module's full name (``model.layers.3.self_attn.q_proj``) to the
    pool's stacked slots; ``row_scales [rows, S]`` (w_i * s_i of the row's adapters in their
    slots, 0 elsewhere) selects each row's mix. Base-only rows have all-zero scales.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        max_batch: int,
        max_seq: int,
        lora: LoraStacks | None = None,
        cache_dtype: torch.dtype | None = None,
        spare_rows: int = 0,
    ) -> None:
        super().__init__()
        self.shape = ModelShape.from_hf_config(hf_model.config)
        self.hf = hf_model  # registered so .to() / parameters() see the weights
        inner = hf_model.model
        self.max_batch = max_batch
        self.max_seq = max_seq
        # Spare cache rows: requests can be prefilled into them before a decode row frees;
        # decode rows then find their cache row in a slot table (decode(slots=...)). With
        # spares, one more row is scratch: free decode rows point there.
        self.spare_rows = spare_rows
        self.cache_rows = max_batch + (spare_rows + 1 if spare_rows else 0)
        self.scratch_row = self.cache_rows - 1
        param = next(hf_model.parameters())
        device, dtype = param.device, cache_dtype or param.dtype
        s = self.shape
        cache_shape = (s.n_layers, self.cache_rows, s.n_kv_heads, max_seq, s.head_dim)
        # One tensor per layer (not views of one buffer): a compiled layer then mutates a
        # graph input in place, which Inductor keeps in place.
        self.k_caches = [
            torch.zeros(cache_shape[1:], device=device, dtype=dtype) for _ in range(s.n_layers)
        ]
        self.v_caches = [
            torch.zeros(cache_shape[1:], device=device, dtype=dtype) for _ in range(s.n_layers)
        ]
        cos, sin = _rope_tables(inner.rotary_emb, max_seq, device)
        self.register_buffer("rope_cos", cos.to(param.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(param.dtype), persistent=False)
        self.layers = [self._layer_weights(i, layer) for i, layer in enumerate(inner.layers)]
        # Each decode layer ends with the next one's input norm (the last with the final norm):
        # its residual add and that norm are then one kernel (residual_norm.py) in the PDL step.
        self._next_norms = [w["in_norm"].weight for w in self.layers[1:]] + [inner.norm.weight]
        self.embed = inner.embed_tokens
        self.lm_head = getattr(hf_model.lm_head, "base_layer", hf_model.lm_head)
        # Decode attention: 0 = matmuls over the whole static cache (any device); N >= 1 = the
        # length-aware Triton kernel with N splits of the sequence (set by the runner on CUDA).
        self.attn_splits = 0
        # With the kernel: rotary embedding and the cache write inside it (set by the runner).
        self.attn_rope = False
        # Decode GEMMs: False = F.linear (cuBLAS / CPU); True = the weight-streaming Triton
        # kernels of skinny_gemm (set by the runner on CUDA).
        self.decode_gemm = False
        # With both kernels: launch them (and, in the compiled step, Inductor's own kernels)
        # as programmatic dependent launches (set by the runner for decode_gemm triton_pdl).
        self.decode_pdl = False
        # With PDL: no norm kernel between attention and MLP. The o GEMM adds the residual and
        # leaves the rows' sums of squares, gate/up applies the RMSNorm as it reads its input
        # (skinny_gemm.skinny_residual / NormInput; see decode_layer). Tile counters for it:
        self.decode_fuse_norms = False
        # With it: o writes its rows times the post-attention norm's weight too, and gate/up
        # applies the rstd after its product instead of normalising every x tile it loads.
        self.decode_prescale_norm = False
        # Decode GEMM weights of these roles ("qkv", "o", "gu", "down") re-laid K step by K
        # step for the weight-streaming kernels (skinny_gemm.pack_k_steps; a second copy of
        # each): set by pack_decode_weights, before a step is compiled.
        self.decode_packed: tuple[str, ...] = ()
        self._packed: dict[tuple[int, str], torch.Tensor] = {}
        self.gemm_counters = torch.zeros(
            4096, dtype=torch.int32, device=hf_model.get_input_embeddings().weight.device
        )
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_lora(lora or {})
        self._build_fused()

    @staticmethod
    def _layer_weights(index: int, layer: nn.Module) -> dict[str, nn.Module | str]:
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{index}"

        def base(m: nn.Module) -> nn.Module:
            # A PEFT-wrapped model (baselines share it) keeps the plain Linear as base_layer.
            return getattr(m, "base_layer", m)

        return {
            "in_norm": layer.input_layernorm,
            "post_norm": layer.post_attention_layernorm,
            "q_proj": base(attn.q_proj),
            "k_proj": base(attn.k_proj),
            "v_proj": base(attn.v_proj),
            "o_proj": base(attn.o_proj),
            "gate_proj": base(mlp.gate_proj),
            "up_proj": base(mlp.up_proj),
            "down_proj": base(mlp.down_proj),
            "prefix": prefix,
            "attn_prefix": f"{prefix}.self_attn",
            "mlp_prefix": f"{prefix}.mlp",
        }

    def set_lora(self, lora: LoraStacks) -> None:
        """Bind the pool's stacks (once, at construction). Prefill and the o/MLP LoRA read
        them by reference; q/k/v decode reads the merged copies (see refresh_slots)."""
        known = {f"{l_['attn_prefix']}.{n}" for l_ in self.layers for n in LINEAR_NAMES[:4]}
        known |= {f"{l_['mlp_prefix']}.{n}" for l_ in self.layers for n in LINEAR_NAMES[4:]}
        unknown = sorted(set(lora) - known)
        if unknown:
            raise DlpError(f"LoRA stacks for modules the model does not have: {unknown[:3]}")
        self.lora = dict(lora)

    # --- decode: one token for each of the first ``rows`` rows -----------------------

    def _build_fused(self) -> None:
        # Every layer's bt as a slice of one tensor when their shapes agree (they do for the
        # HF decoders we serve), so refresh_slots copies a slot's B blocks of all layers at once.
        shapes = {bt_shape(w, w["attn_prefix"], self.lora) for w in self.layers}
        self._bt_all: torch.Tensor | None = None
        if len(shapes) == 1 and None not in shapes and self.layers:
            weight = self.layers[0]["q_proj"].weight
            self._bt_all = torch.zeros(
                len(self.layers), *shapes.pop(), dtype=weight.dtype, device=weight.device
            )
        bts = list(self._bt_all) if self._bt_all is not None else [None] * len(self.layers)
        self.fused = [
            fuse_layer(w, w["attn_prefix"], self.lora, bt)
            for w, bt in zip(self.layers, bts, strict=True)
        ]
        self.lora_targets = self.fused[0].targets if self.fused else ()
        self._slot_views: dict[int, _SlotCopies] = {}
        if self.lora_targets:
            self.refresh_slots(None)

    @torch.no_grad()
    def refresh_slots(self, slots: Iterable[int] | None) -> None:
        """Copy pool ``slots`` (None: all) into the merged decode weights. The engine calls
        this for the slots written since it last copied them: one multi-tensor copy of the A
        rows of every layer, and per slot and target one stack + copy of the B blocks."""
        if slots is None:
            slots = range(self._n_slots())
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for slot in slots:
            copies = self._slot_views.get(slot)
            if copies is None:  # built once per slot: slicing ~100 views costs ~1 ms
                copies = self._slot_copies(slot)
                self._slot_views[slot] = copies
            dst += copies.dst
            src += copies.src
            for block, sources in copies.b_blocks:
                block.copy_(torch.stack(sources))
        if dst:
            torch._foreach_copy_(dst, src)

    def _slot_copies(self, slot: int) -> _SlotCopies:
        stacked = self._bt_all is not None
        copies = _SlotCopies([], [], [])
        for w, fused in zip(self.layers, self.fused, strict=True):
            d, s_ = slot_copies(fused, w["attn_prefix"], self.lora, [slot], b_blocks=not stacked)
            copies.dst.extend(d)
            copies.src.extend(s_)
        if stacked:
            prefixes = [w["attn_prefix"] for w in self.layers]
            copies.b_blocks.extend(
                slot_b_blocks(self._bt_all, self.fused, prefixes, self.lora, slot)
            )
        return copies

    def _in_scales(self, row_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Row scales [b, S] expanded once per forward to the merged LoRA rows: [b, 1, T*S*R]."""
        if not self.lora_targets:
            return None
        rank = self.fused[0].bt.shape[0] // (len(self.lora_targets) * row_scales.shape[1])
        in_scales = row_scales.to(dtype).repeat_interleave(rank, dim=-1)
        return in_scales.repeat(1, len(self.lora_targets))[:, None, :]

    def _n_slots(self) -> int:
        return next(iter(self.lora.values()))[0].shape[0] if self.lora else 0

    @torch.no_grad()
    def pack_decode_weights(self, roles: Iterable[str], rows: int | None = None) -> None:
        """Give the decode step's weight-streaming GEMMs packed copies of the weights of
        ``roles`` (:data:`PACKABLE`), K steps as their configs at ``rows`` rows (default: the
        model's batch) pick them; ``()`` drops them. q/k/v is packed for steps without
        q/k/v LoRA (its base rows; the merged LoRA rows change with the pool's slots)."""
        roles = tuple(roles)
        unknown = sorted(set(roles) - set(PACKABLE))
        if unknown:
            raise DlpError(f"unknown decode weight roles {unknown} (known: {PACKABLE})")
        rows = rows or self.max_batch
        self._packed = {}
        for i, (w, f) in enumerate(zip(self.layers, self.fused, strict=True)):
            weights = {
                "qkv": (f.base_in()[0], 1),
                "o": (w["o_proj"].weight, 1),
                "gu": (f.w_gu, 2),
                "down": (w["down_proj"].weight, 1),
            }
            for role in roles:
                weight, per_output = weights[role]
                n, k = weight.shape[0] // per_output, weight.shape[1]
                block_k = pick_config(rows, n, k, silu=per_output == 2).block_k
                self._packed[(i, role)] = pack_k_steps(weight, block_k)
        self.decode_packed = roles

    def layer_tensors(self, i: int, use_lora: bool, packed: bool = False) -> tuple:
        """The tensors one decode layer reads, as plain arguments so a single compiled
        ``decode_layer`` serves every layer (no per-layer recompiles); ``packed``: the
        weight-streaming kernels' packed weights where there are (decode only)."""
        w = self.layers[i]
        f = self.fused[i]
        if use_lora and f.bt is not None:
            w_in, b_in, bt = f.w_in, f.b_in, f.bt
        else:
            (w_in, b_in), bt = f.base_in(), None
        rest = ("o_proj", "gate_proj", "up_proj", "down_proj")
        prefixes = (w["attn_prefix"],) + (w["mlp_prefix"],) * 3
        lora = tuple(
            self.lora.get(f"{p}.{n}") if use_lora else None
            for p, n in zip(prefixes, rest, strict=True)
        )
        w_o, w_gu, w_down = w["o_proj"].weight, f.w_gu, w["down_proj"].weight
        if packed and self._packed and self.decode_gemm:  # the kernels read these packed
            if bt is None:
                w_in = self._packed.get((i, "qkv"), w_in)
            w_o = self._packed.get((i, "o"), w_o)
            w_gu = self._packed.get((i, "gu"), w_gu)
            w_down = self._packed.get((i, "down"), w_down)
        return (
            w["in_norm"].weight,
            w["post_norm"].weight,
            w_in,
            b_in,
            bt,
            w_o,
            w["o_proj"].bias,
            w_gu,
            f.b_gu,
            w_down,
            w["down_proj"].bias,
            lora,
            f.qkv_sizes,
        )

    def decode_inputs(
        self, tokens: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings [b,1,h], rope cos/sin [b,1,1,d] and the additive length mask [b,1,1,S]."""
        x = self.embed(tokens[:, None])
        cos = self.rope_cos[positions][:, None, None, :]
        sin = self.rope_sin[positions][:, None, None, :]
        # Key j of row r is visible when j <= positions[r]: per-row lengths, one static shape.
        visible = torch.arange(self.max_seq, device=tokens.device)[None, :] <= positions[:, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=tokens.device)
        bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]
        return x, cos, sin, bias

    def decode_head(self, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + lm_head for [b, 1, h] -> logits [b, vocab] in the model dtype
        (``normed``: the final norm of x, when the last layer made it)."""
        if normed is None:
            normed = rms_norm(x, self.hf.model.norm.weight, self.shape.rms_eps)
        return self.lm_head(normed[:, 0])

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        row_scales: torch.Tensor | None,
        layer_fn=None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [b] long, positions [b] long (where each token goes), row_scales [b, S].
        Uses cache rows 0..b-1, or with ``slots`` [b] long row r's cache row slots[r].
        Returns logits [b, vocab] in the model dtype. ``layer_fn`` replaces
        :func:`decode_layer` (e.g. by its torch.compile'd version)."""
        layer_fn = layer_fn or decode_layer
        s = self.shape
        b = tokens.shape[0]
        x, cos, sin, bias = self.decode_inputs(tokens, positions)
        batch_idx = torch.arange(b, device=tokens.device) if slots is None else slots
        use_lora = row_scales is not None and len(self.lora) > 0
        in_scales = self._in_scales(row_scales, x.dtype) if use_lora else None
        counters = self.gemm_counters if self.decode_fuse_norms and self.decode_pdl else None
        lengths = None
        if self.attn_splits and self.attn_rope:
            # The rope attention's per-row inputs, made once for all layers (made in each
            # layer or by plain indexing here, Inductor copies them per attention op).
            cos, sin, lengths = rope_rows(self.rope_cos, self.rope_sin, positions)
        normed = None
        for i in range(s.n_layers):
            k_cache, v_cache = self.k_caches[i], self.v_caches[i]
            if slots is None and b != k_cache.shape[0]:
                k_cache, v_cache = k_cache[:b], v_cache[:b]
            x, normed = layer_fn(
                x,
                cos,
                sin,
                bias,
                batch_idx,
                positions,
                *self.layer_tensors(i, use_lora, packed=True),
                in_scales,
                row_scales if use_lora else None,
                k_cache,
                v_cache,
                s.n_heads,
                s.n_kv_heads,
                s.head_dim,
                s.rms_eps,
                self.attn_splits,
                self.decode_gemm,
                self.attn_rope,
                self.decode_pdl,
                counters,
                lengths,
                self.decode_prescale_norm,
                normed,
                self._next_norms[i],
            )
        return self.decode_head(x, normed)

    # --- prefill: whole prompts of new requests into fresh rows --------------------

    def prefill(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        row_scales: torch.Tensor | None,
        layer_fn=None,
    ) -> torch.Tensor:
        """tokens [n, T] right-padded prompts, lengths [n], rows [n] (cache rows to fill from
        position 0), row_scales [n, S] over every pool slot (0 where unused). Returns
        logits at each prompt's last token [n, vocab] (float32). ``layer_fn`` replaces
        :func:`prefill_layer` (e.g. by its torch.compile'd version)."""
        last = self.prefill_hidden(tokens, lengths, rows, row_scales, layer_fn)
        return self.prefill_head(last)

    def prefill_head(self, last: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head of the prompts' last hidden states [n, hidden] -> float32."""
        last = rms_norm(last, self.hf.model.norm.weight, self.shape.rms_eps)
        return self.lm_head(last).float()

    def prefill_hidden(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        row_scales: torch.Tensor | None,
        layer_fn=None,
    ) -> torch.Tensor:
        """:meth:`prefill` up to the last prompt token's hidden state [n, hidden] (fills the
        cache rows); no host sync, so it can be captured as a CUDA graph."""
        layer_fn = layer_fn or prefill_layer
        s = self.shape
        n, t = tokens.shape
        if t > self.max_seq:
            raise DlpError(f"prompt of {t} tokens exceeds max_seq_len {self.max_seq}")
        x = self.embed(tokens)
        cos = self.rope_cos[:t][None, None]
        sin = self.rope_sin[:t][None, None]
        use_lora = row_scales is not None and len(self.lora) > 0
        in_scales = self._in_scales(row_scales, x.dtype) if use_lora else None
        for i in range(s.n_layers):
            x = layer_fn(
                x,
                cos,
                sin,
                rows,
                *self.layer_tensors(i, use_lora),
                in_scales,
                row_scales if use_lora else None,
                self.k_caches[i],
                self.v_caches[i],
                s.n_heads,
                s.n_kv_heads,
                s.head_dim,
                s.rms_eps,
            )
        return x[torch.arange(n, device=x.device), lengths - 1]  # [n, hidden]

    def kv_bytes_per_token(self) -> int:
        s = self.shape
        return 2 * s.n_layers * s.n_kv_heads * s.head_dim * self.k_caches[0].element_size()

    def cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.k_caches + self.v_caches)


def _rope_tables(
    rotary_emb: nn.Module, max_seq: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq, head_dim] from HF's own rotary module, so every rope_type it knows
    (default, llama3, linear, ...) comes out right. Dynamic types would change with length."""
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if "dynamic" in str(rope_type):
        raise DlpError(f"rope_type {rope_type!r} is not supported by the engine")
    positions = torch.arange(max_seq, device=device)[None]
    dummy = torch.zeros(1, device=device, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary_emb(dummy, positions)
    return cos[0].float(), sin[0].float()


def _lin(x, weight, bias, lora, scales, linear=F.linear):
    out = linear(x, weight, bias)
    if lora is not None and scales is not None:
        out = out + lora_delta(x, lora[0], lora[1], None, scales).to(out.dtype)
    return out


def decode_layer(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    batch_idx: torch.Tensor,
    positions: torch.Tensor,
    in_norm: torch.Tensor,
    post_norm: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    bt: torch.Tensor | None,
    w_o: torch.Tensor,
    b_o: torch.Tensor | None,
    w_gu: torch.Tensor,
    b_gu: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    lora: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...],
    qkv_sizes: tuple[int, int, int],
    in_scales: torch.Tensor | None,
    row_scales: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    eps: float,
    attn_splits: int = 0,
    skinny: bool = False,
    attn_rope: bool = False,
    pdl: bool = False,
    counters: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    prescale: bool = False,
    normed: torch.Tensor | None = None,
    next_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One transformer block for one new token per row; a pure function of its tensors so
    one ``torch.compile`` of it serves every layer. Writes this token's K/V into the cache:
    row r's cache row is ``batch_idx[r]`` (r itself, or a slot table when the cache has
    more rows than the batch).

    ``w_in`` holds q/k/v and (with ``bt``) every slot's LoRA A rows: one GEMM, then the
    row-scaled LoRA hidden states go through the block-diagonal ``bt`` onto q/k/v.
    ``attn_splits`` > 0 runs attention as the Triton kernel that reads each row's valid
    prefix only (``bias`` is then unused); with ``attn_rope`` that kernel also applies the
    rotary embedding and writes the cache (no separate rope and cache-write kernels).
    ``skinny`` runs the GEMMs as the weight-streaming Triton kernels (gate/up with silu * up
    in their epilogue); with ``pdl`` they and the attention kernel are programmatic dependent
    launches (each may start while the kernel before it drains).

    ``counters`` (with ``pdl``) fuses the post-attention norm into the GEMMs around it: the
    o GEMM adds the residual and leaves the rows' partial sums of squares, and gate/up
    reads its input through the RMSNorm, so no norm kernel runs between them (without LoRA
    on o, gate and up). The input norm stays a kernel of its own, which also sums the down
    GEMM's split-K pieces and adds the residual: as a prologue of the q/k/v GEMM it cost
    more than the kernel (``benchmarks/results/decode_step_h200_fused*.json``). With
    ``prescale`` the o GEMM also writes its rows times the norm's weight and gate/up reads
    those, applying each row's rstd after its product (no norm arithmetic in its K steps).

    With ``attn_rope``, cos / sin may come as rows ``[b, head_dim]`` and ``lengths``
    (``positions + 1``) made once for every layer (:meth:`CompactLM.decode` does).

    Returns the block's output and, with ``next_norm`` (the next block's input norm weight,
    or the final norm's), its RMSNorm, which the next block then takes as ``normed`` instead
    of normalising its input itself (in the PDL step the residual add and that norm are one
    kernel, :mod:`dlp.engine.residual_norm`); else None."""
    b = x.shape[0]
    lo, lg, lu, ld = lora
    linear = _decode_linear(skinny, pdl)
    fuse = counters is not None and skinny and pdl
    h = normed if normed is not None else rms_norm(x, in_norm, eps)
    # The slot table, when rows read their cache row through it (more cache rows than rows).
    slots = batch_idx if k_cache.shape[0] != b else None
    if attn_splits and attn_rope:
        if skinny and bt is None and attn_splits == 1:
            # The base step: the attention kernel sums the q/k/v GEMM's split-K pieces itself.
            q, k, v = skinny_pieces(h, w_in, b_in, pdl=pdl).split(list(qkv_sizes), dim=-1)
        else:
            q, k, v = (
                t.unsqueeze(0) for t in _qkv(h, w_in, b_in, bt, in_scales, qkv_sizes, linear)
            )
        pieces = q.shape[0]
        o = decode_attention_rope(
            q.reshape(pieces, b, n_heads, head_dim),
            k.reshape(pieces, b, n_kv_heads, head_dim),
            v.reshape(pieces, b, n_kv_heads, head_dim),
            cos if cos.dim() == 2 else cos.reshape(b, head_dim),
            sin if sin.dim() == 2 else sin.reshape(b, head_dim),
            k_cache,
            v_cache,
            lengths if lengths is not None else positions + 1,
            head_dim**-0.5,
            attn_splits,
            slots,
            pdl=pdl and attn_splits == 1,
        ).reshape(b, 1, n_heads * head_dim)
    else:
        q, k, v = _qkv(h, w_in, b_in, bt, in_scales, qkv_sizes, linear)
        o = _attend(
            q, k, v, cos, sin, bias, batch_idx, slots, positions, k_cache, v_cache, attn_splits
        )
    x, x_sumsq, x_scaled = _residual(
        x, o, w_o, b_o, lo, row_scales, linear, counters if fuse else None,
        post_norm if prescale else None,
    )  # fmt: skip
    mlp_lora = (lg, lu, ld)
    post = NormInput(x_sumsq, post_norm, eps, x_scaled) if x_sumsq is not None else None
    return _mlp(
        x, post_norm, w_gu, b_gu, w_down, b_down, mlp_lora, row_scales, eps, skinny, pdl, post,
        next_norm,
    )  # fmt: skip


def _residual(
    x: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    scales: torch.Tensor | None,
    linear: Callable[..., torch.Tensor],
    counters: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``x + linear(inp)`` (+ its LoRA), and with ``counters`` (no LoRA here) as one PDL
    GEMM that also returns the new rows' partial sums of squares (else None), and with
    ``norm_weight`` the new rows times it (NormInput.prescaled; else None)."""
    if counters is None or (lora is not None and scales is not None):
        return x + _lin(inp, weight, bias, lora, scales, linear), None, None
    lead = x.shape[:-1]
    h, sumsq, scaled = skinny_residual(
        inp.reshape(-1, inp.shape[-1]), weight, bias, x.reshape(-1, x.shape[-1]), counters,
        pdl=True, scale=norm_weight,
    )  # fmt: skip
    if scaled is not None:
        scaled = scaled.reshape(*lead, scaled.shape[-1])
    return h.reshape(*lead, h.shape[-1]), sumsq, scaled


def _decode_linear(skinny: bool, pdl: bool) -> Callable[..., torch.Tensor]:
    """The decode step's linear: cuBLAS, or the weight-streaming kernel (PDL-launched)."""
    if not skinny:
        return F.linear
    return functools.partial(skinny_linear, pdl=True) if pdl else skinny_linear


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    batch_idx: torch.Tensor,
    slots: torch.Tensor | None,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_splits: int,
) -> torch.Tensor:
    """Decode attention with the rotary embedding and the cache write as torch ops: q/k/v
    [b, 1, heads * d] before rope; returns [b, 1, n_heads * d]. ``slots``: ``batch_idx``
    when rows read their cache row through it, else None."""
    b, head_dim = q.shape[0], k_cache.shape[-1]
    n_heads, n_kv_heads = q.shape[-1] // head_dim, k_cache.shape[1]
    q = q.reshape(b, 1, n_heads, head_dim).transpose(1, 2)
    k = k.reshape(b, 1, n_kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(b, 1, n_kv_heads, head_dim).transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    k_cache[batch_idx, :, positions] = k[:, :, 0]
    v_cache[batch_idx, :, positions] = v[:, :, 0]
    if attn_splits:
        lengths = positions + 1
        o = decode_attention(
            q[:, :, 0], k_cache, v_cache, lengths, head_dim**-0.5, attn_splits, slots
        )
        return o.reshape(b, 1, n_heads * head_dim)
    if slots is not None:  # the rows' caches, gathered (the Triton kernel reads them in place)
        k_cache, v_cache = k_cache[slots], v_cache[slots]
    # GQA without repeating the cache: [b, kvh, g, d] x [b, kvh, d, S].
    qg = q.reshape(b, n_kv_heads, n_heads // n_kv_heads, head_dim)
    att = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * head_dim**-0.5 + bias
    att = torch.softmax(att, dim=-1).to(v_cache.dtype)
    return torch.matmul(att, v_cache).reshape(b, 1, n_heads * head_dim)


def prefill_layer(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    in_norm: torch.Tensor,
    post_norm: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    bt: torch.Tensor | None,
    w_o: torch.Tensor,
    b_o: torch.Tensor | None,
    w_gu: torch.Tensor,
    b_gu: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    lora: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...],
    qkv_sizes: tuple[int, int, int],
    in_scales: torch.Tensor | None,
    row_scales: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    eps: float,
) -> torch.Tensor:
    """One transformer block over whole right-padded prompts ``x [n, t, hidden]`` that start
    at position 0 of cache ``rows``: the decode block's merged weights and LoRA path, causal
    attention within the prompt. A pure function, so one ``torch.compile`` (dynamic in n and
    t) serves every layer: a prefill is then ~a dozen fused kernels a layer, not ~50."""
    n, t, _ = x.shape
    lo, lg, lu, ld = lora
    h = rms_norm(x, in_norm, eps)
    q, k, v = _qkv(h, w_in, b_in, bt, in_scales, qkv_sizes)
    q = q.reshape(n, t, n_heads, head_dim).transpose(1, 2)
    k = k.reshape(n, t, n_kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(n, t, n_kv_heads, head_dim).transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    # Right padding is harmless under a causal mask; padded positions are overwritten by
    # decode before they become visible.
    k_cache[rows, :, :t] = k
    v_cache[rows, :, :t] = v
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o = o.transpose(1, 2).reshape(n, t, n_heads * head_dim)
    x = x + _lin(o, w_o, b_o, lo, row_scales)
    return _mlp(x, post_norm, w_gu, b_gu, w_down, b_down, (lg, lu, ld), row_scales, eps)[0]


def _qkv(
    h: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    bt: torch.Tensor | None,
    in_scales: torch.Tensor | None,
    qkv_sizes: tuple[int, int, int],
    linear=F.linear,
) -> list[torch.Tensor]:
    """q, k, v [..., size] from one GEMM over the merged rows (q/k/v + every slot's LoRA A),
    the row-scaled LoRA hidden states mapped back through the block-diagonal ``bt``."""
    big = linear(h, w_in, b_in)
    qkv_size = qkv_sizes[0] + qkv_sizes[1] + qkv_sizes[2]
    if bt is not None and in_scales is not None:
        qkv = big[..., :qkv_size] + torch.matmul(big[..., qkv_size:] * in_scales, bt)
    else:
        qkv = big[..., :qkv_size]
    return qkv.split(list(qkv_sizes), dim=-1)


def _mlp(
    x: torch.Tensor,
    post_norm: torch.Tensor,
    w_gu: torch.Tensor,
    b_gu: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    lora: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...],
    row_scales: torch.Tensor | None,
    eps: float,
    skinny: bool = False,
    pdl: bool = False,
    normed: NormInput | None = None,
    next_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual MLP half of a block: gate and up in one GEMM, per-row LoRA on any of them.
    ``skinny``: the weight-streaming kernels; without LoRA on gate/up, silu(gate) * up is
    the gate/up kernel's epilogue. ``normed`` (x's sums of squares) lets gate/up apply the
    norm as it reads x (see decode_layer). Returns the new x and, with ``next_norm``, its
    RMSNorm by that weight (else None)."""
    lg, lu, ld = lora
    linear = _decode_linear(skinny, pdl)
    gate_lora = lg is not None and row_scales is not None
    up_lora = lu is not None and row_scales is not None
    if skinny and not (gate_lora or up_lora):
        if normed is not None:
            act = skinny_silu_mul(x, w_gu, b_gu, pdl=pdl, norm=normed)
        else:
            act = skinny_silu_mul(rms_norm(x, post_norm, eps), w_gu, b_gu, pdl=pdl)
        down_lora = ld is not None and row_scales is not None
        if pdl and next_norm is not None and not down_lora and residual_norm.SPLIT_N > 0:
            # down's split-K pieces, summed with the residual add and the next norm in one
            # kernel of ours (Inductor's own reads each row twice, residual_norm.py).
            pieces = skinny_pieces(act, w_down, b_down, pdl=True)
            x2, h2 = residual_norm.residual_rms_norm(
                pieces, x.reshape(-1, x.shape[-1]), next_norm, eps, pdl=True
            )
            return x2.reshape(x.shape), h2.reshape(x.shape)
        return _with_norm(x + _lin(act, w_down, b_down, ld, row_scales, linear), next_norm, eps)
    h = rms_norm(x, post_norm, eps)
    gu = linear(h, w_gu, b_gu)
    inter = w_gu.shape[0] // 2
    gate, up = gu[..., :inter], gu[..., inter:]
    if gate_lora:
        gate = gate + lora_delta(h, lg[0], lg[1], None, row_scales).to(gate.dtype)
    if up_lora:
        up = up + lora_delta(h, lu[0], lu[1], None, row_scales).to(up.dtype)
    return _with_norm(
        x + _lin(F.silu(gate) * up, w_down, b_down, ld, row_scales, linear), next_norm, eps
    )


def _with_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return x, rms_norm(x, weight, eps) if weight is not None else None
