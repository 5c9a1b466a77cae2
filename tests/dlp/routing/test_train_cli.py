"""train_router, ensure_default_router and the CLI commands on a small synthetic task pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from routing_synth import TASKS, make_split

from dlp.cli import main
from dlp.errors import DlpError
from dlp.paths import data_dir, model_dir, router_dir
from dlp.routing.router import CONFIG_FILE, WEIGHTS_FILE, MiniMLPRouter, RouterConfig
from dlp.routing.train import TrainSettings, ensure_default_router, train_router

SMALL = RouterConfig(vocab_size=65, embed_dim=16, hash_buckets=512, hidden=(32,), dropout=0.0)
FAST = TrainSettings(lr=1e-2)


def test_train_router_end_to_end(task_data_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "router"
    report = train_router(
        task_data_dir,
        out,
        seed=0,
        epochs=15,
        patience=3,
        tokenizer=tiny_tokenizer,
        tokenizer_ref="tok-ref",
        config=SMALL,
        settings=FAST,
        progress=False,
    )
    assert report.labels == sorted(TASKS)
    assert report.test_accuracy == 1.0 and report.n_test == 20 * len(TASKS)
    assert set(report.per_task_test_accuracy) == set(TASKS)
    assert 1 <= report.best_epoch <= report.epochs_run <= 15
    assert report.parameters == MiniMLPRouter.load(out, tokenizer=tiny_tokenizer).num_parameters()
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["tokenizer"] == "tok-ref"
    assert meta["metadata"]["seed"] == 0 and len(meta["metadata"]["data_sha256"]) == 64
    assert meta["metadata"]["test_accuracy"] == 1.0


def test_train_router_missing_data(tmp_path: Path, tiny_tokenizer) -> None:
    with pytest.raises(DlpError, match="no task data"):
        train_router(tmp_path, tmp_path / "out", tokenizer=tiny_tokenizer, progress=False)


@pytest.fixture()
def cache_root(tmp_path: Path, task_data_dir: Path, tokenizer_dir: Path) -> Path:
    """A cache root laid out like `dlp setup` leaves it, with the synthetic data + tokenizer."""
    root = tmp_path / "cache"
    shutil.copytree(task_data_dir, data_dir(root))
    shutil.copytree(tokenizer_dir, model_dir(root))
    return root


def test_ensure_default_router_is_idempotent(cache_root: Path, monkeypatch) -> None:
    import dlp.routing.train as train_mod

    # The real default shape is ~5M parameters; the synthetic vocabulary needs far less.
    real = train_mod.train_router

    def small(*args, **kwargs):
        return real(*args, **kwargs, config=SMALL, settings=FAST, progress=False)

    monkeypatch.setattr(train_mod, "train_router", small)
    path = ensure_default_router(cache_root)
    assert path == router_dir(cache_root)
    assert (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()
    stamp = (path / WEIGHTS_FILE).stat().st_mtime_ns
    assert ensure_default_router(cache_root) == path
    assert (path / WEIGHTS_FILE).stat().st_mtime_ns == stamp  # not retrained
    assert not list(path.parent.glob("router.tmp-*"))
    # New data -> the recorded hash no longer matches -> retrained.
    table = data_dir(cache_root) / "tasks.parquet"
    table.write_bytes(table.read_bytes())  # same bytes: still current
    assert ensure_default_router(cache_root) == path
    assert (path / WEIGHTS_FILE).stat().st_mtime_ns == stamp
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["metadata"]["data_sha256"] = "stale"
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    ensure_default_router(cache_root)
    assert json.loads((path / CONFIG_FILE).read_text())["metadata"]["data_sha256"] != "stale"
    router = MiniMLPRouter.load(path)  # tokenizer found through the recorded reference
    texts, labels = make_split(5, seed=11)
    pred = router.predict_proba(texts).argmax(1)
    assert np.mean([router.labels[p] == t for p, t in zip(pred, labels, strict=True)]) > 0.9


def test_cli_train_and_route(
    task_data_dir: Path, tokenizer_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "router"
    code = main(
        [
            "train-router",
            "--data",
            str(task_data_dir),
            "--out",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
            "--epochs",
            "4",
            "--patience",
            "2",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["epochs_run"] <= 4
    assert (out / WEIGHTS_FILE).is_file()

    assert (
        main(
            [
                "route",
                "w1 add sum w5 w9",
                "--router",
                str(out),
                "--p",
                "1.0",
                "--max-adapters",
                "2",
                "--weighting",
                "renorm",
            ]
        )
        == 0
    )
    decision = json.loads(capsys.readouterr().out)
    assert decision["text"] == "w1 add sum w5 w9"
    assert 1 <= len(decision["mix"]) <= 2
    assert sum(decision["mix"].values()) == pytest.approx(1.0)
    assert decision["top1"] in TASKS and decision["top1"] in decision["probs"]

    assert main(["route", "o1 o2", "w3 red", "--router", str(out)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["route", "x", "--p", "0"], "p must be"),
        (["route", "x", "--max-adapters", "0"], "max_adapters"),
        (["train-router", "--epochs", "0"], "--epochs"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys, task_data_dir: Path, tokenizer_dir: Path
) -> None:
    out = tmp_path / "router"
    if argv[0] == "route":
        train_router(
            task_data_dir, out, epochs=1, tokenizer_ref=tokenizer_dir, config=SMALL, progress=False
        )
        argv = [*argv, "--router", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_cli_route_without_router(tmp_path: Path, capsys) -> None:
    assert main(["route", "hello", "--router", str(tmp_path / "none")]) == 2
    assert "dlp setup" in capsys.readouterr().err


def test_bench_router_writes_json_and_png(
    task_data_dir: Path, tokenizer_dir: Path, tmp_path: Path, capsys
) -> None:
    router = tmp_path / "router"
    train_router(
        task_data_dir,
        router,
        epochs=6,
        tokenizer_ref=tokenizer_dir,
        config=SMALL,
        settings=FAST,
        progress=False,
    )
    out = tmp_path / "results"
    argv = [
        "bench",
        "router",
        "--router",
        str(router),
        "--data",
        str(task_data_dir),
        "--out",
        str(out),
        "--latency-batches",
        "5",
    ]
    assert main(argv) == 0
    report = json.loads((out / "router.json").read_text())
    for key in (
        "command",
        "machine",
        "date",
        "test_accuracy",
        "per_task_accuracy",
        "parameters",
        "training_time_s",
        "latency_ms_per_request_batch1",
        "latency_ms_per_request_batch32",
    ):
        assert report[key] is not None, key
    assert report["command"] == "dlp bench router " + " ".join(argv[2:])
    assert set(report["per_task_accuracy"]) == set(TASKS)
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == report["n_test"] == 20 * len(TASKS)
    assert report["test_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-6)
    assert report["latency_ms_per_request_batch32"] > 0
    assert (out / "router_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
