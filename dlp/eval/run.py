"""``dlp eval``: score every system on the test split, the p sweep and the mixed-task prompts.

All systems, the sweep and the mixed-task prompts are first turned into (query, mix) pairs;
equal pairs are scored once (for most requests DLP, top-1 and oracle pick the same single
adapter), then all pending pairs run in length-sorted batches with per-row mixes
(dlp.eval.lora_mix). Aggregation afterwards is plain Python.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dlp.errors import DlpError
from dlp.eval import metrics
from dlp.eval.lora_mix import MultiLoraModel
from dlp.eval.mixed import MixedPrompt, example_key, part_messages
from dlp.eval.routing_probs import RouterOutputs
from dlp.eval.scoring import GenerateItem, ScoreItem, continuation_logprobs, greedy_generate
from dlp.eval.systems import SYSTEMS, Mix, mix_key, system_mix, top_adapter, weight_row
from dlp.training.examples import TaskExample, by_task
from dlp.training.prompts import (
    encode_answer,
    end_of_turn,
    render_chat,
    render_prompt,
    truncate_input,
    user_text,
)

MIXED_SYSTEMS = ("base", "oracle", "dlp", "dlp_prompt", "composite")


@dataclass(frozen=True)
class EvalSettings:
    p: float = 0.6
    sweep: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    max_new_tokens: int = 64
    max_part_tokens: int = 160  # per part of a mixed prompt
    max_tokens_per_batch: int = 16384
    max_rows: int = 256
    sweep_per_task: int | None = None  # the p sweep on the first N test examples of each task


@dataclass(frozen=True)
class Query:
    """One thing to answer: a prompt plus how its answer is scored."""

    key: str
    task: str
    kind: str
    prompt_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...] = ()
    gold: int = -1
    reference: str = ""
    max_new_tokens: int = 64


class Evaluator:
    """Caches answers by (query, mix) and computes the pending ones in batches."""

    def __init__(self, mlm: MultiLoraModel, tokenizer: Any, settings: EvalSettings) -> None:
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        stop = set(tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stop.add(int(tokenizer.eos_token_id))
        self.stop_ids = sorted(stop)
        self._scores: dict[tuple[str, str], list[float]] = {}
        self._texts: dict[tuple[str, str], str] = {}
        self._pending: dict[tuple[str, str], tuple[Query, Mix]] = {}
        self.stats = {"requested": 0, "computed": 0}

    # -- queries ---------------------------------------------------------------------------

    def example_query(self, ex: TaskExample, max_new_tokens: int) -> Query:
        prompt = render_prompt(self.tokenizer, ex.input, ex.prompt_choices)
        return self._query(example_key(ex), ex, prompt, max_new_tokens)

    def mixed_query(
        self, mixed_id: str, parts: Sequence[TaskExample], upto: int, max_new_tokens: int
    ) -> Query:
        cap = self.settings.max_part_tokens
        texts = [
            truncate_input(self.tokenizer, user_text(p.input, p.prompt_choices), cap) for p in parts
        ]
        prompt = render_chat(self.tokenizer, part_messages(parts, upto, texts))
        return self._query(f"{mixed_id}#{upto}", parts[upto], prompt, max_new_tokens)

    def _query(self, key: str, ex: TaskExample, prompt: str, max_new_tokens: int) -> Query:
        ids = tuple(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if ex.kind == "mcq":
            return Query(
                key=key,
                task=ex.task,
                kind="mcq",
                prompt_ids=ids,
                choice_ids=tuple(tuple(encode_answer(self.tokenizer, c, None)) for c in ex.choices),
                gold=ex.gold_index,
            )
        return Query(
            key=key,
            task=ex.task,
            kind="generative",
            prompt_ids=ids,
            reference=ex.target,
            max_new_tokens=max_new_tokens,
        )

    # -- caching and batching --------------------------------------------------------------

    def want(self, q: Query, mix: Mix) -> None:
        self.stats["requested"] += 1
        k = (q.key, mix_key(mix))
        if k not in self._scores and k not in self._texts:
            self._pending[k] = (q, mix)

    def run_pending(self) -> None:
        pending = list(self._pending.items())
        self._pending.clear()
        self.stats["computed"] += len(pending)
        names = self.mlm.names
        items: list[ScoreItem] = []
        owners: list[tuple[str, str]] = []
        gens: dict[int, list[tuple[tuple[str, str], GenerateItem]]] = {}
        for k, (q, mix) in pending:
            w = weight_row(mix, names)
            if q.kind == "mcq":
                for c in q.choice_ids:
                    items.append(ScoreItem(q.prompt_ids, c, w))
                    owners.append(k)
            else:
                gens.setdefault(q.max_new_tokens, []).append((k, GenerateItem(q.prompt_ids, w)))
        s = self.settings
        t0 = time.monotonic()
        if items:
            scores = continuation_logprobs(
                self.mlm, items, self.pad_id, s.max_tokens_per_batch, s.max_rows, desc="mcq"
            )
            for k, v in zip(owners, scores, strict=True):
                self._scores.setdefault(k, []).append(v)
        t1 = time.monotonic()
        self.stats["mcq_sequences"] = self.stats.get("mcq_sequences", 0) + len(items)
        self.stats["mcq_seconds"] = round(self.stats.get("mcq_seconds", 0) + t1 - t0, 1)
        for max_new, group in sorted(gens.items()):
            outs = greedy_generate(
                self.mlm,
                [g for _, g in group],
                self.pad_id,
                self.stop_ids,
                max_new,
                max_rows=s.max_rows,
                desc=f"generate<= {max_new}",
            )
            for (k, _), toks in zip(group, outs, strict=True):
                self._texts[k] = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
            self.stats["generations"] = self.stats.get("generations", 0) + len(group)
        self.stats["generate_seconds"] = round(
            self.stats.get("generate_seconds", 0) + time.monotonic() - t1, 1
        )

    def mcq_correct(self, q: Query, mix: Mix) -> bool:
        return metrics.argmax(self._scores[(q.key, mix_key(mix))]) == q.gold

    def prediction(self, q: Query, mix: Mix) -> str:
        return self._texts[(q.key, mix_key(mix))]


# -- aggregation ---------------------------------------------------------------------------


def _task_scores(ev: Evaluator, queries: Sequence[Query], mixes: Sequence[Mix]) -> dict[str, float]:
    if queries[0].kind == "mcq":
        hits = [ev.mcq_correct(q, m) for q, m in zip(queries, mixes, strict=True)]
        return {"accuracy": 100.0 * sum(hits) / len(hits)}
    preds = [ev.prediction(q, m) for q, m in zip(queries, mixes, strict=True)]
    return metrics.generative_scores(preds, [q.reference for q in queries])


def _average(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return round(sum(vals) / len(vals), 3) if vals else None


def answer_caps(
    train: Sequence[TaskExample], tokenizer: Any, default: int, quantile: float = 0.95
) -> dict[str, int]:
    """Per generative task, a generation cap from the train answers' lengths (95th
    percentile + 4 tokens, at most ``default``): the base model rambles otherwise."""
    caps: dict[str, int] = {}
    for task, exs in by_task(e for e in train if e.kind == "generative").items():
        lengths = sorted(
            len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in exs
        )
        q = lengths[min(len(lengths) - 1, int(quantile * len(lengths)))]
        caps[task] = int(min(default, q + 4))
    return caps


def evaluate(
    mlm: MultiLoraModel,
    tokenizer: Any,
    test: Sequence[TaskExample],
    routing: RouterOutputs,
    settings: EvalSettings,
    caps: dict[str, int] | None = None,
    systems: Sequence[str] = SYSTEMS,
    pool: Sequence[TaskExample] | None = None,
) -> dict[str, Any]:
    """Every system on ``test``, the p sweep, and the mixed-task prompts in ``routing``
    (whose parts are looked up in ``pool``, default ``test``)."""
    started = time.monotonic()
    caps = caps or {}
    ev = Evaluator(mlm, tokenizer, settings)
    labels = routing.labels
    grouped = by_task(test)
    tasks = sorted(grouped)
    missing = [t for t in tasks if t not in mlm.names]
    if missing:
        raise DlpError(f"adapters: no adapter for task(s) {', '.join(missing)}")

    queries = {
        t: [ev.example_query(ex, caps.get(t, settings.max_new_tokens)) for ex in grouped[t]]
        for t in tqdm(tasks, desc="prompts", leave=False, disable=False)
    }
    probs = {t: [routing.get(example_key(ex)) for ex in grouped[t]] for t in tasks}

    # Every (system, task) -> list of mixes aligned with queries[t].
    plans: dict[str, dict[str, list[Mix]]] = {}
    for system in systems:
        plans[system] = {
            t: [system_mix(system, t, pr, labels, settings.p) for pr in probs[t]] for t in tasks
        }
    sweep_plans: dict[str, dict[str, list[Mix]]] = {}
    cap = settings.sweep_per_task
    for name in ("dlp", "dlp_renorm"):
        for p in settings.sweep:
            sweep_plans[f"{name}@{p:g}"] = {
                t: [system_mix(name, t, pr, labels, p) for pr in probs[t][:cap]] for t in tasks
            }

    # Mixed-task prompts: each part is a query; mixes per system.
    index = {example_key(ex): ex for ex in (pool or test)}
    mixed_q: list[tuple[Query, dict[str, Mix]]] = []
    for m in tqdm(routing.mixed, desc="mixed prompts", leave=False, disable=False):
        mixed_q.extend(_mixed_queries(ev, m, index, routing, settings, caps, systems))

    for plan in (*plans.values(), *sweep_plans.values()):
        for t in tasks:
            for q, mix in zip(queries[t], plan[t], strict=False):  # sweep: first `cap` only
                ev.want(q, mix)
    for q, mixes in mixed_q:
        for mix in mixes.values():
            ev.want(q, mix)
    ev.run_pending()

    per_task: dict[str, Any] = {}
    for t in tasks:
        kind = grouped[t][0].kind
        per_task[t] = {
            "kind": kind,
            "n": len(grouped[t]),
            "router_top1": round(
                100.0 * float(np.mean([labels[int(np.argmax(p))] == t for p in probs[t]])), 2
            ),
            "systems": {s: _task_scores(ev, queries[t], plans[s][t]) for s in systems},
        }
        if kind == "generative":  # a few answers to read next to the numbers
            per_task[t]["samples"] = [
                {
                    "reference": q.reference,
                    **{s: ev.prediction(q, plans[s][t][i]) for s in systems},
                }
                for i, q in enumerate(queries[t][:3])
            ]
    mcq_tasks = [t for t in tasks if per_task[t]["kind"] == "mcq"]
    gen_tasks = [t for t in tasks if per_task[t]["kind"] == "generative"]

    def avg(system_scores: dict[str, dict[str, float]] | None, metric: str, subset: list[str]):
        return _average([system_scores[t][metric] for t in subset]) if system_scores else None

    by_system = {s: {t: per_task[t]["systems"][s] for t in tasks} for s in systems}
    sweep: dict[str, Any] = {}
    for name, plan in sweep_plans.items():
        scores = {t: _task_scores(ev, queries[t][: len(plan[t])], plan[t]) for t in tasks}
        sizes = [len(m) for t in tasks for m in plan[t]]
        sweep[name] = {
            "mcq_accuracy": avg(scores, "accuracy", mcq_tasks),
            "generative_rougeL": avg(scores, "rougeL", gen_tasks),
            "generative_bleu": avg(scores, "bleu", gen_tasks),
            "mean_adapters": round(float(np.mean(sizes)), 3),
        }

    n_test = sum(len(grouped[t]) for t in tasks)
    router_acc: dict[str, float | None] = {}
    for s in systems:
        if s in ("base", "composite"):
            router_acc[s] = None
            continue
        hits = sum(top_adapter(m) == t for t in tasks for m in plans[s][t])
        router_acc[s] = round(100.0 * hits / n_test, 3)

    result = {
        "router_accuracy": router_acc,
        "mcq_accuracy": {s: avg(by_system[s], "accuracy", mcq_tasks) for s in systems},
        "generative_rougeL": {s: avg(by_system[s], "rougeL", gen_tasks) for s in systems},
        "generative_rouge1": {s: avg(by_system[s], "rouge1", gen_tasks) for s in systems},
        "generative_bleu": {s: avg(by_system[s], "bleu", gen_tasks) for s in systems},
        "mixed_task": {},
        "mixed_task_detail": {},
        "mean_adapters": {
            s: round(float(np.mean([len(m) for t in tasks for m in plans[s][t]])), 3)
            for s in systems
        },
        "p_sweep": sweep,
        "per_task": per_task,
        "mcq_tasks": mcq_tasks,
        "generative_tasks": gen_tasks,
        "test_examples": n_test,
        "settings": asdict(settings),
        "sweep_examples": sum(len(v) for v in next(iter(sweep_plans.values()), {}).values()),
    }
    _mixed_results(ev, mixed_q, result)
    result["evaluator"] = {**ev.stats, "seconds": round(time.monotonic() - started, 1)}
    return result


def _mixed_queries(
    ev: Evaluator,
    m: MixedPrompt,
    index: dict[str, TaskExample],
    routing: RouterOutputs,
    settings: EvalSettings,
    caps: dict[str, int],
    systems: Sequence[str] = SYSTEMS,
) -> list[tuple[Query, dict[str, Mix]]]:
    labels = routing.labels
    try:
        parts = [index[k] for k in m.parts]
    except KeyError as exc:
        raise DlpError(f"mixed prompt {m.id}: example {exc} is not in the test split") from None
    prompt_probs = routing.get(m.id)
    out = []
    for upto, ex in enumerate(parts):
        q = ev.mixed_query(m.id, parts, upto, caps.get(ex.task, settings.max_new_tokens))
        sentence_probs = routing.get(example_key(ex))
        mixes = {
            "base": {},
            "oracle": system_mix("oracle", ex.task, None, labels),
            "dlp": system_mix("dlp", ex.task, sentence_probs, labels, settings.p),
            "dlp_prompt": system_mix("dlp", ex.task, prompt_probs, labels, settings.p),
        }
        if "composite" in systems:
            mixes["composite"] = system_mix("composite", ex.task, None, labels)
        out.append((q, mixes))
    return out


def _part_score(ev: Evaluator, q: Query, mix: Mix) -> float:
    """MCQ: 100 or 0; generative: ROUGE-L F x 100 of this one answer."""
    if q.kind == "mcq":
        return 100.0 if ev.mcq_correct(q, mix) else 0.0
    return metrics.rouge([ev.prediction(q, mix)], [q.reference])["rougeL"]


def _mixed_results(
    ev: Evaluator, mixed_q: list[tuple[Query, dict[str, Mix]]], result: dict[str, Any]
) -> None:
    if not mixed_q:
        return
    detail: dict[str, Any] = {}
    for s in MIXED_SYSTEMS:
        if s not in mixed_q[0][1]:
            continue
        scores = [(q.kind, _part_score(ev, q, mixes[s])) for q, mixes in mixed_q]
        result["mixed_task"][s] = _average([v for _, v in scores])
        detail[s] = {
            "mcq_accuracy": _average([v for k, v in scores if k == "mcq"]),
            "generative_rougeL": _average([v for k, v in scores if k == "generative"]),
        }
    detail["parts"] = len(mixed_q)
    detail["prompts"] = len({q.key.split("#")[0] for q, _ in mixed_q})
    detail["score"] = "mean over parts of MCQ accuracy (0/100) or ROUGE-L F (0-100)"
    result["mixed_task_detail"] = detail


def paired_deltas(
    mlm: MultiLoraModel,
    tokenizer: Any,
    test: Sequence[TaskExample],
    routing: RouterOutputs,
    settings: EvalSettings,
    caps: dict[str, int] | None = None,
    systems: Sequence[str] = ("dlp", "dlp_renorm", "top1"),
    reference: str = "oracle",
    sweep: bool = True,
) -> dict[str, Any]:
    """Exact ``system - reference`` score differences over all of ``test``, computed only
    where the two pick different mixes (elsewhere both give the same answer by construction).

    For a confident router that is a few percent of the requests, so the issue's targets
    (DLP within 0.5 MCQ points / 1 ROUGE point of the oracle) can be measured on the whole
    test split at a fraction of the cost. Per task: MCQ accuracy and mean ROUGE-1 / ROUGE-L
    (both per-example averages, so differences add up); corpus BLEU does not decompose and is
    left out. Averages are over tasks, as in the main tables.
    """
    caps = caps or {}
    ev = Evaluator(mlm, tokenizer, settings)
    labels = routing.labels
    grouped = by_task(test)
    tasks = sorted(grouped)
    names = list(systems)
    if sweep:
        names += [f"{s}@{p:g}" for s in ("dlp", "dlp_renorm") for p in settings.sweep]

    def mix_for(name: str, task: str, probs: np.ndarray) -> Mix:
        system, _, p = name.partition("@")
        return system_mix(system, task, probs, labels, float(p) if p else settings.p)

    pairs: dict[str, dict[str, list[tuple[Query, Mix, Mix]]]] = {n: {} for n in names}
    differing = 0
    for t in tasks:
        for ex in grouped[t]:
            probs = routing.get(example_key(ex))
            ref = system_mix(reference, t, probs, labels, settings.p)
            query = None
            for n in names:
                mix = mix_for(n, t, probs)
                if mix_key(mix) == mix_key(ref):
                    continue
                if query is None:
                    query = ev.example_query(ex, caps.get(t, settings.max_new_tokens))
                    differing += 1
                pairs[n].setdefault(t, []).append((query, mix, ref))
                ev.want(query, mix)
                ev.want(query, ref)
    ev.run_pending()

    out: dict[str, Any] = {}
    for n in names:
        per_task: dict[str, dict[str, float]] = {}
        for t in tasks:
            kind = grouped[t][0].kind
            total = len(grouped[t])
            rows = pairs[n].get(t, [])
            if kind == "mcq":
                d = sum(ev.mcq_correct(q, m) - ev.mcq_correct(q, r) for q, m, r in rows)
                per_task[t] = {"accuracy": 100.0 * d / total, "changed": len(rows)}
            else:
                d1 = dl = 0.0
                for q, m, r in rows:
                    a = metrics.rouge([ev.prediction(q, m)], [q.reference])
                    b = metrics.rouge([ev.prediction(q, r)], [q.reference])
                    d1 += a["rouge1"] - b["rouge1"]
                    dl += a["rougeL"] - b["rougeL"]
                per_task[t] = {"rouge1": d1 / total, "rougeL": dl / total, "changed": len(rows)}
        mcq = [per_task[t]["accuracy"] for t in tasks if grouped[t][0].kind == "mcq"]
        gen = [t for t in tasks if grouped[t][0].kind == "generative"]
        out[n] = {
            "mcq_accuracy": _average(mcq),
            "generative_rougeL": _average([per_task[t]["rougeL"] for t in gen]),
            "generative_rouge1": _average([per_task[t]["rouge1"] for t in gen]),
            "changed_requests": sum(len(v) for v in pairs[n].values()),
            "per_task": {t: {k: round(v, 3) for k, v in d.items()} for t, d in per_task.items()},
        }
    return {
        "reference": reference,
        "test_examples": sum(len(v) for v in grouped.values()),
        "examples_scored": differing,
        "deltas": out,
        "evaluator": ev.stats,
    }
