"""Evaluation-time multi-LoRA: every row of a batch runs with its own weighted adapter mix.

The evaluator compares many systems (base, oracle, DLP at several p, top-1, composite) whose
mixes differ per example. Instead of building one PEFT model per distinct mix, the adapters
are stacked once per target module and a forward hook adds, for each row b,
``sum_i w_bi * s_i * B_i A_i x_b`` through the project's fused op (dlp.lora.fused_ops).
This is PEFT's ``add_weighted_adapter(combination_type="cat")`` output, computed for the whole
batch at once; ``tests/dlp/eval/test_lora_mix.py`` checks the two against each other.
Adapters of different ranks are kept in separate stacks so the rank-64 composite does not pad
the rank-8 task adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dlp.errors import DlpError
from dlp.lora.adapter import LoraAdapter, base_linear_shapes, load_adapter
from dlp.lora.fused_ops import lora_delta


@dataclass
class _Group:
    """Adapters of one rank that touch one module: stacked A/B plus their column indices."""

    columns: torch.Tensor  # [S] long: index of each stacked adapter in the global name list
    scaling: torch.Tensor  # [S] float: s_i of each adapter for this module
    a_stack: torch.Tensor  # [S, R, in]
    b_stack: torch.Tensor  # [S, out, R]


class MultiLoraModel:
    """Hooks a base model so each forward runs with per-row adapter weights.

    ``names`` fixes the column order of the weight matrices passed to :meth:`mixing`.
    Outside a ``mixing`` block the model is the plain base model.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter]) -> None:
        if not adapters:
            raise DlpError("adapters: need at least one adapter")
        self.model = model
        self.names = [a.name for a in adapters]
        if len(set(self.names)) != len(self.names):
            raise DlpError("adapters: names must be unique")
        param = next(model.parameters())
        modules = dict(model.named_modules())
        self._groups: dict[str, list[_Group]] = {}
        for module_name in sorted({m for a in adapters for m in a.weights}):
            if not isinstance(modules.get(module_name), nn.Linear):
                raise DlpError(f"adapters: base model has no linear module {module_name!r}")
            by_rank: dict[int, list[int]] = {}
            for col, adapter in enumerate(adapters):
                if module_name in adapter.weights:
                    rank = adapter.weights[module_name][0].shape[0]
                    by_rank.setdefault(rank, []).append(col)
            groups = []
            for cols in by_rank.values():
                pairs = [adapters[c].weights[module_name] for c in cols]
                groups.append(
                    _Group(
                        columns=torch.tensor(cols, device=param.device),
                        scaling=torch.tensor(
                            [adapters[c].scaling_of(module_name) for c in cols],
                            device=param.device,
                            dtype=torch.float32,
                        ),
                        a_stack=torch.stack([a for a, _ in pairs]).to(param),
                        b_stack=torch.stack([b for _, b in pairs]).to(param),
                    )
                )
            self._groups[module_name] = groups
        self._weights: torch.Tensor | None = None
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in self._groups
        ]

    @classmethod
    def from_dirs(
        cls, model: nn.Module, dirs: Sequence[Path], names: Sequence[str] | None = None
    ) -> MultiLoraModel:
        """Load PEFT adapter directories (validated against the model) and hook them."""
        shapes = base_linear_shapes(model)
        names = list(names) if names is not None else [Path(d).name for d in dirs]
        adapters = [
            load_adapter(d, name=n, base_shapes=shapes, max_rank=1024)
            for d, n in zip(dirs, names, strict=True)
        ]
        return cls(model, adapters)

    def _hook(self, module_name: str):
        groups = self._groups[module_name]

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
            weights = self._weights
            if weights is None:
                return output
            x = args[0]
            if weights.shape[0] != x.shape[0]:
                raise DlpError(
                    f"adapter weights have {weights.shape[0]} rows, the batch has {x.shape[0]}"
                )
            for g in groups:
                row_scales = weights.index_select(1, g.columns) * g.scaling
                if not bool(row_scales.any()):
                    continue  # nobody in this batch uses these adapters: skip their GEMMs
                output = output + lora_delta(x, g.a_stack, g.b_stack, None, row_scales).to(
                    output.dtype
                )
            return output

        return hook

    @contextlib.contextmanager
    def mixing(self, weights: torch.Tensor) -> Iterator[None]:
        """Run forwards inside this block with ``weights[b, i]`` for row b and adapter i."""
        if weights.dim() != 2 or weights.shape[1] != len(self.names):
            raise DlpError(
                f"adapter weights must have shape [rows, {len(self.names)}], "
                f"got {tuple(weights.shape)}"
            )
        device = next(self.model.parameters()).device
        self._weights = weights.to(device=device, dtype=torch.float32)
        try:
            yield
        finally:
            self._weights = None

    def remove(self) -> None:
        """Take the hooks off: the model is the plain base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
