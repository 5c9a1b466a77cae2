"""Task metrics: MCQ accuracy from choice log-likelihoods; BLEU and ROUGE for generative tasks.

BLEU is sacrebleu's corpus BLEU with its standard word tokenizer (13a), not a character
BLEU (the DLP-LoRA code's choice, which inflates scores). ROUGE-1 / ROUGE-L are
rouge-score's F-measures averaged over examples. Every score is on a 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Sequence

from dlp.errors import DlpError


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic)."""
    if not values:
        raise DlpError("cannot pick from an empty list of scores")
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mcq_accuracy(choice_scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Percentage of examples whose highest-scoring choice is the gold one."""
    if len(choice_scores) != len(gold):
        raise DlpError(f"{len(choice_scores)} score lists for {len(gold)} gold answers")
    if not gold:
        return float("nan")
    hits = sum(argmax(s) == g for s, g in zip(choice_scores, gold, strict=True))
    return 100.0 * hits / len(gold)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU over words (sacrebleu, 13a tokenizer, one reference per example)."""
    import sacrebleu

    _same_length(predictions, references)
    if not predictions:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="13a").score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measures (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    if not predictions:
        return {"rouge1": float("nan"), "rougeL": float("nan")}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}


def generative_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"bleu", "rouge1", "rougeL"}`` for one task."""
    return {"bleu": bleu(predictions, references), **rouge(predictions, references)}


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise DlpError(f"{len(predictions)} predictions for {len(references)} references")
