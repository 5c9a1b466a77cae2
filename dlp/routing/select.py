"""Top-p adapter selection: router probabilities -> canonical AdapterMix.

The rule follows the DLP-LoRA released code: sort the probabilities in descending order and
keep adapters while the cumulative sum is still below ``p``, *including* the adapter whose
probability makes the sum cross ``p``; at least one adapter is always kept. The kept
adapters are then weighted either by a softmax over their probabilities (what the released
code does) or by their renormalised probabilities ``p_i / sum(p_kept)``. Note that a softmax
over values in [0, 1] is flat: two kept adapters with probabilities 0.55 and 0.05 get weights
0.62 / 0.38, whereas "renorm" gives 0.92 / 0.08.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix

Weighting = Literal["softmax", "renorm"]
WEIGHTINGS: tuple[str, ...] = ("softmax", "renorm")
DEFAULT_P = 0.6
_SUM_TOLERANCE = 1e-9


def validate_selection(p: float, max_adapters: int | None, weighting: str) -> None:
    """Raise one clear DlpError naming the bad field."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
        raise DlpError(f"p must be a number in (0, 1], got {p!r}")
    if not 0.0 < p <= 1.0:
        raise DlpError(f"p must be in (0, 1], got {p}")
    if max_adapters is not None and (
        isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 1
    ):
        raise DlpError(f"max_adapters must be an integer >= 1, got {max_adapters!r}")
    if weighting not in WEIGHTINGS:
        raise DlpError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def top_p_indices(probs: np.ndarray, p: float, max_adapters: int | None = None) -> np.ndarray:
    """Indices kept by the released-code rule, most probable first.

    Ties are broken by index (stable sort) so the result is deterministic.
    """
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    # Number of entries whose *preceding* cumulative sum is still < p: that includes the
    # entry that crosses p. A sum within _SUM_TOLERANCE of p counts as reaching it, so that
    # p = 1.0 with probabilities summing to 0.9999999999 does not keep the zero-probability
    # tail (which softmax weighting would then give real weight).
    before = np.concatenate(([0.0], cumulative[:-1]))
    keep = int(np.count_nonzero(before < p - _SUM_TOLERANCE))
    keep = max(1, keep)
    if max_adapters is not None:
        keep = min(keep, max_adapters)
    return order[:keep]


def _weights(kept: np.ndarray, weighting: str) -> np.ndarray:
    if weighting == "softmax":
        shifted = np.exp(kept - kept.max())
        return shifted / shifted.sum()
    total = kept.sum()
    if total <= 0:  # all kept probabilities are zero: nothing to prefer, share equally
        return np.full_like(kept, 1.0 / len(kept))
    return kept / total


def _check_probs(probs: np.ndarray, labels: Sequence[str]) -> None:
    n_labels = len(labels)
    if probs.shape[-1] != n_labels:
        raise DlpError(f"probs has {probs.shape[-1]} entries but there are {n_labels} labels")
    if n_labels == 0:
        raise DlpError("labels must not be empty")
    if len(set(labels)) != n_labels:
        raise DlpError("labels must be unique")
    if not np.all(np.isfinite(probs)):
        raise DlpError("probs must be finite")
    if np.any(probs < 0):
        raise DlpError("probs must be >= 0")


def select_top_p(
    probs: Sequence[float] | np.ndarray,
    labels: Sequence[str],
    p: float = DEFAULT_P,
    max_adapters: int | None = None,
    weighting: Weighting = "softmax",
) -> AdapterMix:
    """Pick the top-p adapters for one request and weight them (see module docstring)."""
    validate_selection(p, max_adapters, weighting)
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 1:
        raise DlpError(f"probs must be one-dimensional, got shape {arr.shape}")
    _check_probs(arr, labels)
    return _select_row(arr, labels, p, max_adapters, weighting)


def select_top_p_batch(
    probs_2d: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[str],
    p: float = DEFAULT_P,
    max_adapters: int | None = None,
    weighting: Weighting = "softmax",
) -> list[AdapterMix]:
    """Row-wise :func:`select_top_p` for an ``[n, n_labels]`` probability matrix."""
    validate_selection(p, max_adapters, weighting)
    arr = np.asarray(probs_2d, dtype=np.float64)
    if arr.ndim != 2:
        raise DlpError(f"probs_2d must be two-dimensional, got shape {arr.shape}")
    _check_probs(arr, labels)
    return [_select_row(row, labels, p, max_adapters, weighting) for row in arr]


def _select_row(
    row: np.ndarray, labels: Sequence[str], p: float, max_adapters: int | None, weighting: str
) -> AdapterMix:
    idx = top_p_indices(row, p, max_adapters)
    weights = _weights(row[idx], weighting)
    return AdapterMix.from_weights({labels[i]: float(w) for i, w in zip(idx, weights, strict=True)})
