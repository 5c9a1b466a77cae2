"""One Ray cluster and one `dlp` app for the whole test session (real Serve, real model).

The app runs the embedded default model with small random adapters (written in the PEFT
format) and a router saved untrained (its decisions are still deterministic; tests compare
them with the same router run in-process). Two LoRA worker replicas with fractional CPUs,
so adapter-aware routing is exercised by every test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servekit import (
    ADAPTERS,
    ADMIN_TOKEN,
    APP_NAME,
    Assets,
    Served,
    app_args,
    wait_healthy,
    write_adapter,
    write_router,
)

from dlp.ports import free_port


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    base = tmp_path_factory.mktemp("dlp-serve")
    root = base / "adapter_root"
    initial = root / "initial"
    initial.mkdir(parents=True)
    for i, name in enumerate(ADAPTERS):
        write_adapter(initial, name, seed=i + 1)
    router_dir = write_router(base / "router", ADAPTERS)
    return Assets(root=root, adapters_dir=initial, router_dir=router_dir, cache_dir=base)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        address="local",  # a new cluster, never one a `ray start` left behind
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DLP_ADMIN_TOKEN": ADMIN_TOKEN}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def served(ray_cluster: int, assets: Assets) -> Served:
    """The app, deployed once; tests share it (keep it healthy: restore what you change)."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(app_args(assets)), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{ray_cluster}"
    wait_healthy(url, timeout_s=300)
    return Served(url=url, assets=assets)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests with their own Ray cluster run first, before the session cluster exists."""
    own = [i for i in items if i.get_closest_marker("own_cluster")]
    rest = [i for i in items if not i.get_closest_marker("own_cluster")]
    items[:] = own + rest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_cluster: starts its own Ray cluster (runs first)")
