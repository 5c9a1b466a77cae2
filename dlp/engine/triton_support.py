"""Triton, where it is installed, for the engine's kernels (``decode_attention``,
``skinny_gemm``): the CPU torch wheel ships without triton, and importing the kernel modules
must still work there (they then fall back or refuse with a clear error).

``INTERPRET`` is true under Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the
tests): there the interpreter multiplies the raw bit patterns of bf16 operands in ``tl.dot``
(seen with triton 3.5), so the kernels upcast their dot operands to fp32; compiled GPU code
keeps the bf16 tensor-core dots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

if triton is not None:
    _knobs = getattr(triton, "knobs", None)
    INTERPRET = bool(_knobs.runtime.interpret) if _knobs is not None else False
    INTERPRET = INTERPRET or os.environ.get("TRITON_INTERPRET", "0") == "1"
else:  # pragma: no cover - depends on the environment
    INTERPRET = False


def triton_available() -> bool:
    """True when triton imported (it may still need a GPU, or TRITON_INTERPRET=1 on CPU)."""
    return triton is not None


@dataclass(frozen=True)
class PdlOverlap:
    """What a programmatic dependent launch (PDL) of the engine's kernels does before it waits
    for the kernel ahead of it (``griddepcontrol.wait``).

    A weight-streaming decode kernel costs a few microseconds besides its bytes: launch,
    the first loads' latency, the tail. Under PDL the next kernel may start early, and what
    it reads that no kernel of the step writes (weights, the KV cache of past positions) can
    already be on its way to L2 while it waits.

    - ``early_trigger``: let the next kernel launch as soon as this one starts
      (``griddepcontrol.launch_dependents`` first), not once its main loop is done. The
      order stays exact: every kernel still waits for its predecessor to finish before it
      reads that kernel's output (``benchmarks/pdl_bench.py`` checks a dependent chain
      bitwise).
    - ``prefetch``: main-loop steps of such inputs a program sends to L2 before the wait
      (weight tiles; for the attention, key/value blocks of the row's first positions).
    """

    early_trigger: bool = False
    prefetch: int = 0


# What PDL launches use unless told otherwise (benchmarks/pdl_bench.py measured the choice).
PDL_OVERLAP = PdlOverlap()
# Bytes one L2 prefetch instruction covers: a cache line.
L2_LINE_BYTES = 128
