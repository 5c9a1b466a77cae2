"""Train the MiniMLP router on the task data (sentence -> task label), and the default router.

Training is plain supervised classification: cross-entropy over task labels, Adam, seeded
shuffling, validation accuracy checked after every epoch, and early stopping that keeps the
best epoch's weights. The router never sees the LM loss (as in the paper).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from dlp.errors import DlpError
from dlp.paths import cache_dir, data_dir, ensure_writable_dir, model_dir, router_dir
from dlp.routing.router import CONFIG_FILE, WEIGHTS_FILE, MiniMLPRouter, RouterConfig, pack

log = logging.getLogger(__name__)

TASKS_FILE = "tasks.parquet"


@dataclass
class TrainSettings:
    """Optimisation settings (hyper-parameters of the model itself are in RouterConfig)."""

    seed: int = 0
    epochs: int = 5
    patience: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.05
    # Large tasks are subsampled per epoch so that training time stays bounded and no task
    # dominates the gradient; every epoch draws a fresh subsample.
    max_train_per_task: int | None = 1500


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    per_task_accuracy: dict[str, float]
    confusion: list[list[int]]  # confusion[true][pred], rows/cols in label order
    n: int


@dataclass
class TrainReport:
    labels: list[str]
    parameters: int
    epochs_run: int
    best_epoch: int
    val_accuracy: float
    test_accuracy: float | None
    per_task_test_accuracy: dict[str, float]
    training_time_s: float
    n_train: int
    n_val: int
    n_test: int
    settings: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    test_confusion: list[list[int]] = field(default_factory=list)
    out_dir: str = ""


@dataclass
class Split:
    texts: list[str]
    labels: list[str]


# --- data ------------------------------------------------------------------------------------


def load_splits(directory: str | Path) -> dict[str, Split]:
    """Read the task data and return ``{split: Split}`` with routing-ready texts."""
    table = _read_table(Path(directory))
    missing = {"task", "split", "input"} - set(table.column_names)
    if missing:
        raise DlpError(f"task data in {directory} lacks column(s) {', '.join(sorted(missing))}")
    tasks = table.column("task").to_pylist()
    splits = table.column("split").to_pylist()
    inputs = table.column("input").to_pylist()
    out: dict[str, Split] = {}
    for task, split, text in zip(tasks, splits, inputs, strict=True):
        entry = out.setdefault(split, Split([], []))
        entry.texts.append(text or "")
        entry.labels.append(task)
    return out


def _read_table(directory: Path) -> Any:
    from dlp.data.dataset import load_tasks

    return load_tasks(directory)


# --- training --------------------------------------------------------------------------------


def _encode_all(router: MiniMLPRouter, texts: Sequence[str], chunk: int = 1024) -> list[np.ndarray]:
    feats: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        ids = router.token_ids(texts[start : start + chunk])
        feats.extend(router.features(x) for x in ids)
    return feats


def evaluate(
    router: MiniMLPRouter,
    feats: Sequence[np.ndarray],
    targets: np.ndarray,
    batch_size: int = 512,
) -> EvalResult:
    """Accuracy, loss, per-task accuracy and confusion matrix on pre-encoded features."""
    n_labels = len(router.labels)
    was_training = router.training
    router.eval()
    preds, losses = [], []
    with torch.inference_mode():
        for start in range(0, len(feats), batch_size):
            idx, off = pack(feats[start : start + batch_size])
            logits = router(idx, off)
            y = torch.from_numpy(targets[start : start + batch_size])
            losses.append(F.cross_entropy(logits, y, reduction="sum").item())
            preds.append(logits.argmax(-1).numpy())
    router.train(was_training)
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(confusion, (targets, pred), 1)
    per_task = {
        label: float(confusion[i, i] / confusion[i].sum())
        for i, label in enumerate(router.labels)
        if confusion[i].sum() > 0
    }
    n = len(targets)
    return EvalResult(
        accuracy=float((pred == targets).mean()) if n else 0.0,
        loss=float(sum(losses) / n) if n else 0.0,
        per_task_accuracy=per_task,
        confusion=confusion.tolist(),
        n=n,
    )


def fit(
    router: MiniMLPRouter,
    train: Split,
    val: Split,
    settings: TrainSettings | None = None,
    *,
    progress: bool = True,
) -> tuple[list[dict[str, float]], int]:
    """Train ``router`` in place; returns (history, best_epoch). Restores the best weights."""
    s = settings or TrainSettings()
    if s.epochs < 1 or s.patience < 1 or s.batch_size < 1:
        raise DlpError("epochs, patience and batch_size must be >= 1")
    if not train.texts or not val.texts:
        raise DlpError("router training needs non-empty train and validation splits")
    index = {label: i for i, label in enumerate(router.labels)}
    unknown = sorted({t for t in [*train.labels, *val.labels] if t not in index})
    if unknown:
        raise DlpError(f"labels not known to the router: {', '.join(unknown[:5])}")

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    train_x = _encode_all(router, train.texts)
    train_y = np.array([index[t] for t in train.labels], dtype=np.int64)
    val_x = _encode_all(router, val.texts)
    val_y = np.array([index[t] for t in val.labels], dtype=np.int64)
    by_task = [np.flatnonzero(train_y == i) for i in range(len(router.labels))]

    # The embedding gets sparse gradients (see MiniMLPRouter._pool_sparse): SparseAdam only
    # updates the rows a batch touched, which keeps a step cheap on a shared 2-core CI box.
    dense = [p for n, p in router.named_parameters() if n != "embedding"]
    opts = [
        torch.optim.SparseAdam([router.embedding], lr=s.lr),
        torch.optim.AdamW(dense, lr=s.lr, weight_decay=s.weight_decay),
    ]
    # Linear decay to zero over the planned steps: the router is close to its best after one
    # epoch, so a short schedule that anneals beats a long constant-rate one.
    steps_per_epoch = -(-_epoch_size(by_task, s.max_train_per_task) // s.batch_size)
    total_steps = max(1, s.epochs * steps_per_epoch)
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda step: max(0.0, 1.0 - step / total_steps))
        for o in opts
    ]
    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, stale = 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, s.epochs + 1), desc="router", unit="epoch", disable=not progress)
    for epoch in bar:
        epoch_started = time.perf_counter()
        order = _epoch_order(by_task, s.max_train_per_task, rng)
        router.train()
        total, seen = 0.0, 0
        for start in range(0, len(order), s.batch_size):
            batch = order[start : start + s.batch_size]
            idx, off = pack([train_x[i] for i in batch])
            logits = router(idx, off)
            loss = F.cross_entropy(
                logits, torch.from_numpy(train_y[batch]), label_smoothing=s.label_smoothing
            )
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, schedule in zip(opts, schedules, strict=True):
                opt.step()
                schedule.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        result = evaluate(router, val_x, val_y)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / seen,
                "val_loss": result.loss,
                "val_accuracy": result.accuracy,
                "epoch_time_s": round(time.perf_counter() - epoch_started, 2),
            }
        )
        bar.set_postfix(loss=f"{total / seen:.3f}", val_acc=f"{result.accuracy:.4f}")
        key = (result.accuracy, -result.loss)
        if best_key is None or key > best_key:
            best_key, best_epoch, stale = key, epoch, 0
            best_state = {k: v.detach().clone() for k, v in router.state_dict().items()}
        else:
            stale += 1
            if stale >= s.patience:
                break
    bar.close()
    router.load_state_dict(best_state)
    router.eval()
    return history, best_epoch


def _epoch_size(by_task: list[np.ndarray], cap: int | None) -> int:
    return sum(len(m) if cap is None else min(cap, len(m)) for m in by_task)


def _epoch_order(
    by_task: list[np.ndarray], cap: int | None, rng: np.random.Generator
) -> np.ndarray:
    parts = []
    for members in by_task:
        if cap is not None and len(members) > cap:
            members = rng.choice(members, size=cap, replace=False)
        parts.append(members)
    order = np.concatenate(parts)
    rng.shuffle(order)
    return order


def train_router(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    epochs: int = 5,
    patience: int = 2,
    tokenizer: Any = None,
    tokenizer_ref: str | Path | None = None,
    config: RouterConfig | None = None,
    settings: TrainSettings | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train on ``data_dir``'s train split, stop early on validation, save to ``out_dir``.

    ``tokenizer`` defaults to the base model's tokenizer (``tokenizer_ref`` or the embedded
    default's directory); its path is recorded in ``router.json``.
    """
    started = time.perf_counter()
    splits = load_splits(data_dir)
    for name in ("train", "validation"):
        if name not in splits:
            raise DlpError(f"task data in {data_dir} has no {name!r} split")
    train, val, test = splits["train"], splits["validation"], splits.get("test")
    labels = sorted(set(train.labels))
    if tokenizer is None:
        from dlp.routing.router import load_tokenizer

        ref = tokenizer_ref or _default_tokenizer_ref()
        tokenizer = load_tokenizer(ref)
        tokenizer_ref = str(ref)
    s = replace(settings or TrainSettings(), seed=seed, epochs=epochs, patience=patience)
    cfg = config or RouterConfig(vocab_size=len(tokenizer))
    torch.manual_seed(seed)  # initial weights depend on the seed too
    router = MiniMLPRouter(
        labels, tokenizer, cfg, tokenizer_ref=str(tokenizer_ref) if tokenizer_ref else None
    )
    history, best_epoch = fit(router, train, val, s, progress=progress)
    training_time = time.perf_counter() - started

    index = {label: i for i, label in enumerate(labels)}
    val_eval = evaluate(
        router, _encode_all(router, val.texts), np.array([index[t] for t in val.labels])
    )
    test_eval = None
    if test is not None and test.texts:
        known = [(x, index[t]) for x, t in zip(test.texts, test.labels, strict=True) if t in index]
        test_eval = evaluate(
            router,
            _encode_all(router, [x for x, _ in known]),
            np.array([y for _, y in known], dtype=np.int64),
        )
    report = TrainReport(
        labels=labels,
        parameters=router.num_parameters(),
        epochs_run=len(history),
        best_epoch=best_epoch,
        val_accuracy=val_eval.accuracy,
        test_accuracy=test_eval.accuracy if test_eval else None,
        per_task_test_accuracy=test_eval.per_task_accuracy if test_eval else {},
        training_time_s=round(training_time, 2),
        n_train=len(train.texts),
        n_val=len(val.texts),
        n_test=test_eval.n if test_eval else 0,
        settings=asdict(s),
        config=asdict(cfg),
        history=history,
        test_confusion=test_eval.confusion if test_eval else [],
        out_dir=str(out_dir),
    )
    router.metadata = {
        "data_dir": str(Path(data_dir).resolve()),
        "data_sha256": data_fingerprint(data_dir),
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs_run": report.epochs_run,
        "val_accuracy": report.val_accuracy,
        "test_accuracy": report.test_accuracy,
        "training_time_s": report.training_time_s,
        "settings": report.settings,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    router.save(out_dir)
    return report


def _default_tokenizer_ref() -> Path:
    root = cache_dir()
    path = model_dir(root)
    if not (path / "tokenizer.json").is_file():
        from dlp.base_model import ensure_base_model

        path = ensure_base_model(root)
    return path


def data_fingerprint(directory: str | Path) -> str:
    path = Path(directory) / TASKS_FILE
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the embedded default --------------------------------------------------------------------


def default_router_ready(root: Path) -> bool:
    """True when the cached router exists, parses, and was trained on the current data."""
    import json

    out = router_dir(root)
    try:
        meta = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not (out / WEIGHTS_FILE).is_file():
        return False
    recorded = (meta.get("metadata") or {}).get("data_sha256")
    return recorded == data_fingerprint(data_dir(root))


def ensure_default_router(cache_root: Path | None = None, *, force: bool = False) -> Path:
    """Train the default router into ``router_dir(root)`` unless a current one is there.

    Idempotent: the second call only checks ``router.json`` against the data's hash. A new
    router is trained into a sibling temp dir and moved into place, so a crash never leaves
    a half-written router that a later call would accept. ``force`` retrains regardless
    (the old router stays in place until the new one is ready).
    """
    root = ensure_writable_dir(cache_dir(cache_root))
    out = router_dir(root)
    if not force and default_router_ready(root):
        return out
    data = data_dir(root)
    if not (data / TASKS_FILE).is_file():
        try:
            from dlp.data.prepare import ensure_default_data
        except ModuleNotFoundError as exc:
            raise DlpError(f"task data not found in {data}; run `dlp data prepare`") from exc
        data = ensure_default_data(root)
    tok_dir = model_dir(root)
    if not (tok_dir / "tokenizer.json").is_file():
        from dlp.base_model import ensure_base_model

        tok_dir = ensure_base_model(root)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    report = train_router(data, tmp, seed=0, tokenizer_ref=tok_dir)
    log.info("default router: test accuracy %s", report.test_accuracy)
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished the same training first and moved its router into place.
        shutil.rmtree(tmp, ignore_errors=True)
        if not default_router_ready(root):
            raise
    return out
