"""`dlp data prepare` on the small fixture archive (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from dlp.cli import main
from dlp.data.dataset import load_tasks
from dlp.data.prepare import prepare
from dlp.data.splits import SplitConfig

FIXTURE_TASKS = ["object_counting", "epistemic_reasoning", "logical_deduction"]


@pytest.fixture(scope="module")
def prepared(
    fake_archive: Path, fixture_task_names: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    assert fixture_task_names == FIXTURE_TASKS  # the fixture archive holds these three
    base = tmp_path_factory.mktemp("prep")
    return prepare(
        base / "out",
        cache_root=base / "cache",
        archive=fake_archive,
        tasks=FIXTURE_TASKS,
        cfg=SplitConfig(seed=0, max_train=30),
    )


def test_schema_and_kinds(prepared: Path) -> None:
    table = load_tasks(prepared)
    for name, typ in [
        ("task", pa.string()),
        ("split", pa.string()),
        ("id", pa.string()),
        ("input", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("target", pa.string()),
        ("kind", pa.string()),
    ]:
        assert table.schema.field(name).type == typ
    rows = table.to_pylist()
    assert {r["task"] for r in rows} == set(FIXTURE_TASKS)
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        if r["task"] == "object_counting":
            assert r["kind"] == "generative" and r["choices"] == []
            # the first target string of the list
            assert r["target"].isdigit()
        else:
            assert r["kind"] == "mcq" and r["target"] in r["choices"]


def test_mcq_target_is_the_highest_scoring_choice(prepared: Path) -> None:
    rows = load_tasks(prepared, tasks=["logical_deduction"]).to_pylist()
    for r in rows:
        pos = "leftmost" if "leftmost" in r["target"] else "rightmost"
        objs = r["input"].split(": ", 1)[1].rstrip(".").split(", ")
        winner = objs[0] if pos == "leftmost" else objs[-1]
        assert r["target"] == f"The {winner} book is the {pos}."
    # subtasks are merged into the parent task
    assert {r["subtask"] for r in rows} == {"three_objects", "five_objects", "seven_objects"}


def test_boilerplate_is_stripped(prepared: Path) -> None:
    rows = load_tasks(prepared, tasks=["epistemic_reasoning"]).to_pylist()
    for r in rows:
        assert not r["input"].startswith("Premise")
        assert "Hypothesis:" not in r["input"] and "Identify the relation" not in r["input"]
        assert r["raw_input"].startswith("Premise:")
    counting = load_tasks(prepared, tasks=["object_counting"]).to_pylist()
    # "How many fruits do I have?" is a question, not a clause-bounded template prefix
    assert all(r["input"].startswith("I have") for r in counting)


def test_splits_are_disjoint_by_input_and_train_is_capped(prepared: Path) -> None:
    table = load_tasks(prepared)
    for task in FIXTURE_TASKS:
        by_split = {
            s: {r["input"] for r in load_tasks(prepared, split=s, tasks=[task]).to_pylist()}
            for s in ("train", "validation", "test")
        }
        assert not by_split["train"] & by_split["test"]
        assert not by_split["train"] & by_split["validation"]
        assert not by_split["validation"] & by_split["test"]
    train = load_tasks(prepared, split="train").to_pylist()
    for task in FIXTURE_TASKS:
        assert sum(r["task"] == task for r in train) <= 30
    assert table.num_rows > 0


def test_only_pool_task_files_are_extracted(prepared: Path) -> None:
    extracted = prepared.parent / "cache" / "bigbench" / "tasks"
    names = sorted(p.name for p in extracted.iterdir() if p.is_dir())
    assert names == sorted(FIXTURE_TASKS)
    assert (extracted / "logical_deduction" / "five_objects" / "task.json").is_file()


def test_second_run_reuses_and_settings_change_rebuilds(prepared: Path, fake_archive: Path) -> None:
    parquet = prepared / "tasks.parquet"
    before = parquet.stat().st_mtime_ns
    cache = prepared.parent / "cache"
    prepare(
        prepared,
        cache_root=cache,
        archive=fake_archive,
        tasks=FIXTURE_TASKS,
        cfg=SplitConfig(seed=0, max_train=30),
    )
    assert parquet.stat().st_mtime_ns == before
    other = prepared.parent / "other"
    prepare(
        other,
        cache_root=cache,
        archive=fake_archive,
        tasks=FIXTURE_TASKS,
        cfg=SplitConfig(seed=0, max_train=10),
    )
    meta = json.loads((other / "meta.json").read_text())
    assert meta["settings"]["split"]["max_train"] == 10
    assert all(c["train"] <= 10 for c in meta["counts"].values())


def test_same_seed_gives_identical_files(fake_archive: Path, tmp_path: Path) -> None:
    kw = dict(
        cache_root=tmp_path / "cache",
        archive=fake_archive,
        tasks=FIXTURE_TASKS,
        cfg=SplitConfig(seed=3),
    )
    a = load_tasks(prepare(tmp_path / "a", **kw))
    b = load_tasks(prepare(tmp_path / "b", **kw))
    assert a.equals(b)


def test_cli_prepare_and_stats(fake_archive: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    rc = main(
        [
            "data",
            "prepare",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
            "--archive",
            str(fake_archive),
            "--tasks",
            *FIXTURE_TASKS,
            "--max-train-per-task",
            "20",
            "--seed",
            "5",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["data", "stats", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["task", "kind", "train", "valid", "test", "total"]
    counts = {ln.split()[0]: [int(x) for x in ln.split()[2:]] for ln in lines[1:-1]}
    assert set(counts) == set(FIXTURE_TASKS)
    table = load_tasks(out)
    for task, (train, val, test, total) in counts.items():
        rows = [r for r in table.to_pylist() if r["task"] == task]
        assert total == len(rows) == train + val + test
        assert train == sum(r["split"] == "train" for r in rows) <= 20


def test_archive_from_env_var(fake_archive: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DLP_BIGBENCH_ARCHIVE", str(fake_archive))
    out = prepare(tmp_path / "o", cache_root=tmp_path / "c", tasks=["object_counting"])
    assert set(load_tasks(out)["task"].to_pylist()) == {"object_counting"}


@pytest.mark.parametrize(
    "cmd",
    [
        ["data", "--help"],
        ["data", "prepare", "--help"],
        ["data", "stats", "--help"],
        ["data", "tasks", "--help"],
    ],
)
def test_help(cmd: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(cmd)
    assert exc.value.code == 0
    assert "usage: dlp data" in capsys.readouterr().out
