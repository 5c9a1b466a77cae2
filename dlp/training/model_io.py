"""Load the base model for training / evaluation, from the converted cache dir or a GGUF.

The GGUF path exists for machines where the converted safetensors copy (540 MB in float32)
cannot travel but the 98 MB GGUF of the embedded default can: the tokenizer and chat template
then come from a converted dir (``--model``), the weights from the GGUF, dequantized by
transformers exactly as ``dlp.base_model`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dlp.errors import DlpError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DlpError(f"device: {device} requested but CUDA is not available")
    return torch.device(device)


def load_model(
    model_dir: Path | None = None, gguf: Path | None = None, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in float32 on ``device``, tokenizer); eval mode, gradients off for the base."""
    import torch

    dev = resolve_device(device)
    if gguf is None:
        from dlp.base_model import load_base_model

        model, tokenizer = load_base_model(model_dir, dtype=torch.float32, device=dev)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = Path(gguf)
        if not gguf.is_file():
            raise DlpError(f"gguf: {gguf} not found")
        if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
            raise DlpError("model: with --gguf, --model must name a dir holding the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        model.to(dev)
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return model, tokenizer
