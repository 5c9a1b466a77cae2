"""greedy_kernel: the two-kernel argmax against ``torch.argmax``, under Triton's CPU
interpreter (one child process for every case), and on the GPU where there is one."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import interpreted_fixture

from dlp.engine.greedy_kernel import CHUNKS, greedy_tokens

# name -> (rows, vocab, dtype, how the logits are made)
CASES = {
    "qwen2_vocab_bf16": (3, 151936, "bfloat16", "randn"),
    "ragged_f32": (5, 1000, "float32", "randn"),  # vocab not a multiple of the pieces
    "ties_f32": (6, 5000, "float32", "ties"),  # many equal maxima within and across pieces
    "max_in_last_piece": (2, 4099, "float32", "last"),
    "all_equal": (2, 3000, "float32", "equal"),
    # pieces of -inf only (masked vocabularies), and one row that is -inf throughout
    "neg_inf_pieces": (3, 5000, "float32", "neginf"),
}

_CHILD = """
    import torch

    from dlp.engine.greedy_kernel import greedy_tokens

    out = {}
    for name, (rows, vocab, dtype, how) in json.loads(sys.argv[1]).items():
        torch.manual_seed(0)
        x = torch.randn(rows, vocab)
        if how == "ties":
            x = torch.randint(0, 3, (rows, vocab)).float()
        elif how == "last":
            x[:, -1] = 100.0
        elif how == "equal":
            x = torch.ones(rows, vocab)
        elif how == "neginf":
            x[:, : vocab // 2] = float("-inf")
            x[1, vocab // 2 + 7 :] = float("-inf")
            x[2] = float("-inf")
        x = x.to(getattr(torch, dtype))
        out[name] = {"got": greedy_tokens(x).tolist(), "want": x.argmax(-1).tolist()}
    print(json.dumps(out))
"""


interpreted = interpreted_fixture(_CHILD, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_argmax(interpreted, name):
    res = interpreted[name]
    assert res["got"] == res["want"], res


def test_falls_back_to_argmax_where_the_kernel_does_not_apply():
    x = torch.randn(4, CHUNKS - 1)  # fewer logits than pieces (and a CPU tensor)
    assert torch.equal(greedy_tokens(x), x.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [False, True])
def test_cuda_matches_argmax(pdl):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 151936, generator=gen, device="cuda").bfloat16()
    ties = torch.randint(0, 3, (64, 128256), generator=gen, device="cuda").float()
    for logits in (x, ties):
        assert torch.equal(greedy_tokens(logits, pdl=pdl), logits.argmax(-1))
        compiled = torch.compile(lambda t: greedy_tokens(t, pdl=pdl), fullgraph=True)
        assert torch.equal(compiled(logits), logits.argmax(-1))
