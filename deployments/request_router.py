"""Adapter-aware request routing for the LoRA worker deployment.

Loading an adapter onto a replica costs a disk read and a host->device copy, and every
resident adapter takes a pool slot. So a request should go to a replica that already holds
the adapters of its mix *in its device slots*. Two sources say which replica holds what:

- each replica publishes its device-resident adapters (``resident``, least recently used
  first) and everything it holds on the host tier too (``adapters``) as routing stats
  (``LoraWorker.record_routing_stats``, every ``routing_stats_period_s``);
- between two publications, this router remembers where it sent each adapter itself (a
  burst of a new mix must not fan out before the first stats arrive).

The two are merged into a model of each replica's LRU slots: the published list, then this
router's sends of the last few stats periods (more recent than the snapshot), keeping the
last ``pool_slots`` names. Matching the host tier alone is not enough: once the host tiers
of all replicas hold every adapter (they are large), it no longer tells replicas apart.

Ranking: replicas whose slots hold most of the mix's adapters (ties broken by the host
tier) first, as long as their queue is shorter than ``spill_queue_len``. When every such
replica is at that length, the mix spreads to a replica that is not (Serve picks the
shortest queue); when every replica is, it stays where its adapters are (spreading would
only add loads, nobody has spare room) as long as those replicas' queues are within
``spill_queue_len`` of the shortest; beyond that it goes to the shorter queues (a saturated
cluster must not idle one replica while another queues). Serve skips full replicas
(max_ongoing_requests) and then tries every replica. Requests without a mix (admin calls)
go to the least loaded.
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


def _routable(candidates: list[RunningReplica], pending: PendingRequest | None) -> bool:
    """Common start of choose_replicas: ask Serve to back off between retries when every
    replica is full (else its retry loop spins); False when there is nobody to choose."""
    if pending is not None:
        pending.routing_context.should_backoff = True
    return bool(candidates)


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(
        self,
        spill_queue_len: int = 4,
        pool_slots: int | None = None,
        memory_s: float = 3.0,
        **_: Any,
    ) -> None:
        self._spill_queue_len = int(spill_queue_len)
        self._slots = int(pool_slots) if pool_slots else None
        # How long this router's own sends count on top of the published stats: a few stats
        # periods (older sends are in the published snapshot, or were evicted since).
        self._memory_s = float(memory_s)
        # replica -> adapter name -> when this router last sent it there (oldest first)
        self._sent: dict[ReplicaID, dict[str, float]] = {}

    # Routing memory -------------------------------------------------------------------------

    def _slot_model(self, replica: RunningReplica, now: float) -> set[str]:
        """Adapters this replica most likely holds in its device slots right now."""
        stats = replica.routing_stats or {}
        # Older workers publish only `adapters` (host + device).
        published = list(stats.get("resident", stats.get("adapters", ())))
        sent = self._sent.get(replica.replica_id, {})
        recent = [n for n, t in sent.items() if now - t < self._memory_s]
        lru = dict.fromkeys(n for n in published if n not in recent)
        lru.update(dict.fromkeys(recent))  # most recent last, like the pool's LRU
        names = list(lru)
        return set(names[-self._slots :] if self._slots else names)

    @staticmethod
    def _host_held(replica: RunningReplica) -> set[str]:
        return set((replica.routing_stats or {}).get("adapters", ()))

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        names = mix_names(pending_request)
        if names:
            now = time.monotonic()
            sent = self._sent.setdefault(replica_id, {})
            for n in names:
                sent.pop(n, None)  # re-insert: dicts keep insertion order = recency
                sent[n] = now
            if len(sent) > 4 * (self._slots or 16):
                for n in list(sent)[: len(sent) // 2]:
                    del sent[n]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in list(self._sent):
            if rid not in live:
                del self._sent[rid]

    # Ranking ------------------------------------------------------------------------------

    def _queue_len(self, replica: RunningReplica) -> int:
        """Requests on the replica as last probed (0 when unknown: it will be probed)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _saturated(self, replica: RunningReplica) -> bool:
        return self._queue_len(replica) >= self._spill_queue_len

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not _routable(candidate_replicas, pending_request):
            return []
        wanted = set(mix_names(pending_request))
        if not wanted:
            return [candidate_replicas]
        now = time.monotonic()
        score = {
            r.replica_id: (
                len(wanted & self._slot_model(r, now)),
                len(wanted & self._host_held(r)),
            )
            for r in candidate_replicas
        }
        best = max(score.values())
        if best == (0, 0):
            # Nobody holds any of it: the least loaded replica takes it (and becomes its home).
            return [candidate_replicas]
        holders = [r for r in candidate_replicas if score[r.replica_id] == best]
        affine = [r for r in holders if not self._saturated(r)]
        if affine:
            return [affine, candidate_replicas]
        spill = [r for r in candidate_replicas if not self._saturated(r)]
        if spill:
            return [spill, candidate_replicas]
        # Every replica is saturated: the adapters' holders keep the mix, unless a holder's
        # queue is longer than the shortest by spill_queue_len or more. Else a saturated
        # cluster piles every mix one replica holds onto it while another idles through its
        # queue (a load costs well under a millisecond on a GPU; an idle replica, its rows).
        shortest = min(self._queue_len(r) for r in candidate_replicas)
        close = [r for r in holders if self._queue_len(r) - shortest < self._spill_queue_len]
        return [close or candidate_replicas, candidate_replicas]


class RoundRobinRouter(RequestRouter):
    """Plain round-robin: the replicas in a fixed order (by replica id), one request each in
    turn, whatever they hold. The baseline adapter-aware routing is measured against
    (benchmarks/affinity_bench.py, benchmarks/multigpu_bench.py); not meant for serving.

    When the replica whose turn it is is full (max_ongoing_requests), Serve tries the others
    (the second rank), as any router would rather than queue behind it."""

    def initialize_state(self, **_: Any) -> None:
        self._turn = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not _routable(candidate_replicas, pending_request):
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        chosen = ordered[self._turn % len(ordered)]
        self._turn += 1
        return [[chosen], ordered]
