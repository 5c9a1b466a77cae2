"""LoRA adapters in the PEFT on-disk format: load (validated, safetensors only), save, make random.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
keys like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. We key weights
by the *base model's* module name (``model.layers.0.self_attn.q_proj``) so that the pool and
the fused layers never see PEFT's wrapper prefixes.

Everything that could make a served adapter silently wrong is refused with one
``AdapterValidationError`` naming the file and the field: pickle files (never opened), PEFT
features we do not compute (DoRA, biases, modules_to_save, ...), modules the base model does
not have, shapes that do not fit, ranks that disagree, NaN/Inf, ranks above the pool's slots.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dlp.errors import AdapterValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Formats that are (or may be) pickles: we refuse them by name and never open them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_PEFT_PREFIX = "base_model.model."
# "<module>.lora_A.weight" or "<module>.lora_A.<adapter_name>.weight" (both occur in the wild).
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")

# Config fields that change the math we would have to compute. A truthy value is refused.
_UNSUPPORTED_TRUTHY = {
    "use_dora": "DoRA (use_dora=true)",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D layers)",
    "modules_to_save": "modules_to_save (full replacement modules)",
    "lora_bias": "lora_bias=true",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "use_bdlora": "use_bdlora=true",
}


@dataclass
class LoraAdapter:
    """One LoRA adapter in memory.

    ``weights[module] = (A [r, in], B [out, r])``; the update of that module is
    ``scaling_of(module) * B @ A @ x``. ``scaling`` is the adapter-wide s_i (alpha/r, or
    alpha/sqrt(r) with rsLoRA); ``module_scaling`` holds the few modules whose rank_pattern /
    alpha_pattern give them a different one.
    """

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_model_name: str | None = None
    module_scaling: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def scaling_of(self, module: str) -> float:
        return self.module_scaling.get(module, self.scaling)

    @property
    def max_module_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.weights.values()
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values()))[0].dtype


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def base_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` for every nn.Linear of ``model``."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def module_matches(targets: str | Iterable[str], module: str) -> bool:
    """PEFT's target_modules rule: a regex string must fullmatch the name; a list matches a
    name equal to an entry or ending in ``.entry``. ``"all-linear"`` is resolved by the caller."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_value(pattern: Mapping[str, Any], module: str) -> Any | None:
    # PEFT's get_pattern_key: the first key that matches as a dotted suffix (regex allowed).
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _fail(path: Path, message: str) -> AdapterValidationError:
    return AdapterValidationError(f"adapter {path}: {message}")


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise _fail(path, f"missing {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise _fail(path, f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail(path, f"peft_type {peft_type!r} is not supported (only LORA)")
    for key, what in _UNSUPPORTED_TRUTHY.items():
        if config.get(key):
            raise _fail(path, f"unsupported PEFT feature: {what} (field {key!r})")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise _fail(path, f"unsupported PEFT feature: bias={bias!r} (field 'bias', need 'none')")
    return config


def _positive_number(path: Path, config: Mapping[str, Any], key: str, *, integer: bool) -> Any:
    value = config.get(key)
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not value > 0:
        raise _fail(
            path,
            f"field {key!r} must be a positive {'integer' if integer else 'number'}, got {value!r}",
        )
    if not integer and not math.isfinite(value):
        raise _fail(path, f"field {key!r} must be finite, got {value!r}")
    return value


def _check_no_pickle_only(path: Path) -> None:
    if (path / WEIGHTS_FILE).is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _fail(
            path,
            f"weights are only in pickle file(s) {pickles}; pickles are never loaded, "
            f"convert them to {WEIGHTS_FILE}",
        )
    raise _fail(path, f"missing {WEIGHTS_FILE}")


def load_adapter(
    path: str | Path,
    *,
    name: str | None = None,
    base_shapes: Mapping[str, tuple[int, int]] | None = None,
    max_rank: int = 64,
    dtype: torch.dtype | None = None,
) -> LoraAdapter:
    """Load and validate a PEFT LoRA adapter directory (safetensors only; pickles refused).

    ``base_shapes`` (from :func:`base_linear_shapes`) enables the checks against the base model:
    every weight must belong to one of its linear modules, with matching in/out features.
    """
    path = Path(path)
    if not path.is_dir():
        raise _fail(path, "not a directory (need adapter_config.json + adapter_model.safetensors)")
    config = _read_config(path)
    _check_no_pickle_only(path)

    rank = _positive_number(path, config, "r", integer=True)
    alpha = float(_positive_number(path, config, "lora_alpha", integer=False))
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for key, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise _fail(path, f"field {key!r} must be an object")
        for pkey, value in pattern.items():
            _positive_number(
                path, {f"{key}[{pkey}]": value}, f"{key}[{pkey}]", integer=key == "rank_pattern"
            )

    raw_targets = config.get("target_modules")
    if isinstance(raw_targets, str):
        targets: str | tuple[str, ...] = raw_targets
    elif (
        isinstance(raw_targets, list)
        and raw_targets
        and all(isinstance(t, str) and t for t in raw_targets)
    ):
        targets = tuple(sorted(raw_targets))
    else:
        raise _fail(
            path,
            f"field 'target_modules' must be a regex or a non-empty list of names, "
            f"got {raw_targets!r}",
        )

    pairs = _read_weights(path, dtype)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    module_scaling: dict[str, float] = {}
    adapter_scaling = lora_scaling(alpha, rank, use_rslora)
    for module, (a, b) in sorted(pairs.items()):
        if a is None or b is None:
            raise _fail(path, f"module {module!r} has lora_{'A' if a is None else 'B'} missing")
        if a.dim() != 2 or b.dim() != 2:
            raise _fail(
                path,
                f"module {module!r}: lora_A/lora_B must be 2-D, got "
                f"{tuple(a.shape)} / {tuple(b.shape)}",
            )
        r_a, d_in = a.shape
        d_out, r_b = b.shape
        if r_a != r_b:
            raise _fail(
                path,
                f"module {module!r}: A/B rank mismatch, lora_A has rank {r_a}, "
                f"lora_B has rank {r_b}",
            )
        expected_rank = _pattern_value(rank_pattern, module) or rank
        if r_a != expected_rank:
            raise _fail(
                path,
                f"module {module!r}: rank {r_a} in the weights but {expected_rank} "
                f"in {CONFIG_FILE} (field 'r'/'rank_pattern')",
            )
        if r_a > max_rank:
            raise _fail(
                path,
                f"module {module!r}: rank {r_a} is above the maximum rank "
                f"{max_rank} of this server",
            )
        if base_shapes is not None:
            if module not in base_shapes:
                raise _fail(
                    path,
                    f"unknown target module {module!r}: the base model has no "
                    f"linear layer of that name",
                )
            base_in, base_out = base_shapes[module]
            if (d_in, d_out) != (base_in, base_out):
                raise _fail(
                    path,
                    f"module {module!r}: shape mismatch with the base model, "
                    f"adapter maps {d_in}->{d_out}, base layer {base_in}->{base_out}",
                )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise _fail(path, f"module {module!r}: non-finite values (NaN or Inf) in the weights")
        module_alpha = _pattern_value(alpha_pattern, module) or alpha
        scale = lora_scaling(float(module_alpha), r_a, use_rslora)
        if scale != adapter_scaling:
            module_scaling[module] = scale
        weights[module] = (a.contiguous(), b.contiguous())
    if not weights:
        raise _fail(path, f"{WEIGHTS_FILE} holds no LoRA weights")

    if base_shapes is not None:
        _check_targets_exist(path, targets, base_shapes, weights)

    return LoraAdapter(
        name=name or path.name,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=(targets,) if isinstance(targets, str) else targets,
        weights=weights,
        base_model_name=config.get("base_model_name_or_path"),
        module_scaling=module_scaling,
        rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
    )


def _read_weights(path: Path, dtype: torch.dtype | None) -> dict[str, list[torch.Tensor | None]]:
    pairs: dict[str, list[torch.Tensor | None]] = {}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                stripped = key.removeprefix(_PEFT_PREFIX)
                match = _KEY_RE.match(stripped)
                if match is None:
                    raise _fail(
                        path,
                        f"unsupported tensor {key!r} in {WEIGHTS_FILE} (only "
                        f"lora_A / lora_B weights are supported)",
                    )
                tensor = handle.get_tensor(key)
                if not tensor.is_floating_point():
                    raise _fail(path, f"tensor {key!r} has dtype {tensor.dtype}, need a float")
                if dtype is not None:
                    tensor = tensor.to(dtype)
                slot = pairs.setdefault(match["module"], [None, None])
                index = 0 if match["ab"] == "A" else 1
                if slot[index] is not None:
                    raise _fail(
                        path, f"module {match['module']!r} has two lora_{match['ab']} tensors"
                    )
                slot[index] = tensor
    except (SafetensorError, OSError) as exc:
        raise _fail(path, f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    return pairs


def _check_targets_exist(
    path: Path,
    targets: str | tuple[str, ...],
    base_shapes: Mapping[str, tuple[int, int]],
    weights: Mapping[str, Any],
) -> None:
    if targets == "all-linear" or targets == ("all-linear",):
        return
    if isinstance(targets, str):
        if not any(module_matches(targets, m) for m in base_shapes):
            raise _fail(
                path,
                f"unknown target modules: regex {targets!r} matches no linear "
                f"layer of the base model",
            )
        return
    missing = [t for t in targets if not any(module_matches((t,), m) for m in base_shapes)]
    if missing:
        raise _fail(
            path,
            f"unknown target modules {missing}: the base model has no linear layer with that name",
        )
    stray = [m for m in weights if not module_matches(targets, m)]
    if stray:
        raise _fail(path, f"weights for modules {stray[:3]} that target_modules does not name")


def save_adapter(
    adapter: LoraAdapter, path: str | Path, base_model_name: str | None = None
) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory that PeftModel.from_pretrained can read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or adapter.base_model_name,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": (
            adapter.target_modules[0]
            if len(adapter.target_modules) == 1 and not _is_plain_name(adapter.target_modules[0])
            else sorted(adapter.target_modules)
        ),
        "rank_pattern": adapter.rank_pattern,
        "alpha_pattern": adapter.alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in adapter.weights.items():
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def _is_plain_name(target: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.\-]+", target) is not None


def random_adapter(
    name: str,
    base_shapes: Mapping[str, tuple[int, int]],
    targets: Iterable[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16.0,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    use_rslora: bool = False,
    b_std: float = 0.02,
) -> LoraAdapter:
    """A LoRA adapter with random A and (non-zero, unlike PEFT's init) B, for tests and benches.

    A ~ N(0, 1/in) keeps A x at unit scale; ``b_std`` sets how far the adapter moves outputs.
    """
    targets = tuple(sorted(targets))
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (d_in, d_out) in sorted(base_shapes.items()):
        if not module_matches(targets, module):
            continue
        a = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=generator) * b_std
        weights[module] = (a.to(dtype), b.to(dtype))
    if not weights:
        raise AdapterValidationError(f"random adapter {name!r}: targets {targets} match no module")
    return LoraAdapter(
        name=name,
        rank=rank,
        alpha=float(alpha),
        use_rslora=use_rslora,
        target_modules=targets,
        weights=weights,
    )
