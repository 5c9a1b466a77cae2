"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dlp.errors import DlpError
from dlp.eval.metrics import argmax, bleu, generative_scores, mcq_accuracy, rouge


def test_mcq_accuracy_picks_the_highest_log_likelihood():
    scores = [[-1.0, -2.0], [-3.0, -0.5, -9.0], [-2.0, -2.0]]
    # picks: 0, 1, 0 (first on ties)
    assert mcq_accuracy(scores, [0, 1, 1]) == pytest.approx(200 / 3)
    assert argmax([-2.0, -2.0]) == 0
    with pytest.raises(DlpError):
        mcq_accuracy(scores, [0])


def test_bleu_is_word_level_with_sacrebleu_smoothing():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # "a b c d" vs "a b c e": precisions 3/4, 2/3, 1/2, and 0/1 smoothed ('exp') to 1/2;
    # same length, so no brevity penalty: BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4).
    expected = 100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    assert bleu(["a b c d"], ["a b c e"]) == pytest.approx(expected, abs=1e-3)
    # One wrong word shares all but one character: character BLEU would be high, word BLEU 0.
    assert bleu(["abcdefgh"], ["abcdefgx"]) == pytest.approx(0.0, abs=1e-9)


def test_bleu_brevity_penalty():
    # A 4-word prefix of an 8-word reference: every n-gram precision is 1, so BLEU is the
    # brevity penalty exp(1 - 8/4).
    hyp, ref = "a b c d", "a b c d e f g h"
    bp = math.exp(1 - 8 / 4)
    assert bleu([hyp], [ref]) == pytest.approx(100 * bp, abs=1e-3)


def test_rouge_f_measures():
    # pred "the cat" vs ref "the cat sat": P=1, R=2/3 -> F=0.8 for both ROUGE-1 and ROUGE-L.
    r = rouge(["the cat"], ["the cat sat"])
    assert r["rouge1"] == pytest.approx(80.0)
    assert r["rougeL"] == pytest.approx(80.0)
    # Same words, other order: ROUGE-1 = 100, LCS "a c" or similar is 2 of 3 -> 66.7.
    r = rouge(["a b c"], ["b a c"])
    assert r["rouge1"] == pytest.approx(100.0)
    assert r["rougeL"] == pytest.approx(200 / 3)
    # Averaged over examples.
    assert rouge(["x", "y"], ["x", "z"])["rougeL"] == pytest.approx(50.0)


def test_generative_scores_keys_and_length_check():
    assert set(generative_scores(["a"], ["a"])) == {"bleu", "rouge1", "rougeL"}
    with pytest.raises(DlpError):
        bleu(["a"], ["a", "b"])
