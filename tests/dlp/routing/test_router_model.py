"""MiniMLPRouter: features, training on synthetic tasks, persistence, RouterService."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from routing_synth import TASKS, make_split

from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix
from dlp.routing.router import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    MiniMLPRouter,
    RouterConfig,
    RouterService,
    SelectionConfig,
)
from dlp.routing.select import select_top_p
from dlp.routing.train import Split, TrainSettings, evaluate, fit

SMALL = {"embed_dim": 16, "hash_buckets": 512, "hidden": (32,), "dropout": 0.0}


def _router(tokenizer, seed: int = 0, **overrides) -> MiniMLPRouter:
    torch.manual_seed(seed)
    cfg = RouterConfig(vocab_size=len(tokenizer), **{**SMALL, **overrides})
    return MiniMLPRouter(TASKS, tokenizer, cfg)


def _trained(tokenizer, seed: int = 0, **overrides) -> MiniMLPRouter:
    router = _router(tokenizer, seed, **overrides)
    train = Split(*make_split(80, seed=1))
    val = Split(*make_split(10, seed=2))
    fit(
        router, train, val, TrainSettings(seed=seed, epochs=15, patience=4, lr=1e-2), progress=False
    )
    return router


def _accuracy(router: MiniMLPRouter, seed: int = 3) -> float:
    texts, labels = make_split(30, seed=seed)
    pred = router.predict_proba(texts).argmax(1)
    return float(np.mean([router.labels[i] == t for i, t in zip(pred, labels, strict=True)]))


@pytest.fixture(scope="module")
def trained(tiny_tokenizer) -> MiniMLPRouter:
    return _trained(tiny_tokenizer)


# --- features --------------------------------------------------------------------------------


def test_features_are_unigrams_then_hashed_ngrams(tiny_tokenizer) -> None:
    router = _router(tiny_tokenizer)
    ids = router.token_ids(["w1 w2 w3 w4", ""])
    assert ids[0] == tiny_tokenizer("w1 w2 w3 w4", add_special_tokens=False)["input_ids"]
    assert ids[1] == []
    feats = router.features(ids[0])
    vocab, buckets = router.config.vocab_size, router.config.hash_buckets
    assert feats[:4].tolist() == ids[0]
    assert len(feats) == 4 + 3 + 2  # unigrams, bigrams, trigrams
    assert np.all((feats[4:] >= vocab) & (feats[4:] < vocab + buckets))
    # deterministic and order-sensitive
    assert np.array_equal(feats, router.features(ids[0]))
    assert not np.array_equal(feats[4:], router.features(list(reversed(ids[0])))[4:])


def test_max_tokens_truncates(tiny_tokenizer) -> None:
    router = _router(tiny_tokenizer, max_tokens=3)
    assert router.token_ids(["w1 w2 w3 w4 w5"]) == [
        tiny_tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"]
    ]


def test_bad_texts_are_refused(tiny_tokenizer) -> None:
    router = _router(tiny_tokenizer)
    with pytest.raises(DlpError, match="single string"):
        router.predict_proba("w1 w2")  # type: ignore[arg-type]
    with pytest.raises(DlpError, match=r"texts\[1\]"):
        router.predict_proba(["w1", 3])  # type: ignore[list-item]


def test_config_validation(tiny_tokenizer) -> None:
    with pytest.raises(DlpError, match="ngrams"):
        RouterConfig(vocab_size=10, ngrams=(1,))
    with pytest.raises(DlpError, match="hash_buckets"):
        RouterConfig(vocab_size=10, hash_buckets=0)
    with pytest.raises(DlpError, match="unique"):
        MiniMLPRouter(["a", "a"], tiny_tokenizer)
    with pytest.raises(DlpError, match="vocab_size"):
        MiniMLPRouter(["a"], tiny_tokenizer, RouterConfig(vocab_size=3))


def test_default_size_parameter_count(tiny_tokenizer) -> None:
    # The shipped shape for the base model's 49152-token vocabulary, 26 labels.
    cfg = RouterConfig(vocab_size=49152)
    router = MiniMLPRouter([f"t{i}" for i in range(26)], tiny_tokenizer, cfg)
    d, h = cfg.embed_dim, cfg.hidden[0]
    expected = (49152 + cfg.hash_buckets) * d + 2 * (2 * d) + (2 * d * h + h) + (h * 26 + 26)
    assert router.num_parameters() == expected
    assert 4_500_000 <= expected <= 5_500_000


# --- training --------------------------------------------------------------------------------


def test_predict_proba_shape(trained: MiniMLPRouter) -> None:
    probs = trained.predict_proba(["w1 add w2", "", "o1 o2"])
    assert probs.shape == (3, len(TASKS))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert trained.predict_proba([]).shape == (0, len(TASKS))


def test_learns_held_out_tasks(trained: MiniMLPRouter) -> None:
    assert _accuracy(trained) == 1.0


def test_ngrams_are_what_separate_word_order(tiny_tokenizer) -> None:
    # "ascending" and "descending" use the same words; only hashed n-grams see the order.
    bag_only = _trained(tiny_tokenizer, ngrams=(), hash_buckets=0)
    texts, labels = make_split(30, seed=3)
    order_rows = [i for i, t in enumerate(labels) if t in ("ascending", "descending")]
    pred = bag_only.predict_proba([texts[i] for i in order_rows]).argmax(1)
    acc = np.mean([bag_only.labels[p] == labels[i] for p, i in zip(pred, order_rows, strict=True)])
    assert acc < 0.8
    assert _accuracy(_trained(tiny_tokenizer)) == 1.0


def test_training_is_seeded(tiny_tokenizer) -> None:
    a, b = _trained(tiny_tokenizer, seed=5), _trained(tiny_tokenizer, seed=5)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_early_stopping_keeps_best_epoch(tiny_tokenizer) -> None:
    router = _router(tiny_tokenizer)
    train, val = Split(*make_split(80, seed=1)), Split(*make_split(10, seed=2))
    history, best = fit(
        router, train, val, TrainSettings(epochs=40, patience=2, lr=1e-2), progress=False
    )
    assert len(history) < 40  # stopped early
    assert len(history) - best == 2  # exactly `patience` epochs without improvement
    keys = [(h["val_accuracy"], -h["val_loss"]) for h in history]
    assert keys[best - 1] == max(keys)
    # the restored weights are the best epoch's
    index = {t: i for i, t in enumerate(router.labels)}
    result = evaluate(
        router,
        [router.features(x) for x in router.token_ids(val.texts)],
        np.array([index[t] for t in val.labels]),
    )
    assert result.accuracy == pytest.approx(history[best - 1]["val_accuracy"])
    assert result.loss == pytest.approx(history[best - 1]["val_loss"], rel=1e-5)


def test_fit_refuses_unknown_labels(tiny_tokenizer) -> None:
    router = _router(tiny_tokenizer)
    with pytest.raises(DlpError, match="not known"):
        fit(router, Split(["w1"], ["nope"]), Split(["w1"], ["arith"]), progress=False)


# --- persistence -----------------------------------------------------------------------------


def test_save_load_roundtrip(trained: MiniMLPRouter, tiny_tokenizer, tmp_path: Path) -> None:
    trained.tokenizer_ref = "/some/tokenizer/dir"
    trained.metadata = {"seed": 0}
    trained.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["labels"] == TASKS
    assert meta["tokenizer"] == "/some/tokenizer/dir"
    assert meta["parameters"] == trained.num_parameters()
    assert meta["config"]["embed_dim"] == SMALL["embed_dim"]
    assert meta["metadata"] == {"seed": 0}
    loaded = MiniMLPRouter.load(tmp_path, tokenizer=tiny_tokenizer)
    texts = make_split(3, seed=9)[0]
    assert np.array_equal(loaded.predict_proba(texts), trained.predict_proba(texts))
    assert loaded.labels == trained.labels and loaded.config == trained.config


def test_load_resolves_tokenizer_reference(trained, tokenizer_dir: Path, tmp_path: Path) -> None:
    trained.tokenizer_ref = str(tokenizer_dir)
    trained.save(tmp_path)
    loaded = MiniMLPRouter.load(tmp_path)
    assert np.array_equal(loaded.predict_proba(["w1 add"]), trained.predict_proba(["w1 add"]))


def test_load_errors(trained: MiniMLPRouter, tiny_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DlpError, match="not found"):
        MiniMLPRouter.load(tmp_path / "missing", tokenizer=tiny_tokenizer)
    trained.save(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(DlpError, match="not valid JSON"):
        MiniMLPRouter.load(tmp_path, tokenizer=tiny_tokenizer)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**meta, "labels": TASKS[:-1]}))
    with pytest.raises(DlpError, match="does not match"):
        MiniMLPRouter.load(tmp_path, tokenizer=tiny_tokenizer)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**meta, "hash_scheme": "other"}))
    with pytest.raises(DlpError, match="hash"):
        MiniMLPRouter.load(tmp_path, tokenizer=tiny_tokenizer)


# --- service ---------------------------------------------------------------------------------


def test_route_decisions(trained: MiniMLPRouter) -> None:
    service = RouterService(trained, SelectionConfig(p=0.6, top_probs=3))
    texts = ["w3 add sum w7 w9", "o1 o4 o7 o9"]
    decisions = service.route(texts)
    probs = trained.predict_proba(texts)
    assert [d.top1 for d in decisions] == ["arith", "ascending"]
    for d, row in zip(decisions, probs, strict=True):
        assert d.mix == select_top_p(row, TASKS, p=0.6)
        assert len(d.probs) == 3 and d.top1 == max(d.probs, key=d.probs.get)
        assert d.as_dict()["key"] == d.mix.key
    assert service.route([]) == []


def test_route_overrides(trained: MiniMLPRouter) -> None:
    service = RouterService(trained)
    (d,) = service.route(["w1 w2 w3"], p=1.0, max_adapters=2, weighting="renorm")
    row = trained.predict_proba(["w1 w2 w3"])[0]
    assert d.mix == select_top_p(row, TASKS, p=1.0, max_adapters=2, weighting="renorm")
    assert len(d.mix) == 2
    (one,) = service.route(["w1 w2 w3"], max_adapters=1)
    assert one.mix == AdapterMix.single(one.top1)
    with pytest.raises(DlpError, match="p must be"):
        service.route(["x"], p=2.0)
    with pytest.raises(DlpError, match="weighting"):
        SelectionConfig(weighting="max")  # type: ignore[arg-type]
