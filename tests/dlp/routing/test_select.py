"""Top-p selection: worked examples from the released-code rule, then property tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlp.errors import DlpError
from dlp.routing.mix import WEIGHT_GRID, AdapterMix
from dlp.routing.select import select_top_p, select_top_p_batch, top_p_indices

LABELS = ["a", "b", "c", "d"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --- worked examples -------------------------------------------------------------------------


def test_keeps_the_adapter_that_crosses_p() -> None:
    # 0.5 < 0.6, so the next one (0.3) is kept too; then the sum is 0.8 >= 0.6 and we stop.
    mix = select_top_p([0.5, 0.3, 0.15, 0.05], LABELS, p=0.6, weighting="renorm")
    assert mix.names == ("a", "b")
    assert mix.as_dict() == {"a": 0.625, "b": 0.375}


def test_stops_when_cumulative_reaches_p_exactly() -> None:
    mix = select_top_p([0.6, 0.4, 0.0, 0.0], LABELS, p=0.6)
    assert mix == AdapterMix.single("a")


def test_single_dominant_adapter_is_kept_alone() -> None:
    assert select_top_p([0.01, 0.97, 0.01, 0.01], LABELS) == AdapterMix.single("b")


def test_softmax_weighting_matches_released_code() -> None:
    probs = np.array([0.35, 0.3, 0.2, 0.15])
    mix = select_top_p(probs, LABELS, p=0.6)
    expected = _softmax(probs[:2])  # 0.35 < 0.6, 0.65 >= 0.6: keep two
    assert mix.names == ("a", "b")
    assert mix.weights == pytest.approx(tuple(expected), abs=1 / WEIGHT_GRID)


def test_max_adapters_caps_the_set() -> None:
    probs = [0.25, 0.25, 0.25, 0.25]
    assert len(select_top_p(probs, LABELS, p=1.0)) == 4
    assert select_top_p(probs, LABELS, p=1.0, max_adapters=2).names == ("a", "b")


def test_input_order_does_not_change_the_mix() -> None:
    one = select_top_p([0.4, 0.35, 0.25], ["x", "y", "z"], p=0.6)
    two = select_top_p([0.25, 0.4, 0.35], ["z", "x", "y"], p=0.6)
    assert one == two and one.key == two.key


def test_p_one_ignores_rounding_in_the_sum() -> None:
    # Normalised, these sum to 0.9999999999999999 in cumulative order; the zero-probability
    # tail must not be kept (softmax weighting would give it real weight).
    raw = np.array([0.86, 0.54, 0.3, 0.42])
    probs = np.concatenate([raw / raw.sum(), [0.0, 0.0]])
    assert np.cumsum(np.sort(probs)[::-1])[3] < 1.0
    mix = select_top_p(probs, ["a", "b", "c", "d", "z0", "z1"], p=1.0)
    assert mix.names == ("a", "b", "c", "d")


def test_batch_matches_rows() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=16)
    batch = select_top_p_batch(probs, LABELS, p=0.7, weighting="renorm")
    assert batch == [select_top_p(row, LABELS, p=0.7, weighting="renorm") for row in probs]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"p": 0.0}, "p"),
        ({"p": 1.5}, "p"),
        ({"p": float("nan")}, "p"),
        ({"max_adapters": 0}, "max_adapters"),
        ({"max_adapters": 1.5}, "max_adapters"),
        ({"weighting": "argmax"}, "weighting"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(DlpError, match=field):
        select_top_p([0.5, 0.5, 0.0, 0.0], LABELS, **kwargs)


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        ([0.5, 0.5], LABELS, "4 labels"),
        ([0.5, float("nan"), 0.5, 0.0], LABELS, "finite"),
        ([0.5, -0.1, 0.6, 0.0], LABELS, ">= 0"),
        ([0.5, 0.5], ["a", "a"], "unique"),
        ([[0.5, 0.5]], ["a", "b"], "one-dimensional"),
    ],
)
def test_bad_probabilities_are_refused(probs: list, labels: list[str], message: str) -> None:
    with pytest.raises(DlpError, match=message):
        select_top_p(probs, labels)


def test_batch_refuses_one_dimensional_input() -> None:
    with pytest.raises(DlpError, match="two-dimensional"):
        select_top_p_batch([0.5, 0.5], ["a", "b"])


# --- properties ------------------------------------------------------------------------------


@st.composite
def distributions(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(min_value=1, max_value=12))
    raw = draw(
        st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=n, max_size=n)
    )
    arr = np.asarray(raw, dtype=np.float64)
    if arr.sum() <= 0:
        arr = np.ones(n)
    return arr / arr.sum()


selection_args = st.tuples(
    distributions(),
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False),
    st.one_of(st.none(), st.integers(min_value=1, max_value=12)),
    st.sampled_from(["softmax", "renorm"]),
)


def _labels(n: int) -> list[str]:
    return [f"task{i:02d}" for i in range(n)]


@settings(max_examples=300, deadline=None)
@given(selection_args)
def test_property_rule_invariants(args: tuple) -> None:
    probs, p, cap, weighting = args
    labels = _labels(len(probs))
    idx = top_p_indices(probs, p, cap)
    kept = set(idx.tolist())
    # at least one, at most the cap
    assert 1 <= len(idx) <= (cap or len(probs))
    # the kept set is a top set: nothing dropped is more probable than anything kept
    dropped = [i for i in range(len(probs)) if i not in kept]
    if dropped:
        assert probs[dropped].max() <= probs[idx].min()
    # minimal: before the last kept adapter the cumulative sum was still below p
    assert probs[idx[:-1]].sum() < p or len(idx) == 1
    # sufficient: unless capped, we only stop once the cumulative sum reached p
    if len(idx) < len(probs) and (cap is None or len(idx) < cap):
        assert probs[idx].sum() >= p - 1e-9

    mix = select_top_p(probs, labels, p=p, max_adapters=cap, weighting=weighting)
    # canonical: sorted names, weights on the grid, summing to exactly one grid's worth
    assert list(mix.names) == sorted(mix.names)
    assert set(mix.names) <= {labels[i] for i in idx}
    units = [round(w * WEIGHT_GRID) for w in mix.weights]
    assert all(math.isclose(u / WEIGHT_GRID, w) for u, w in zip(units, mix.weights, strict=True))
    assert sum(units) == WEIGHT_GRID
    assert all(w > 0 for w in mix.weights)


@settings(max_examples=300, deadline=None)
@given(selection_args)
def test_property_weights_follow_the_rule(args: tuple) -> None:
    probs, p, cap, weighting = args
    labels = _labels(len(probs))
    idx = top_p_indices(probs, p, cap)
    kept = probs[idx]
    expected = _softmax(kept) if weighting == "softmax" else kept / kept.sum()
    mix = select_top_p(probs, labels, p=p, max_adapters=cap, weighting=weighting).as_dict()
    for i, w in zip(idx, expected, strict=True):
        # rounding to the grid moves each weight by at most one grid step
        assert abs(mix.get(labels[i], 0.0) - w) <= 1 / WEIGHT_GRID + 1e-12
    # a more probable adapter never gets a smaller weight (both rules are monotone)
    ordered = [mix.get(labels[i], 0.0) for i in idx]
    assert all(a >= b - 1 / WEIGHT_GRID for a, b in itertools.pairwise(ordered))


@settings(max_examples=200, deadline=None)
@given(distributions(), st.randoms(use_true_random=False))
def test_property_permutation_invariant_key(probs: np.ndarray, rnd) -> None:
    labels = _labels(len(probs))
    perm = list(range(len(probs)))
    rnd.shuffle(perm)
    a = select_top_p(probs, labels)
    b = select_top_p(probs[perm], [labels[i] for i in perm])
    # Ties between equal probabilities may be broken differently by position; only compare
    # when the kept set is unambiguous.
    order = np.sort(probs)[::-1]
    k = len(a)
    if k == len(probs) or order[k - 1] > order[k]:
        assert a.key == b.key


@settings(max_examples=200, deadline=None)
@given(st.lists(distributions(), min_size=1, max_size=6).filter(lambda ds: True))
def test_property_batch_equals_rows(rows: list[np.ndarray]) -> None:
    n = len(rows[0])
    rows = [r for r in rows if len(r) == n]
    labels = _labels(n)
    assert select_top_p_batch(np.stack(rows), labels) == [select_top_p(r, labels) for r in rows]


@settings(max_examples=200, deadline=None)
@given(distributions(), st.floats(min_value=0.05, max_value=0.95))
def test_property_larger_p_never_keeps_fewer(probs: np.ndarray, p: float) -> None:
    assert len(top_p_indices(probs, p)) <= len(top_p_indices(probs, min(1.0, p + 0.05)))
