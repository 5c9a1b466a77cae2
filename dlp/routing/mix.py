"""AdapterMix: the canonical, hashable description of which adapters a request uses and how much.

Equal mixes must produce equal ``key`` strings: the key groups requests into one fused
forward and steers them to replicas that already hold the adapters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from dlp.errors import InvalidMixError

# Weights live on a grid of 1/WEIGHT_GRID so that mixes that differ by float noise coincide.
WEIGHT_GRID = 1000
_SNAP_DECIMALS = 6


@dataclass(frozen=True)
class AdapterMix:
    """Sorted (name, weight) pairs; weights are multiples of 1/grid and sum to exactly 1.

    The empty mix means "base model only".
    """

    entries: tuple[tuple[str, float], ...] = ()

    @classmethod
    def base(cls) -> AdapterMix:
        return cls(())

    @classmethod
    def single(cls, name: str) -> AdapterMix:
        return cls.from_weights({name: 1.0})

    @classmethod
    def from_weights(
        cls,
        weights: Mapping[str, float],
        *,
        grid: int = WEIGHT_GRID,
        max_adapters: int | None = None,
    ) -> AdapterMix:
        """Validate, renormalise and quantise ``weights`` (largest-remainder rounding)."""
        if not weights:
            return cls.base()
        for name, weight in weights.items():
            if not isinstance(name, str) or not name:
                raise InvalidMixError("adapter names must be non-empty strings")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise InvalidMixError(f"weight of adapter {name!r} must be a number")
            if not math.isfinite(weight):
                raise InvalidMixError(f"weight of adapter {name!r} must be finite, got {weight}")
            if weight < 0:
                raise InvalidMixError(f"weight of adapter {name!r} must be >= 0, got {weight}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise InvalidMixError("adapter weights must not all be zero")
        positive = {n: float(w) / total for n, w in weights.items() if w > 0}
        if max_adapters is not None and len(positive) > max_adapters:
            raise InvalidMixError(
                f"mix has {len(positive)} adapters, at most {max_adapters} are allowed"
            )
        units = _largest_remainder(positive, grid)
        entries = tuple(sorted((n, u / grid) for n, u in units.items() if u > 0))
        return cls(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.entries)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.entries)

    @property
    def is_base(self) -> bool:
        return not self.entries

    @property
    def key(self) -> str:
        """Stable string: ``"a=0.600,b=0.400"``; ``"base"`` for the empty mix."""
        if not self.entries:
            return "base"
        return ",".join(f"{n}={w:.{_decimals(WEIGHT_GRID)}f}" for n, w in self.entries)

    def as_dict(self) -> dict[str, float]:
        return dict(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _decimals(grid: int) -> int:
    return max(0, math.ceil(math.log10(grid)))


def _largest_remainder(weights: Mapping[str, float], grid: int) -> dict[str, int]:
    """Integer units summing to ``grid``, each as close as possible to weight * grid."""
    # Snap to a 1e-6 sub-grid first: proportions that differ only by float noise (the same
    # mix given at another scale or summed in another order) must round identically, and
    # exact ties must reach the by-name tie-break instead of being decided by the last ulp.
    raw = {n: round(w * grid, _SNAP_DECIMALS) for n, w in weights.items()}
    units = {n: math.floor(v) for n, v in raw.items()}
    missing = grid - sum(units.values())
    remainder = {n: round(raw[n] - units[n], _SNAP_DECIMALS) for n in raw}
    # Ties broken by name so the result is deterministic.
    by_remainder = sorted(raw, key=lambda n: (-remainder[n], n))
    for name in by_remainder[:missing]:
        units[name] += 1
    if all(u == 0 for u in units.values()):  # cannot happen for grid >= 1, kept as a guard
        units[max(raw, key=raw.__getitem__)] = grid
    return units
