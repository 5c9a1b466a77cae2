"""The round-robin baseline router (deployments/request_router.py), through real Serve: a
three-replica deployment answers its replica id; sequential calls visit the replicas in a
fixed order, each once per turn, whatever the request."""

from __future__ import annotations

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.request_router import RoundRobinRouter

pytestmark = [pytest.mark.serve, pytest.mark.timeout(300)]

APP = "round_robin_probe"
REPLICAS = 3


@serve.deployment(
    num_replicas=REPLICAS,
    ray_actor_options={"num_cpus": 0.01},
    request_router_config=RequestRouterConfig(request_router_class=RoundRobinRouter),
)
class WhoAmI:
    def name(self, _payload: str = "") -> str:
        return serve.get_replica_context().replica_id.unique_id


def test_sequential_calls_take_turns(ray_cluster: int) -> None:
    handle = serve.run(WhoAmI.bind(), name=APP, route_prefix=f"/{APP}")
    try:
        # Serve may route the first calls before every replica is known to the handle.
        seen: list[str] = []
        for _ in range(50):
            seen.append(handle.name.remote("x").result(timeout_s=60))
            if len(set(seen[-REPLICAS:])) == REPLICAS:
                break
        calls = [handle.name.remote(str(i)).result(timeout_s=60) for i in range(4 * REPLICAS)]
        turn = calls[:REPLICAS]
        assert len(set(turn)) == REPLICAS, calls
        assert calls == turn * 4
        # the fixed order (by replica id), starting wherever the turn stood
        order = sorted(turn)
        k = order.index(turn[0])
        assert turn == order[k:] + order[:k]
    finally:
        serve.delete(APP)
