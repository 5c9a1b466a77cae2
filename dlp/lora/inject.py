"""Put FusedLoraLinear layers into a model (and take them out again, restoring it exactly)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from dlp.errors import DlpError
from dlp.lora.adapter import module_matches
from dlp.lora.fused import FusedLoraLinear, LoraBatchContext, LoraContextHolder
from dlp.lora.pool import AdapterPool


@dataclass
class FusedLoraHandle:
    """What :func:`inject_fused_lora` changed, and the context cell its layers read."""

    holder: LoraContextHolder
    originals: dict[str, nn.Linear] = field(default_factory=dict)
    fused: dict[str, FusedLoraLinear] = field(default_factory=dict)
    removed: bool = False

    def set_context(self, context: LoraBatchContext | None) -> None:
        self.holder.set_context(context)

    def clear_context(self) -> None:
        self.holder.clear()

    @contextmanager
    def use(self, context: LoraBatchContext | None) -> Iterator[None]:
        with self.holder.use(context):
            yield


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def inject_fused_lora(
    model: nn.Module,
    pool: AdapterPool,
    target_modules: str | Sequence[str] | None = None,
) -> FusedLoraHandle:
    """Replace each pool module (optionally only those matching ``target_modules``) of
    ``model`` by a FusedLoraLinear reading the pool's stacks. Returns the handle to set batch
    contexts on and to undo the injection with :func:`remove_fused_lora`."""
    modules = dict(model.named_modules())
    selected = [
        m for m in pool.modules if target_modules is None or module_matches(target_modules, m)
    ]
    if not selected:
        raise DlpError(f"target_modules {target_modules!r} select none of the pool's modules")
    for name in selected:
        module = modules.get(name)
        if isinstance(module, FusedLoraLinear):
            raise DlpError(f"{name} already holds a fused LoRA layer (injected twice?)")
        if not isinstance(module, nn.Linear):
            raise DlpError(f"model has no nn.Linear named {name!r} (found {type(module).__name__})")
        weight = module.weight
        if (weight.dtype, weight.device) != (pool.dtype, pool.a_stack(name).device):
            raise DlpError(
                f"{name} is {weight.dtype} on {weight.device}, the pool holds {pool.dtype} on "
                f"{pool.a_stack(name).device}: build the pool with AdapterPool.for_model(model)"
            )
    handle = FusedLoraHandle(LoraContextHolder())
    for name in selected:
        original = modules[name]
        fused = FusedLoraLinear(
            original, pool.a_stack(name), pool.b_t_stack(name), handle.holder, name
        )
        parent_name, child = _split(name)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
        handle.originals[name] = original
        handle.fused[name] = fused
    return handle


def remove_fused_lora(model: nn.Module, handle: FusedLoraHandle) -> None:
    """Put the original nn.Linear objects back where ``handle`` found them."""
    if handle.removed:
        return
    for name, original in handle.originals.items():
        parent_name, child = _split(name)
        parent = model.get_submodule(parent_name) if parent_name else model
        current = getattr(parent, child)
        if current is not handle.fused[name]:
            raise DlpError(f"{name} is no longer the fused layer this handle injected")
        setattr(parent, child, original)
    handle.holder.clear()
    handle.removed = True
