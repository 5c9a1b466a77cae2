"""Tiny real components for the training / eval tests: a byte-level chat tokenizer built in
memory (same code path as SmolLM2's BPE + ChatML template), a random tiny Llama, and a small
task table with the columns ``dlp data prepare`` writes. Imported by both test packages."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dlp.training.examples import TaskExample

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    """Byte-level BPE with no merges: one token per byte, plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


COLORS = ["red", "blue", "green"]


def _rows_for(task: str, rnd: random.Random) -> tuple[str, list[str], str, str]:
    if task == "parity":
        n = rnd.randint(0, 99)
        return f"is {n} even or odd?", ["even", "odd"], ["even", "odd"][n % 2], "mcq"
    if task == "color":
        c = rnd.choice(COLORS)
        return f"the sky of {c} is", list(COLORS), c, "mcq"
    if task == "bigger":
        a, b = rnd.sample(range(10), 2)
        return f"which is bigger: {a} or {b}", [str(a), str(b)], str(max(a, b)), "mcq"
    # generative: repeat the word twice
    w = rnd.choice(["cat", "dog", "sun", "map"])
    return f"say {w} twice", [], f"{w} {w}", "generative"


TASKS = ["bigger", "color", "echo", "parity"]


def make_examples(split: str, n_per_task: int, seed: int) -> list[TaskExample]:
    rnd = random.Random(seed)
    out = []
    for task in TASKS:
        for i in range(n_per_task):
            text, choices, target, kind = _rows_for(task, rnd)
            out.append(TaskExample(task, f"{split}-{i}", text, target, kind, tuple(choices)))
    return out


def write_table(path: Path, n_train: int = 24, n_test: int = 6) -> Path:
    """tasks.parquet with train / validation / test rows of the four toy tasks."""
    rows: dict[str, list] = {
        k: [] for k in ("task", "split", "id", "input", "choices", "target", "kind")
    }
    for split, n, seed in (("train", n_train, 1), ("validation", 4, 2), ("test", n_test, 3)):
        for ex in make_examples(split, n, seed):
            rows["task"].append(ex.task)
            rows["split"].append(split)
            rows["id"].append(ex.id)
            rows["input"].append(ex.input)
            rows["choices"].append(list(ex.choices))
            rows["target"].append(ex.target)
            rows["kind"].append(ex.kind)
    path.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("task", pa.string()),
            ("split", pa.string()),
            ("id", pa.string()),
            ("input", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("target", pa.string()),
            ("kind", pa.string()),
        ]
    )
    pq.write_table(pa.table(rows, schema=schema), path / "tasks.parquet")
    return path
