"""`dlp serve`: run the app from serve_config.yaml (`serve run`, or `serve deploy` with
--deploy), optionally with args overridden (`--set worker.num_gpus=1`): the GPU variant is
the same file with a few args changed, written to a temporary copy.

No Ray import here: this module only prepares the config and hands over to Ray's CLI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dlp.errors import DlpError

CONFIG_NAME = "serve_config.yaml"


def default_config_path() -> Path:
    """./serve_config.yaml if present, else the one in the source checkout."""
    here = Path.cwd() / CONFIG_NAME
    if here.is_file():
        return here
    return Path(__file__).resolve().parent.parent / CONFIG_NAME


def load_serve_config(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise DlpError(f"serve config {path} not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DlpError(f"serve config {path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict) or not config.get("applications"):
        raise DlpError(f"serve config {path} has no applications")
    return config


def apply_overrides(
    config: dict[str, Any], sets: list[str], http_port: int | None, app: str = "dlp"
) -> dict[str, Any]:
    """``--set`` values merged into the app's args (validated as an AppConfig)."""
    from dlp.config import AppConfig, deep_merge, parse_set_option

    apps = [a for a in config["applications"] if a.get("name") == app]
    if not apps:
        raise DlpError(f"serve config has no application named {app!r}")
    target = apps[0]
    args = dict(target.get("args") or {})
    for item in sets:
        args = deep_merge(args, parse_set_option(item))
    try:
        AppConfig.model_validate(args)
    except ValueError as exc:
        raise DlpError(f"invalid app args after --set: {exc}") from exc
    target["args"] = args
    if http_port is not None:
        config.setdefault("http_options", {})["port"] = http_port
    return config


def write_config(config: dict[str, Any]) -> Path:
    import yaml

    fd, name = tempfile.mkstemp(prefix="dlp-serve-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return Path(name)


def stale_cluster_file(path: Path = Path("/tmp/ray/ray_current_cluster")) -> bool:
    """True when `ray start` left its address file behind but nothing listens there any more
    (Ray would then try, and fail, to join that dead cluster instead of starting one)."""
    import socket

    try:
        host, _, port = path.read_text().strip().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


def serve_command(config_path: Path, deploy: bool, address: str | None) -> list[str]:
    serve_bin = Path(sys.executable).with_name("serve")
    cmd = [str(serve_bin) if serve_bin.exists() else "serve"]
    cmd += ["deploy", str(config_path)] if deploy else ["run", str(config_path)]
    if address:
        cmd += ["--address", address]
    return cmd


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the app from serve_config.yaml (serve run / serve deploy)",
        description=(
            "Same as `serve run serve_config.yaml`. --set KEY=VALUE overrides app args "
            "(dotted keys of dlp.config.AppConfig, e.g. worker.num_gpus=1, engine.device=cuda) "
            "in a temporary copy of the config; --deploy uses `serve deploy` against a "
            "running cluster (`ray start --head`)."
        ),
    )
    p.add_argument(
        "--config", type=Path, default=None, help=f"serve config (default: ./{CONFIG_NAME})"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an app arg (repeatable)",
    )
    p.add_argument("--http-port", type=int, default=None, help="override http_options.port")
    p.add_argument("--deploy", action="store_true", help="serve deploy to a running cluster")
    p.add_argument(
        "--address",
        default=None,
        help="Ray dashboard address for --deploy (default: Serve's own default)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the effective config and exit"
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import yaml

    path = args.config or default_config_path()
    config = load_serve_config(path)
    if args.sets or args.http_port is not None:
        config = apply_overrides(config, args.sets, args.http_port)
        path = write_config(config)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    env = dict(os.environ)
    # Ray 2.60 enables token auth for clusters started by `ray start`; dlp's local clusters
    # run without it, and the CLI must agree with the cluster.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    if not args.deploy and "RAY_ADDRESS" not in env and stale_cluster_file():
        env["RAY_ADDRESS"] = "local"  # start a fresh local cluster
    cmd = serve_command(path, args.deploy, args.address)
    print("+ " + " ".join(cmd), file=sys.stderr)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
