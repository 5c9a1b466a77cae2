"""Small synthetic routing data and a real (tiny, word-level) fast tokenizer built in memory.

The router only needs a tokenizer that maps text to ids; a word-level ``tokenizers`` model
wrapped in ``PreTrainedTokenizerFast`` is the same code path as the base model's BPE one.
"""

from __future__ import annotations

import random

WORDS = [f"w{i}" for i in range(40)]
ORDER_WORDS = [f"o{i}" for i in range(12)]
KEYWORDS = {
    "arith": ["add", "sum", "plus", "number"],
    "colors": ["red", "blue", "green", "shade"],
    "story": ["once", "hero", "village", "dragon"],
}
TASKS = [*KEYWORDS, "ascending", "descending"]


def make_text(task: str, rnd: random.Random) -> str:
    if task in KEYWORDS:
        words = rnd.sample(WORDS, 6) + rnd.sample(KEYWORDS[task], 2)
        rnd.shuffle(words)
        return " ".join(words)
    # Same words, only their order differs: unigram bags cannot tell these two apart.
    words = sorted(rnd.sample(ORDER_WORDS, 5), key=lambda w: int(w[1:]))
    if task == "descending":
        words.reverse()
    return " ".join(words)


def make_split(n_per_task: int, seed: int) -> tuple[list[str], list[str]]:
    rnd = random.Random(seed)
    texts, labels = [], []
    for task in TASKS:
        for _ in range(n_per_task):
            texts.append(make_text(task, rnd))
            labels.append(task)
    return texts, labels


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", *WORDS, *ORDER_WORDS, *(w for ws in KEYWORDS.values() for w in ws)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
