"""Adapter-aware request routing for the LoRA worker deployment.

Loading an adapter onto a replica costs a disk read and a host->device copy, and every
resident adapter takes a pool slot. So a request should go to a replica that already holds
the adapters of its mix. Two sources say which replica holds what:

- each replica publishes its resident adapter names as routing stats
  (``LoraWorker.record_routing_stats``, every ``routing_stats_period_s``);
- between two publications, this router remembers where it sent each adapter itself
  (a burst of a new mix must not fan out before the first stats arrive).

Ranking: replicas holding most of the mix's adapters first, as long as their queue is
shorter than ``spill_queue_len``; then every replica (Serve picks the shortest queue among a
rank and skips full ones). So a hot mix stays on one replica while that replica keeps up,
and spreads to the others once it saturates. Requests without a mix (admin calls) go to the
least loaded replica.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

log = logging.getLogger("ray.serve")

ROUTER_CLASS_PATH = "deployments.request_router.AdapterAffinityRouter"


def mix_names(pending: PendingRequest | None) -> tuple[str, ...]:
    """Adapter names of the request's mix (empty for calls that carry no WorkerRequest)."""
    if pending is None:
        return ()
    for arg in pending.args:
        names = getattr(arg, "mix_names", None)
        if names is not None:
            return tuple(names)
    return ()


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, spill_queue_len: int = 4, memory_s: float = 30.0, **_: Any) -> None:
        self._spill_queue_len = int(spill_queue_len)
        self._memory_s = float(memory_s)
        # replica -> adapter name -> when this router last sent it there
        self._sent: dict[ReplicaID, dict[str, float]] = {}

    # Routing memory -------------------------------------------------------------------------

    def _held(self, replica: RunningReplica, now: float) -> set[str]:
        stats = replica.routing_stats or {}
        held = set(stats.get("adapters", ()))
        sent = self._sent.get(replica.replica_id, {})
        held.update(n for n, t in sent.items() if now - t < self._memory_s)
        return held

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        names = mix_names(pending_request)
        if names:
            now = time.monotonic()
            sent = self._sent.setdefault(replica_id, {})
            for n in names:
                sent[n] = now

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in list(self._sent):
            if rid not in live:
                del self._sent[rid]

    # Ranking ------------------------------------------------------------------------------

    def _saturated(self, replica: RunningReplica) -> bool:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return queue_len is not None and queue_len >= self._spill_queue_len

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between retries when every replica is full (else the retry loop spins).
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        wanted = set(mix_names(pending_request))
        if not wanted:
            return [candidate_replicas]
        now = time.monotonic()
        overlap = {r.replica_id: len(wanted & self._held(r, now)) for r in candidate_replicas}
        best = max(overlap.values())
        if best == 0:
            # Nobody holds any of it: the least loaded replica takes it (and becomes its home).
            return [candidate_replicas]
        affine = [
            r
            for r in candidate_replicas
            if overlap[r.replica_id] == best and not self._saturated(r)
        ]
        ranks = [affine] if affine else []
        ranks.append(candidate_replicas)
        return ranks
