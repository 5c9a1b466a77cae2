"""Where dlp keeps its cache (embedded model, task data, trained router and adapters)."""

from __future__ import annotations

import os
from pathlib import Path

from dlp.errors import DlpError

CACHE_ENV = "DLP_CACHE_DIR"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the cache root: explicit flag > $DLP_CACHE_DIR > ~/.cache/dlp."""
    raw = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dlp"
    return Path(raw).expanduser().resolve()


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise one clear DlpError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DlpError(f"cache dir {path} is not writable: {exc.strerror or exc}") from exc
    return path


def model_dir(root: Path) -> Path:
    return root / "models" / "smollm2-135m-instruct"


def data_dir(root: Path) -> Path:
    return root / "data" / "bigbench26"


def router_dir(root: Path) -> Path:
    return root / "router"


def adapters_dir(root: Path) -> Path:
    return root / "adapters"
