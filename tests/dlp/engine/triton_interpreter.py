"""Runs Triton kernels on the CPU for the tests: Triton's interpreter (``TRITON_INTERPRET=1``)
must be set before triton and the kernel modules are imported, so each test module runs its
kernel cases in one child process (one interpreter start) and reads back a JSON dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]

# Prepended to every child: numpy >= 2.4 refuses int() of a shape-(1,) array, which triton
# <= 3.5's interpreter does for runtime loop bounds (triton-lang/triton#9171, fixed upstream
# by #9172).
_PRELUDE = textwrap.dedent(
    """
    import json, sys

    import numpy as np
    import triton.runtime.interpreter as interp

    try:
        int(np.array([1]))
        numpy_refuses = False
    except TypeError:
        numpy_refuses = True
    if numpy_refuses and hasattr(interp, "_patch_lang_tensor"):
        _patch = interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, *args):
            _patch(tensor, *args)
            tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

        interp._patch_lang_tensor = _patch_lang_tensor
    """
)


def run_interpreted(script: str, cases: Any, timeout: float = 300) -> dict[str, Any]:
    """Run ``script`` (which reads ``json.loads(sys.argv[1])`` and prints one JSON line last)
    under the interpreter with ``cases`` as its argument; returns the printed dict."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(script), json.dumps(cases)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interpreted_fixture(script: str, cases: Any) -> Any:
    """A module-scoped ``interpreted`` fixture: ``run_interpreted(script, cases)`` once per
    test module (one interpreter start), skipped where triton is not installed."""

    @pytest.fixture(scope="module", name="interpreted")
    def interpreted() -> dict[str, Any]:
        pytest.importorskip("triton")
        return run_interpreted(script, cases)

    return interpreted
