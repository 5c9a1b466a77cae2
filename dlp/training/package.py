"""Adapter sets on disk: a folder of PEFT adapter dirs plus ``manifest.json`` (sha256 of each
file, the recipe and command that made them). Used for the adapters shipped in the repo
(``dlp/assets/adapters``) and for the copies ``dlp setup`` installs into the cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlp.errors import DlpError
from dlp.hashing import sha256_file
from dlp.training.adapters import ADAPTER_FILES

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def write_set(
    src: Path,
    dest: Path,
    names: Sequence[str],
    info: dict[str, Any],
) -> dict[str, Any]:
    """Copy adapters ``names`` from ``src`` into ``dest`` and write the manifest (last)."""
    dest.mkdir(parents=True, exist_ok=True)
    adapters: dict[str, Any] = {}
    for name in names:
        out = dest / name
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for fname in ADAPTER_FILES:
            source = src / name / fname
            if not source.is_file():
                raise DlpError(f"adapters: {source} is missing")
            if source.resolve() != (out / fname).resolve():
                shutil.copyfile(source, out / fname)
            files[fname] = sha256_file(out / fname)
        config = json.loads((out / "adapter_config.json").read_text())
        adapters[name] = {
            "rank": config.get("r"),
            "alpha": config.get("lora_alpha"),
            "target_modules": sorted(config.get("target_modules") or []),
            "bytes": sum((out / f).stat().st_size for f in ADAPTER_FILES),
            "sha256": files,
        }
    manifest = {"format": MANIFEST_FORMAT, **info, "adapters": adapters}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_set(directory: Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Check every listed file against its sha256; returns the adapter names, or raises."""
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise DlpError(f"adapters: {directory / MANIFEST} is missing or unreadable")
    for name, entry in manifest["adapters"].items():
        for fname, digest in entry["sha256"].items():
            path = directory / name / fname
            if not path.is_file():
                raise DlpError(f"adapters: {path} is missing")
            if sha256_file(path) != digest:
                raise DlpError(f"adapters: {path} does not match its sha256 in {MANIFEST}")
    return list(manifest["adapters"])


def copy_set(src: Path, dest: Path) -> dict[str, Any]:
    """Verify ``src`` and install its adapters into ``dest``, one dir at a time (copied to
    ``<name>.partial`` then renamed), the manifest last: an interrupted copy has no manifest
    and is redone. Other dirs in ``dest`` (adapters registered later) are left alone."""
    manifest = read_manifest(src)
    if manifest is None:
        raise DlpError(f"adapters: {src / MANIFEST} is missing or unreadable")
    verify_set(src, manifest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)
    for name in manifest["adapters"]:
        partial = dest / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src / name, partial)
        shutil.rmtree(dest / name, ignore_errors=True)
        partial.rename(dest / name)
    shutil.copyfile(src / MANIFEST, dest / MANIFEST)
    return manifest


def _provenance(
    training: dict[str, Any],
    names: Sequence[str],
    previous: dict[str, Any] | None,
    machine: str,
) -> dict[str, Any]:
    """Manifest fields saying how each adapter was made. A resumed run (``--skip-existing``)
    trained only some adapters; the ones it skipped keep the provenance of ``previous`` (the
    manifest of the set it resumed), so a set made in two runs lists both in ``runs``."""
    stats = training["adapters"]
    trained = [n for n in names if not stats[n].get("skipped")]
    kept = [n for n in names if stats[n].get("skipped")]
    if kept and previous is None:
        raise DlpError(
            f"adapters {', '.join(kept)} were skipped by this run; "
            "--previous must name the manifest they came from"
        )
    steps = {n: stats[n]["steps"] for n in trained}
    final_loss = {n: stats[n]["last_loss"] for n in trained}
    this_run = {
        "command": training.get("command", ""),
        "machine": machine,
        "recipe": training.get("plan", {}),
        "training_seconds": training.get("seconds"),
        "adapters": trained,
    }
    runs = [this_run]
    if previous is not None and kept:
        missing = [n for n in kept if n not in previous.get("adapters", {})]
        if missing:
            raise DlpError(f"--previous: no entry for skipped adapter(s) {', '.join(missing)}")
        earlier = previous.get("runs") or [
            {
                "command": previous.get("command", ""),
                "machine": previous.get("script", ""),
                "recipe": previous.get("recipe", {}),
                "adapters": list(previous.get("adapters", {})),
            }
        ]
        for run in earlier:
            run = {**run, "adapters": [n for n in run["adapters"] if n in kept]}
            if run["adapters"]:
                runs.insert(0, run)
        steps.update({n: previous.get("steps", {}).get(n) for n in kept})
        final_loss.update({n: previous.get("final_loss", {}).get(n) for n in kept})
    from dlp.data.tasks import POOL

    missing_tasks = sorted({t.name for t in POOL} - set(names))
    return {
        "kind": "trained",
        "complete": not missing_tasks,
        "missing_tasks": missing_tasks,
        "command": this_run["command"],
        "recipe": this_run["recipe"],
        "runs": runs,
        "steps": {n: steps[n] for n in names},
        "final_loss": {n: final_loss[n] for n in names},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m dlp.training.package SRC DEST``: turn a ``dlp train-adapters`` output dir
    into a shipped set (task adapters only; the composite is an evaluation baseline)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("src", type=Path, help="dir written by dlp train-adapters")
    parser.add_argument("dest", type=Path, help="e.g. dlp/assets/adapters")
    parser.add_argument(
        "--quality",
        type=Path,
        default=None,
        help="quality.json whose headline numbers go into the manifest",
    )
    parser.add_argument("--note", default="", help="free text: machine, run")
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="manifest of the set a resumed run (--skip-existing) started from: the adapters "
        "it skipped keep that manifest's provenance",
    )
    parser.add_argument("--machine", default="", help="where this training run ran")
    args = parser.parse_args(argv)
    try:
        training = json.loads((args.src / "training.json").read_text())
        previous = None
        if args.previous is not None:
            previous = json.loads(args.previous.read_text())
        names = [n for n in training["tasks"]]
        info = _provenance(training, names, previous, args.machine)
        info["note"] = args.note
        if args.quality is not None:
            quality = json.loads(args.quality.read_text())
            info["quality"] = {
                k: quality.get(k)
                for k in ("router_top1", "mcq_accuracy", "generative_rougeL", "mixed_task")
            }
        write_set(args.src, args.dest, names, info)
        verify_set(args.dest)
    except (OSError, KeyError, ValueError, DlpError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(names)} adapters packaged into {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
