"""Issue 5 item 3: serve_config.yaml through Ray's CLI against `ray start --head`: start,
`serve deploy` (via `dlp serve --deploy`, the documented override path), wait for RUNNING,
call, shut down. Runs on its own Ray cluster (own ports); conftest orders it first so it
never overlaps the session cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from servekit import ADMIN_TOKEN, Assets

from dlp.ports import free_port

pytestmark = [pytest.mark.own_cluster, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    env["DLP_ADMIN_TOKEN"] = ADMIN_TOKEN
    env.pop("RAY_ADDRESS", None)
    return env


def test_dlp_serve_print_config_applies_overrides() -> None:
    out = subprocess.run(
        [
            str(BIN / "dlp"),
            "serve",
            "--print-config",
            "--set",
            "worker.num_gpus=1",
            "--set",
            "engine.device=cuda",
            "--http-port",
            "8123",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    args = config["applications"][0]["args"]
    assert args["worker"]["num_gpus"] == 1 and args["engine"]["device"] == "cuda"
    assert args["worker"]["num_cpus"] == 1  # untouched fields keep the file's values
    assert config["http_options"]["port"] == 8123
    bad = subprocess.run(
        [str(BIN / "dlp"), "serve", "--print-config", "--set", "worker.num_gpus=-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert bad.returncode == 2 and "num_gpus" in bad.stderr


def test_serve_deploy_cycle_against_ray_start(assets: Assets, tmp_path: Path) -> None:
    gcs, dash, http = free_port(), free_port(), free_port()
    ports = [free_port() for _ in range(6)]
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={ports[0]}",
            f"--dashboard-agent-listen-port={ports[1]}",
            f"--dashboard-agent-grpc-port={ports[2]}",
            f"--metrics-export-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            f"--node-manager-port={ports[5]}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # our own process group: we stop exactly what we started
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait(
            lambda: httpx.get(f"{address}/api/version", timeout=5).status_code == 200,
            180,
            "dashboard",
        )
        sets = [
            f"adapter_root={assets.root}",
            f"adapters_dir={assets.adapters_dir}",
            f"router_dir={assets.router_dir}",
            "worker.num_cpus=0.2",
            "router.num_cpus=0.1",
            "ingress.num_cpus=0.1",
            "limits.max_context_tokens=256",
            "limits.max_tokens_cap=32",
            "limits.default_max_tokens=8",
        ]
        cmd = [
            str(BIN / "dlp"),
            "serve",
            "--deploy",
            "--address",
            address,
            "--http-port",
            str(http),
        ]
        for s in sets:
            cmd += ["--set", s]
        done = subprocess.run(
            cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]

        def running() -> bool:
            st = subprocess.run(
                [str(BIN / "serve"), "status", "-a", address],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            status = yaml.safe_load(st.stdout or "{}") or {}
            app = (status.get("applications") or {}).get("dlp") or {}
            if app.get("status") == "DEPLOY_FAILED":
                raise AssertionError(f"deploy failed: {app.get('message')}")
            return app.get("status") == "RUNNING"

        _wait(running, 600, "app RUNNING")
        r = httpx.post(
            f"http://127.0.0.1:{http}/v1/completions",
            json={"model": "alpha", "prompt": "Hello", "max_tokens": 3},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["dlp"]["mix"] == {"alpha": 1.0}
        shut = subprocess.run(
            [str(BIN / "serve"), "shutdown", "-a", address, "-y"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shut.returncode == 0, shut.stderr[-2000:]
    finally:
        _stop(head, gcs)


def _wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, subprocess.TimeoutExpired) as exc:
            last = exc
        time.sleep(2)
    raise TimeoutError(f"{what} not reached in {timeout_s}s ({last})")


def _stop(head: subprocess.Popen, gcs_port: int) -> None:
    """SIGTERM the `ray start --block` process group (it tears its cluster down), and forget
    the cluster address it recorded, so a later ray.init() does not try to join it."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    current = Path("/tmp/ray/ray_current_cluster")
    try:
        if current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()
    except OSError:
        pass
