"""Checks at the edge of the app: config limits on requests, the admin token, and where an
adapter being registered may live. Pure functions (no Ray, no model) so every deployment and
the tests use the same rules.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from pydantic import ValidationError

from deployments.api_models import RequestError, SamplingFields
from dlp.config import ADMIN_TOKEN_ENV, ServingLimits
from dlp.errors import InvalidMixError
from dlp.lora.adapter import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from dlp.routing.mix import AdapterMix


def from_validation_error(exc: ValidationError) -> RequestError:
    """The first pydantic error as one 400 naming the field (``messages.0.content``)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    # Drop pydantic's union-branch tags ("str", "list[str]") so the field reads as written.
    tags = ("str", "int", "float", "bool", "none")
    loc = [p for p in loc if p not in tags and not p.startswith(("list[", "function-", "literal["))]
    name = ".".join(loc) or "body"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return RequestError(400, name, f"{name}: {msg}")


def enforce_limits(req: SamplingFields, limits: ServingLimits) -> int:
    """Check config limits; returns the effective max_tokens."""
    max_tokens = req.max_tokens if req.max_tokens is not None else limits.default_max_tokens
    if max_tokens > limits.max_tokens_cap:
        raise RequestError(
            400, "max_tokens", f"max_tokens must be <= {limits.max_tokens_cap}, got {max_tokens}"
        )
    stops = req.stop_list()
    if len(stops) > limits.max_stop_strings:
        raise RequestError(
            400, "stop", f"at most {limits.max_stop_strings} stop strings, got {len(stops)}"
        )
    for s in stops:
        if not s:
            raise RequestError(400, "stop", "stop strings must not be empty")
        if len(s) > limits.max_stop_chars:
            raise RequestError(
                400, "stop", f"stop strings must have <= {limits.max_stop_chars} characters"
            )
    return max_tokens


def explicit_mix(weights: dict[str, float], limits: ServingLimits) -> AdapterMix:
    try:
        return AdapterMix.from_weights(weights, max_adapters=limits.max_adapters_per_mix)
    except InvalidMixError as exc:
        raise RequestError(400, "adapters", str(exc)) from exc


# --- admin ---------------------------------------------------------------------------------


def check_admin(authorization: str | None, expected: str | None = None) -> None:
    """401 without a bearer token, 403 with a wrong one; compared in constant time.

    With no token configured, changes are refused outright (403): an open admin API is never
    the default.
    """
    expected = expected if expected is not None else os.environ.get(ADMIN_TOKEN_ENV, "")
    if not authorization or not authorization.lower().startswith("bearer "):
        raise RequestError(401, "authorization", "admin bearer token required")
    given = authorization[len("bearer ") :].strip()
    if not expected:
        raise RequestError(403, "authorization", f"admin API disabled: {ADMIN_TOKEN_ENV} not set")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise RequestError(403, "authorization", "wrong admin token")


# --- adapter paths -------------------------------------------------------------------------


def resolve_under_root(raw: str, root: Path) -> Path:
    """The adapter dir ``raw`` names, refused unless it stays under ``root``.

    Relative paths only; no ``..`` parts; after resolving symlinks (of the dir and of every
    file in it) the result must still be inside the root. No pickle files may sit in it.
    """
    if "\x00" in raw:
        raise RequestError(400, "path", "path holds a NUL byte")
    rel = Path(raw)
    if rel.is_absolute() or raw.startswith(("/", "\\", "~")):
        raise RequestError(400, "path", "path must be relative to the adapter root")
    if any(part == ".." for part in rel.parts):
        raise RequestError(400, "path", "path must not contain '..'")
    root = root.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise RequestError(400, "path", "path leaves the adapter root (symlink)")
    if not target.is_dir():
        raise RequestError(404, "path", f"no adapter directory {raw!r} under the adapter root")
    for entry in target.iterdir():
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            raise RequestError(
                400, "path", f"{entry.name}: pickle files are refused (use {WEIGHTS_FILE})"
            )
        if not entry.resolve().is_relative_to(root):
            raise RequestError(400, "path", f"{entry.name} is a symlink leaving the adapter root")
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (target / needed).is_file():
            raise RequestError(400, "path", f"adapter directory has no {needed}")
    return target
