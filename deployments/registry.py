"""Adapter registry deployment: the app-wide catalogue ``name -> adapter dir``.

One replica holds the truth so every ingress replica and every worker agree on what a name
means. Workers do not need a broadcast: each request carries the paths of its mix's adapters
and a worker registers what it has not seen on first use. Adapters found under
``adapters_dir`` at start are the initial catalogue; what the admin API adds or removes later
is persisted next to them (``<adapter_root>/.dlp_registry.json``) so a restarted registry
replica comes back with the same catalogue.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from ray import serve

from deployments.api_models import RequestError
from dlp.lora.adapter import CONFIG_FILE

log = logging.getLogger("ray.serve")

STATE_FILE = ".dlp_registry.json"


def scan_adapters(directory: Path) -> dict[str, str]:
    """Every subdirectory holding an adapter_config.json, by directory name."""
    if not directory.is_dir():
        return {}
    return {
        sub.name: str(sub.resolve())
        for sub in sorted(directory.iterdir())
        if (sub / CONFIG_FILE).is_file()
    }


@serve.deployment(name="AdapterRegistry", num_replicas=1, max_ongoing_requests=256)
class AdapterRegistry:
    def __init__(self, adapters_dir: str | None, adapter_root: str) -> None:
        self._lock = threading.Lock()
        self._root = Path(adapter_root)
        self._state = self._root / STATE_FILE
        self._catalogue: dict[str, str] = scan_adapters(Path(adapters_dir)) if adapters_dir else {}
        self._changes: dict[str, str | None] = self._read_state()
        for name, path in self._changes.items():
            if path is None:
                self._catalogue.pop(name, None)
            else:
                self._catalogue[name] = path
        self._version = 1

    def _read_state(self) -> dict[str, str | None]:
        try:
            raw = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): (str(v) if isinstance(v, str) else None) for k, v in raw.items()}

    def _write_state(self) -> None:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            tmp = self._state.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._changes, indent=1, sort_keys=True))
            os.replace(tmp, self._state)
        except OSError as exc:  # read-only root: registrations still work until a restart
            log.warning("adapter registry: cannot persist %s: %s", self._state, exc)

    def snapshot(self) -> tuple[int, dict[str, str]]:
        with self._lock:
            return self._version, dict(self._catalogue)

    def add(self, name: str, path: str, replace: bool = False) -> int:
        with self._lock:
            if name in self._catalogue and not replace:
                raise RequestError(
                    409, "name", f"adapter {name!r} already exists (set replace: true)"
                )
            self._catalogue[name] = path
            self._changes[name] = path
            self._version += 1
            self._write_state()
            return self._version

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._catalogue

    def remove(self, name: str) -> int:
        with self._lock:
            if name not in self._catalogue:
                raise RequestError(404, "name", f"unknown adapter {name!r}")
            del self._catalogue[name]
            self._changes[name] = None
            self._version += 1
            self._write_state()
            return self._version
