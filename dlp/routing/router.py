"""MiniMLPRouter: a ~5M-parameter sentence -> task classifier, and RouterService around it.

Shape (fastText-like, because the job is recognising which task a request belongs to, which
lexical cues decide): base-model token ids -> one embedding table holding the unigram rows
(the tokenizer's vocabulary) plus hashed bigram/trigram buckets -> mean and max pooling ->
a small MLP -> logits over the adapter labels. Reusing the base model's tokenizer means no
extra vocabulary ships with the router, and the router can run in the same process as the
request ingress on a CPU.

Files: ``router.safetensors`` (weights) + ``router.json`` (labels, hyper-parameters,
tokenizer reference, training metadata). Never pickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix
from dlp.routing.select import DEFAULT_P, Weighting, select_top_p_batch, validate_selection

log = logging.getLogger(__name__)

WEIGHTS_FILE = "router.safetensors"
CONFIG_FILE = "router.json"
FORMAT_VERSION = 1
# Odd 61-bit multipliers for the n-gram hash; part of the saved format (see ``hash_scheme``).
_HASH_MULTIPLIERS = (0x1F3D5B79A2C4E687, 0x0B4F8E3A61D2C957)
HASH_SCHEME = "poly61-v1"


@dataclass(frozen=True)
class RouterConfig:
    """Hyper-parameters; everything needed to rebuild the module from its weights.

    The defaults with the base model's 49152-token vocabulary and 26 labels give 5,020,698
    parameters: (49152 + 28672) x 64 embedding rows (4.98M), LayerNorm(128), 128 -> 256 -> 26.
    """

    vocab_size: int
    embed_dim: int = 64
    hash_buckets: int = 28672
    ngrams: tuple[int, ...] = (2, 3)
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.1
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.embed_dim < 1 or self.hash_buckets < 0:
            raise DlpError("router config: vocab_size, embed_dim must be >= 1, buckets >= 0")
        if any(n < 2 or n > 4 for n in self.ngrams):
            raise DlpError(f"router config: ngrams must be in 2..4, got {self.ngrams}")
        if self.ngrams and self.hash_buckets == 0:
            raise DlpError("router config: n-grams need hash_buckets > 0")
        if self.max_tokens < 1:
            raise DlpError("router config: max_tokens must be >= 1")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RouterConfig:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        for key in ("ngrams", "hidden"):
            if key in known:
                known[key] = tuple(int(x) for x in known[key])
        return cls(**known)


class MiniMLPRouter(nn.Module):
    """Token ids + hashed n-grams -> mean/max pooled embedding -> MLP -> logits over labels."""

    def __init__(
        self,
        labels: Sequence[str],
        tokenizer: Any,
        config: RouterConfig | None = None,
        *,
        tokenizer_ref: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels):
            raise DlpError("router labels must be a non-empty list of unique names")
        self.labels: list[str] = labels
        self.tokenizer = tokenizer
        self.config = config or RouterConfig(vocab_size=len(tokenizer))
        if len(tokenizer) > self.config.vocab_size:
            raise DlpError(
                f"tokenizer has {len(tokenizer)} tokens, router vocab_size is "
                f"{self.config.vocab_size}"
            )
        self.tokenizer_ref = tokenizer_ref or str(getattr(tokenizer, "name_or_path", "") or "")
        self.metadata: dict[str, Any] = dict(metadata or {})
        # The backend (Rust) tokenizer skips the Python wrapper's per-call overhead, which is
        # most of the routing latency at batch 1.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

        cfg = self.config
        self.embedding = nn.Parameter(torch.empty(cfg.vocab_size + cfg.hash_buckets, cfg.embed_dim))
        layers: list[nn.Module] = [nn.LayerNorm(2 * cfg.embed_dim)]
        width = 2 * cfg.embed_dim
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, len(labels)))
        self.mlp = nn.Sequential(*layers)
        nn.init.normal_(self.embedding, std=0.1)

    # --- features --------------------------------------------------------------------------

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Base-model token ids without special tokens, cut to ``max_tokens``."""
        if isinstance(texts, str):
            raise DlpError("texts must be a list of strings, got a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DlpError(f"texts[{i}] must be a string, got {type(t).__name__}")
        limit = self.config.max_tokens
        # Cutting characters first bounds tokenisation cost for very long inputs; a token is
        # rarely longer than 16 characters, so the first ``limit`` tokens survive.
        clipped = [t[: limit * 16] for t in texts]
        if self._backend is not None:
            encoded = self._backend.encode_batch(clipped, add_special_tokens=False)
            return [e.ids[:limit] for e in encoded]
        out = self.tokenizer(clipped, add_special_tokens=False)["input_ids"]
        return [list(ids)[:limit] for ids in out]

    def features(self, ids: Sequence[int]) -> np.ndarray:
        """Row indices into the embedding table: unigrams, then hashed n-grams."""
        cfg = self.config
        arr = np.asarray(ids, dtype=np.int64)
        parts = [arr]
        for n in cfg.ngrams:
            if len(arr) < n:
                continue
            h = arr[: len(arr) - n + 1].copy()
            for k in range(1, n):
                # int64 overflow wraps deterministically; numpy does not warn for arrays.
                h = h * _HASH_MULTIPLIERS[(k - 1) % 2] + arr[k : len(arr) - n + 1 + k] + n
            parts.append(cfg.vocab_size + np.remainder(h, cfg.hash_buckets))
        return np.concatenate(parts)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices + offsets for :meth:`forward` (EmbeddingBag layout)."""
        return pack([self.features(ids) for ids in self.token_ids(texts)])

    # --- model -----------------------------------------------------------------------------

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            mean, peak = self._pool_sparse(indices, offsets)
        else:
            mean = F.embedding_bag(indices, self.embedding, offsets, mode="mean")
            peak = F.embedding_bag(indices, self.embedding, offsets, mode="max")
        return self.mlp(torch.cat([mean, peak], dim=-1))

    def _pool_sparse(
        self, indices: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same mean/max pooling, but with a sparse gradient for the embedding table.

        Training touches a few thousand of the ~78k rows per step; a dense gradient would make
        every step zero and update all 5M parameters (embedding_bag's max mode has no sparse
        gradient, so max pooling is done with a scatter here).
        """
        n_bags = offsets.numel()
        lengths = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))
        bag = torch.repeat_interleave(torch.arange(n_bags), lengths)
        # Look each distinct row up once: the sparse gradient then has one row per distinct
        # index instead of one per occurrence, which keeps coalescing and SparseAdam cheap.
        unique, inverse = torch.unique(indices, return_inverse=True)
        rows = F.embedding(unique, self.embedding, sparse=True)[inverse]
        dim = rows.shape[1]
        sums = rows.new_zeros((n_bags, dim)).index_add(0, bag, rows)
        mean = sums / lengths.clamp(min=1).to(rows.dtype)[:, None]
        peak = rows.new_full((n_bags, dim), float("-inf"))
        peak = peak.scatter_reduce(0, bag[:, None].expand_as(rows), rows, "amax")
        peak = torch.where((lengths > 0)[:, None], peak, torch.zeros_like(peak))
        return mean, peak

    @torch.inference_mode()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """``[len(texts), len(labels)]`` probabilities (rows sum to 1)."""
        was_training = self.training
        self.eval()
        try:
            chunks = []
            for start in range(0, len(texts), batch_size):
                indices, offsets = self.encode(texts[start : start + batch_size])
                chunks.append(torch.softmax(self(indices, offsets), dim=-1).numpy())
        finally:
            self.train(was_training)
        if not chunks:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(chunks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- persistence -----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "MiniMLPRouter",
            "labels": self.labels,
            "config": asdict(self.config),
            "hash_scheme": HASH_SCHEME,
            "tokenizer": self.tokenizer_ref,
            "parameters": self.num_parameters(),
            "metadata": self.metadata,
        }
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path, tokenizer: Any = None) -> MiniMLPRouter:
        src = Path(directory)
        cfg_path, weights_path = src / CONFIG_FILE, src / WEIGHTS_FILE
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise DlpError(f"router: {path} not found (run `dlp setup` or `dlp train-router`)")
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DlpError(f"router: {cfg_path} is not valid JSON: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION or meta.get("hash_scheme") != HASH_SCHEME:
            raise DlpError(
                f"router: {cfg_path} has format {meta.get('format_version')!r} / hash "
                f"{meta.get('hash_scheme')!r}; this dlp reads {FORMAT_VERSION} / {HASH_SCHEME}"
            )
        config = RouterConfig.from_dict(meta["config"])
        ref = str(meta.get("tokenizer") or "")
        if tokenizer is None:
            tokenizer = load_tokenizer(ref)
        router = cls(
            meta["labels"], tokenizer, config, tokenizer_ref=ref, metadata=meta.get("metadata")
        )
        state = load_file(str(weights_path))
        try:
            router.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise DlpError(f"router: {weights_path} does not match {cfg_path}: {exc}") from exc
        router.eval()
        return router


def pack(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-text index arrays into EmbeddingBag ``(indices, offsets)``."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows), dtype=np.int64)
    if len(rows) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(flat), torch.from_numpy(offsets)


def load_tokenizer(ref: str | Path | None = None) -> Any:
    """The base model's tokenizer: from ``ref`` if it exists, else the embedded default."""
    from transformers import AutoTokenizer

    candidates: list[Path] = []
    if ref:
        candidates.append(Path(ref).expanduser())
    from dlp.paths import cache_dir, model_dir

    candidates.append(model_dir(cache_dir()))
    for path in candidates:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(path))
    tried = ", ".join(str(c) for c in candidates)
    raise DlpError(f"router: no tokenizer found (tried {tried}); run `dlp setup` first")


# --- service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteDecision:
    """What the router decided for one text."""

    mix: AdapterMix
    top1: str
    probs: dict[str, float] = field(default_factory=dict)  # the few most probable labels

    def as_dict(self) -> dict[str, Any]:
        return {
            "mix": self.mix.as_dict(),
            "key": self.mix.key,
            "top1": self.top1,
            "probs": self.probs,
        }


@dataclass
class SelectionConfig:
    p: float = DEFAULT_P
    max_adapters: int | None = None
    weighting: Weighting = "softmax"
    top_probs: int = 5  # how many labels RouteDecision.probs reports

    def __post_init__(self) -> None:
        validate_selection(self.p, self.max_adapters, self.weighting)


class RouterService:
    """A loaded router plus default selection settings (no Ray; a deployment wraps this)."""

    def __init__(self, router: MiniMLPRouter, selection: SelectionConfig | None = None) -> None:
        self.router = router
        self.selection = selection or SelectionConfig()

    @classmethod
    def from_dir(cls, directory: str | Path, **selection: Any) -> RouterService:
        return cls(MiniMLPRouter.load(directory), SelectionConfig(**selection))

    @property
    def labels(self) -> list[str]:
        return self.router.labels

    def route(
        self,
        texts: Sequence[str],
        p: float | None = None,
        max_adapters: int | None = None,
        weighting: Weighting | None = None,
    ) -> list[RouteDecision]:
        sel = self.selection
        p = sel.p if p is None else p
        max_adapters = sel.max_adapters if max_adapters is None else max_adapters
        weighting = sel.weighting if weighting is None else weighting
        validate_selection(p, max_adapters, weighting)
        if not texts:
            return []
        probs = self.router.predict_proba(texts)
        labels = self.router.labels
        mixes = select_top_p_batch(
            probs, labels, p=p, max_adapters=max_adapters, weighting=weighting
        )
        k = min(sel.top_probs, len(labels))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            RouteDecision(
                mix=mix,
                top1=labels[int(order[0])],
                probs={labels[int(j)]: round(float(row[j]), 6) for j in order},
            )
            for mix, row, order in zip(mixes, probs, top, strict=True)
        ]
