"""Router deployment (CPU): MiniMLP router + top-p selection, batched with @serve.batch.

Scales on queue length (ongoing requests per replica) between min and max replicas; the
model is a few MB so a new replica is up in about a second.
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from deployments.api_models import RequestError
from deployments.metrics import RouterMetrics
from dlp.errors import DlpError
from dlp.routing.router import RouterService
from dlp.routing.select import validate_selection

RouteArgs = tuple[float | None, int | None, str | None]


@serve.deployment(name="Router", max_ongoing_requests=64)
class RouterDeployment:
    def __init__(
        self,
        router_dir: str,
        p: float = 0.6,
        weighting: str = "softmax",
        max_adapters: int | None = None,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        import torch

        # One thread per replica: replicas share the node's cores, scaling is by replicas.
        torch.set_num_threads(1)
        self.service = RouterService.from_dir(
            router_dir, p=p, weighting=weighting, max_adapters=max_adapters
        )
        self.metrics = RouterMetrics()
        self._route_batch.set_max_batch_size(max_batch_size)
        self._route_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def labels(self) -> list[str]:
        return list(self.service.labels)

    async def route(
        self,
        text: str,
        p: float | None = None,
        max_adapters: int | None = None,
        weighting: str | None = None,
    ) -> dict[str, Any]:
        """One text -> ``{"mix", "key", "top1", "probs"}`` (batched with concurrent calls)."""
        try:
            validate_selection(
                self.service.selection.p if p is None else p,
                max_adapters,
                self.service.selection.weighting if weighting is None else weighting,
            )
        except DlpError as exc:  # checked here so one bad call cannot fail a whole batch
            raise RequestError(400, "routing", str(exc)) from exc
        return await self._route_batch((text, (p, max_adapters, weighting)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _route_batch(self, items: list[tuple[str, RouteArgs]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        out: list[dict[str, Any] | None] = [None] * len(items)
        # Calls with different selection settings share the router forward only per group;
        # in practice all calls use the defaults and form one group.
        groups: dict[RouteArgs, list[int]] = {}
        for i, (_, args) in enumerate(items):
            groups.setdefault(args, []).append(i)
        for (p, max_adapters, weighting), idx in groups.items():
            decisions = self.service.route(
                [items[i][0] for i in idx], p=p, max_adapters=max_adapters, weighting=weighting
            )
            for i, d in zip(idx, decisions, strict=True):
                out[i] = d.as_dict()
        self.metrics.latency_ms.observe((time.perf_counter() - start) * 1000)
        self.metrics.batch_size.observe(len(items))
        return out  # type: ignore[return-value]
