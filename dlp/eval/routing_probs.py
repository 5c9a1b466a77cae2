"""Router outputs for an evaluation, computed once and stored as JSON.

The router runs on the CPU in serving, and it does here too: ``dlp eval --route-only`` writes
the probabilities of every test example (routed on its own input, as a request is) and of
every mixed-task prompt (routed once on the whole text, the released code's behaviour), so
the LLM part of the evaluation can run elsewhere (e.g. the GPU machine) without the router.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlp.errors import DlpError
from dlp.eval.mixed import MixedPrompt, example_key, prompt_level_text
from dlp.training.examples import TaskExample

FORMAT = 1


@dataclass
class RouterOutputs:
    labels: list[str]
    probs: dict[str, np.ndarray]  # example key or mixed-prompt id -> [len(labels)]
    mixed: list[MixedPrompt]
    meta: dict[str, Any]

    def get(self, key: str) -> np.ndarray:
        try:
            return self.probs[key]
        except KeyError:
            raise DlpError(f"router outputs have no entry for {key!r}") from None

    def restrict(self, labels: Sequence[str]) -> RouterOutputs:
        """The router as a server with only ``labels`` registered would use it: other
        adapters' probabilities dropped and the rest renormalised; mixed prompts kept only
        when all their parts belong to ``labels``."""
        missing = [lab for lab in labels if lab not in self.labels]
        if missing:
            raise DlpError(f"router has no label(s) {', '.join(missing)}")
        cols = [self.labels.index(lab) for lab in labels]
        probs = {}
        for key, row in self.probs.items():
            sub = row[cols]
            total = float(sub.sum())
            probs[key] = sub / total if total > 0 else np.full(len(cols), 1.0 / len(cols))
        keep = set(labels)
        mixed = [m for m in self.mixed if all(p.split("/")[0] in keep for p in m.parts)]
        meta = {**self.meta, "restricted_to": list(labels)}
        return RouterOutputs(labels=list(labels), probs=probs, mixed=mixed, meta=meta)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "labels": self.labels,
            "meta": self.meta,
            "mixed": [{"id": m.id, "parts": list(m.parts)} for m in self.mixed],
            "probs": {k: v.tolist() for k, v in self.probs.items()},
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: Path) -> RouterOutputs:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DlpError(f"router-probs: cannot read {path}: {exc}") from exc
        if raw.get("format") != FORMAT:
            raise DlpError(f"router-probs: {path} has format {raw.get('format')}, need {FORMAT}")
        labels = list(raw["labels"])
        probs = {k: np.asarray(v, dtype=np.float64) for k, v in raw["probs"].items()}
        bad = [k for k, v in probs.items() if v.shape != (len(labels),)]
        if bad:
            raise DlpError(f"router-probs: entry {bad[0]!r} does not have {len(labels)} values")
        mixed = [MixedPrompt(id=m["id"], parts=tuple(m["parts"])) for m in raw.get("mixed", [])]
        return cls(labels=labels, probs=probs, mixed=mixed, meta=dict(raw.get("meta", {})))


def route_examples(
    router_dir: Path,
    examples: Sequence[TaskExample],
    mixed: Sequence[MixedPrompt],
) -> RouterOutputs:
    """Run the trained router (dlp.routing.router) over the test inputs and mixed prompts."""
    from dlp.routing.router import MiniMLPRouter

    router = MiniMLPRouter.load(router_dir)
    labels = list(router.labels)
    index = {example_key(ex): ex for ex in examples}
    keys = list(index)
    texts = [index[k].input for k in keys]
    for m in mixed:
        keys.append(m.id)
        texts.append(prompt_level_text([index[p] for p in m.parts]))
    probs = np.asarray(router.predict_proba(texts), dtype=np.float64)
    return RouterOutputs(
        labels=labels,
        probs={k: probs[i] for i, k in enumerate(keys)},
        mixed=list(mixed),
        meta={"router_dir": str(router_dir), "parameters": int(router.num_parameters())},
    )


def router_summary(
    routing: RouterOutputs, sweep: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
) -> dict[str, Any]:
    """Top-1 accuracy over the test inputs (keys ``task/id``) and, per p, how many adapters
    the top-p rule keeps: what routing alone decides, before any LLM runs."""
    from dlp.routing.select import top_p_indices

    keys = [k for k in routing.probs if "/" in k]
    tasks = [k.split("/")[0] for k in keys]
    hits = [
        routing.labels[int(np.argmax(routing.probs[k]))] == t
        for k, t in zip(keys, tasks, strict=True)
    ]
    out: dict[str, Any] = {"requests": len(keys), "top1_accuracy": 100.0 * float(np.mean(hits))}
    for p in sweep:
        sizes = np.array([len(top_p_indices(routing.probs[k], p)) for k in keys])
        out[f"p={p:g}"] = {
            "mean_adapters": round(float(sizes.mean()), 4),
            "single_adapter_pct": round(100.0 * float(np.mean(sizes == 1)), 2),
        }
    return out
