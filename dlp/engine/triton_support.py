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
