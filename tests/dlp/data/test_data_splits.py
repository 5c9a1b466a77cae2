from dlp.data.examples import Example
from dlp.data.splits import SPLITS, SplitConfig, split_task


def _examples(n: int, repeats: int = 1) -> list[Example]:
    out = []
    for i in range(n):
        for r in range(repeats):
            out.append(
                Example(
                    "t",
                    "",
                    i * repeats + r,
                    f"input {i}",
                    f"raw {i}",
                    (f"a{r}", f"b{r}"),
                    f"a{r}",
                    "mcq",
                )
            )
    return out


def _inputs(rows: list[Example]) -> set[str]:
    return {r.input for r in rows}


def test_splits_are_deterministic_and_seeded() -> None:
    ex = _examples(500)
    a = split_task(ex, SplitConfig(seed=1))
    b = split_task(list(ex), SplitConfig(seed=1))
    c = split_task(ex, SplitConfig(seed=2))
    assert {s: [e.id for e in a[s]] for s in SPLITS} == {s: [e.id for e in b[s]] for s in SPLITS}
    assert [e.id for e in a["test"]] != [e.id for e in c["test"]]


def test_caps_and_small_task_shares() -> None:
    big = split_task(_examples(3000), SplitConfig(max_train=700, max_validation=50, max_test=90))
    assert (len(big["train"]), len(big["validation"]), len(big["test"])) == (700, 50, 90)
    small = split_task(_examples(100), SplitConfig())
    assert (len(small["test"]), len(small["validation"]), len(small["train"])) == (20, 10, 70)


def test_same_input_never_crosses_splits() -> None:
    # three questions per passage, as in logical_deduction
    parts = split_task(_examples(200, repeats=3), SplitConfig(max_test=31, max_validation=17))
    seen = [_inputs(parts[s]) for s in SPLITS]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(parts["test"]) == 31 and len(parts["validation"]) == 17


def test_exact_duplicates_are_dropped() -> None:
    ex = _examples(50)
    parts = split_task(ex + ex, SplitConfig())
    ids = [e.id for s in SPLITS for e in parts[s]]
    assert len(ids) == len(set(ids)) == 50


def test_test_split_is_stable_when_train_cap_changes() -> None:
    ex = _examples(400)
    a = split_task(ex, SplitConfig(max_train=50))
    b = split_task(ex, SplitConfig(max_train=300))
    assert [e.id for e in a["test"]] == [e.id for e in b["test"]]
    assert [e.id for e in a["train"]] == [e.id for e in b["train"]][:50]
