"""The systems ``dlp eval`` compares, each a rule that turns a request into an adapter mix.

- ``base``: no adapter.
- ``oracle``: the request's own task adapter (an upper bound routing can only match).
- ``dlp``: router probabilities -> top-p set (p=0.6) -> softmax weights (released code).
- ``dlp_renorm``: same set, weights ``p_i / sum(p_kept)``.
- ``top1``: only the router's most probable adapter.
- ``composite``: the single r=64 adapter trained on all tasks.

A mix is a plain ``{adapter: weight}`` dict; :func:`mix_key` gives a canonical string so
equal mixes are scored once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dlp.errors import DlpError
from dlp.routing.select import select_top_p
from dlp.training.adapters import COMPOSITE_NAME

SYSTEMS = ("base", "oracle", "dlp", "dlp_renorm", "top1", "composite")
DEFAULT_P = 0.6
Mix = dict[str, float]


def routed_mix(probs: np.ndarray, labels: Sequence[str], p: float, weighting: str) -> Mix:
    """Top-p selection (dlp.routing.select) as a plain dict."""
    return select_top_p(probs, labels, p=p, weighting=weighting).as_dict()  # type: ignore[arg-type]


def system_mix(
    system: str,
    task: str,
    probs: np.ndarray | None,
    labels: Sequence[str],
    p: float = DEFAULT_P,
) -> Mix:
    """The mix ``system`` uses for a request of ``task`` with router output ``probs``."""
    if system == "base":
        return {}
    if system == "oracle":
        return {task: 1.0}
    if system == "composite":
        return {COMPOSITE_NAME: 1.0}
    if probs is None:
        raise DlpError(f"system {system} needs router probabilities")
    if system == "dlp":
        return routed_mix(probs, labels, p, "softmax")
    if system == "dlp_renorm":
        return routed_mix(probs, labels, p, "renorm")
    if system == "top1":
        return {labels[int(np.argmax(probs))]: 1.0}
    raise DlpError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")


def mix_key(mix: Mix) -> str:
    """Canonical string of a mix (sorted names, 3 decimals); ``"base"`` for no adapter."""
    if not mix:
        return "base"
    return ",".join(f"{name}={mix[name]:.3f}" for name in sorted(mix))


def weight_row(mix: Mix, names: Sequence[str]) -> tuple[float, ...]:
    """The mix as one row of the ``[rows, adapters]`` weight matrix (column order ``names``)."""
    index = {n: i for i, n in enumerate(names)}
    row = [0.0] * len(names)
    for name, weight in mix.items():
        if name not in index:
            raise DlpError(f"adapter {name!r} is not loaded (have {len(names)} adapters)")
        row[index[name]] = float(weight)
    return tuple(row)


def top_adapter(mix: Mix) -> str | None:
    """The adapter with the largest weight (ties: first by name), None for the base."""
    if not mix:
        return None
    return min(mix, key=lambda n: (-mix[n], n))
