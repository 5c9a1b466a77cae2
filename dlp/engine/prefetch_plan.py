"""What the PDL decode step's kernels prefetch to L2 (:mod:`dlp.engine.l2_prefetch` does it):
plain data, no torch, so the engine config can check it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefetchPlan:
    """What the PDL decode step's kernels prefetch to L2 for the kernels after them.

    ``o_in_attention``: the attention kernel prefetches the o weight (the next GEMM);
    ``gu_in_attention`` / ``gu_in_o``: bytes of the gate rows and as many of the up rows
    (the first tiles gate/up's programs read) that the attention / the o GEMM prefetch;
    ``qkv_in_down``: the down GEMM, once its own loop is done, prefetches the next layer's
    q/k/v weight (read after the norm kernel between them); ``kv_in_attention``: each
    attention program prefetches its row's cached keys and values before it waits for the
    q/k/v GEMM; ``evict_first``: the GEMMs' own weight loads are marked evict-first (read
    once a step), so the stream does not push the prefetched bytes out of L2."""

    o_in_attention: bool = False
    gu_in_attention: int = 0
    gu_in_o: int = 0
    qkv_in_down: bool = False
    kv_in_attention: bool = False
    evict_first: bool = False

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """Plain ints, as the compiled decode step takes them (a static part of its graph)."""
        return (
            int(self.o_in_attention),
            self.gu_in_attention,
            self.gu_in_o,
            int(self.qkv_in_down),
            int(self.kv_in_attention),
            int(self.evict_first),
        )

    @classmethod
    def from_tuple(cls, t: tuple[int, ...]) -> PrefetchPlan:
        o, gu_a, gu_o, qkv, kv, ef = t
        return cls(bool(o), gu_a, gu_o, bool(qkv), bool(kv), bool(ef))

    @classmethod
    def parse(cls, spec: str) -> PrefetchPlan:
        """``"o,qkv,kv,gu=8m,guo=4m,ef"`` (any subset, ``none`` or empty for nothing): the
        benchmark's and the config's spelling. Sizes take k/m suffixes (KiB/MiB)."""
        fields: dict[str, object] = {}
        flags = {"o": "o_in_attention", "qkv": "qkv_in_down", "kv": "kv_in_attention",
                 "ef": "evict_first"}  # fmt: skip
        sizes = {"gu": "gu_in_attention", "guo": "gu_in_o"}
        for part in (p.strip() for p in spec.split(",")):
            if part in ("", "none"):
                continue
            name, _, value = part.partition("=")
            if name in flags and not value:
                fields[flags[name]] = True
            elif name in sizes and value:
                fields[sizes[name]] = _bytes(value)
            else:
                raise ValueError(
                    f"prefetch plan: unknown part {part!r} (o, qkv, kv, ef, gu=SIZE, guo=SIZE)"
                )
        return cls(**fields)  # type: ignore[arg-type]


def _bytes(value: str) -> int:
    scale = {"k": 1 << 10, "m": 1 << 20}.get(value[-1].lower(), 1)
    digits = value[:-1] if scale != 1 else value
    if not digits.isdigit():
        raise ValueError(f"prefetch plan: size {value!r} is not a number of bytes (k/m suffix)")
    return int(digits) * scale
