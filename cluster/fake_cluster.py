"""A private multi-node Ray cluster on one machine, with Ray's autoscaler in charge of nodes.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``) starts a raylet per "node" on this
machine when the autoscaler launches one, and kills it when the autoscaler terminates it; the
autoscaler itself (monitor.py on the head) is the real one, reading the same config format as
cluster/ray-cluster.yaml. ``ray.cluster_utils.AutoscalingCluster`` wraps the same provider but
runs ``ray stop --force`` (which would kill every other Ray session on a shared machine) and
reads an example file the wheel does not ship, so this module starts the head itself:

- its own ports (GCS, client server, dashboard agent) and worker ports chosen by the OS;
- its own temp dir, so session files and logs never mix with other Ray sessions;
- no dashboard (2 cores: it costs seconds at start and CPU while running);
- shutdown kills exactly the processes whose command line names this temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from dlp.ports import free_port

HEAD_TYPE = "ray.head.default"
# 200 MB per node: the harness moves only small requests through the object store, and the
# default (30% of RAM per node) would reserve most of /dev/shm for a handful of fake nodes.
OBJECT_STORE_BYTES = 200 * 1024 * 1024


@dataclass
class NodeType:
    """One autoscaler node type: what each node advertises, and how many there may be."""

    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 1

    def to_config(self) -> dict[str, Any]:
        return {
            "resources": {**self.resources, "object_store_memory": OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
        }


@dataclass
class FakeCluster:
    head_resources: dict[str, float]
    worker_types: dict[str, NodeType]
    idle_timeout_s: float = 15.0
    upscaling_speed: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    # filled by start()
    temp_dir: Path | None = None
    gcs_address: str = ""

    def autoscaling_config(self, gcs_address: str) -> dict[str, Any]:
        """Same schema as cluster/ray-cluster.yaml, with the fake provider."""
        types = {name: t.to_config() for name, t in self.worker_types.items()}
        types[HEAD_TYPE] = {"resources": {}, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "dlp-autoscale-harness",
            "max_workers": sum(t.max_workers for t in self.worker_types.values()),
            "upscaling_speed": self.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_s / 60.0,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": gcs_address,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": types,
            "head_node_type": HEAD_TYPE,
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the head (and its autoscaler); returns the GCS address."""
        import ray._private.services as services

        # Short path: Ray puts unix sockets under it (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dlpas", dir="/tmp"))
        ip = services.get_node_ip_address()
        port = free_port()
        self.gcs_address = f"{ip}:{port}"
        config_path = self.temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(self.autoscaling_config(self.gcs_address)))
        head = dict(self.head_resources)
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={port}",
            f"--node-ip-address={ip}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_path}",
            f"--num-cpus={head.pop('CPU', 0)}",
            f"--num-gpus={head.pop('GPU', 0)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
        ]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        # `ray start` turns token auth on by default (Ray 2.60); this process connects to the
        # cluster too, so both must agree: off unless the caller chose otherwise.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env = {
            **os.environ,
            "RAY_FAKE_CLUSTER": "1",
            # the autoscaler's loop period; the default 5 s would blur the timeline
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            **self.env,
        }
        env.pop("RAY_ADDRESS", None)
        try:
            subprocess.run(
                cmd,
                env=env,
                check=True,
                timeout=timeout_s,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            self.shutdown()
            raise RuntimeError(f"ray start failed:\n{exc.stdout[-3000:]}") from exc
        except BaseException:
            self.shutdown()
            raise
        return self.gcs_address

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster.

        Ray's own processes name our temp dir or GCS address on their command line; the
        agents and workers rewrite theirs (``ray::IDLE``) but keep log files open under our
        temp dir. Nothing else on the machine matches either, so other Ray sessions are safe.
        """
        if self.temp_dir is None:
            return []
        marks = [str(self.temp_dir)] + ([self.gcs_address] if self.gcs_address else [])
        me = os.getpid()
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            pid = proc.info["pid"]
            if pid == me:
                continue
            args = " ".join(proc.info["cmdline"] or [])
            if any(m in args for m in marks) or _holds_file_under(pid, str(self.temp_dir)):
                found.append(proc)
        return found

    def shutdown(self, grace_s: float = 10.0, keep_logs: Path | None = None) -> int:
        """Stop our processes only (SIGTERM, then SIGKILL); returns how many were running."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        procs = self.processes()
        # Two passes: killing the GCS makes raylets and workers exit on their own, but workers
        # started late may not name the temp dir until they do, so look again afterwards.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            _, alive = psutil.wait_procs(procs, timeout=grace_s if sig == signal.SIGTERM else 5)
            procs = alive + [p for p in self.processes() if p not in alive]
            if not procs:
                break
        count = len(procs)
        if keep_logs is not None and self.temp_dir is not None:
            for logs in self.temp_dir.glob("session_*/logs"):
                shutil.copytree(logs, keep_logs, dirs_exist_ok=True)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return count

    def __enter__(self) -> FakeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _holds_file_under(pid: int, prefix: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or not ours to read
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def wait_for(predicate: Any, timeout_s: float, what: str, period_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(period_s)
