"""Write a cache entry next to its final place, then move it in, so readers never see half.

Several processes (helpers' tests, `dlp setup` in two shells) may build the same entry at
once; each builds in its own pid-named sibling and the first to finish wins.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def partial_path(dest: Path) -> Path:
    """A fresh, process-private sibling of ``dest`` to build into."""
    path = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return path


def swap_in(partial: Path, dest: Path) -> None:
    """Replace ``dest`` by ``partial``; if another process put a ``dest`` there meanwhile,
    keep theirs (it was built the same way) and drop ours."""
    if dest.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
    try:
        partial.replace(dest)
    except OSError:
        if not dest.exists():
            raise
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
