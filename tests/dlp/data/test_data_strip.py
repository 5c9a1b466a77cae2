from dlp.data.strip import common_prefix, common_suffix, replace_labels, strip_boilerplate


def test_prefix_label_is_stripped_only_at_a_clause_boundary() -> None:
    labelled = [f"Premise: item {i} is here." for i in range(20)]
    assert common_prefix(labelled) == "Premise:"
    # shared words that end mid-sentence are content, not a template
    sentences = [f"On the table {i} lies a pen." for i in range(20)]
    assert common_prefix(sentences) == ""


def test_share_threshold_is_90_percent() -> None:
    texts = [f"Question: thing {i}?" for i in range(9)] + ["something else entirely"]
    assert common_prefix(texts) == "Question:"  # 9 / 10
    texts = [f"Question: thing {i}?" for i in range(8)] + ["other one", "other two"]
    assert common_prefix(texts) == ""  # 8 / 10


def test_suffix_on_its_own_line_or_after_a_sentence() -> None:
    texts = [f"Argument {i} goes here.\n Is the argument valid or invalid?" for i in range(10)]
    assert common_suffix(texts) == "Is the argument valid or invalid?"
    texts = [f"Do X {i} then Y. Which should happen first?" for i in range(10)]
    assert common_suffix(texts) == "Which should happen first?"
    # a fixed tail after a varying quote is part of the question, not boilerplate
    texts = [f'Were the lines "a{i}." spoken by the same person?' for i in range(10)]
    assert common_suffix(texts) == ""


def test_single_punctuation_is_not_boilerplate() -> None:
    assert common_suffix([f"Claim number {i} ." for i in range(10)]) == ""


def test_never_strips_the_whole_input() -> None:
    texts = ["Premise:"] * 10 + ["Premise: content"]
    out, _, _ = strip_boilerplate(texts)
    assert all(out)


def test_labels_become_line_breaks() -> None:
    text = 'agent_A: "hi there" agent_B: "hello"'
    assert replace_labels(text, ["agent_A:", "agent_B:"]).strip() == '"hi there"\n"hello"'
    # a label glued to a longer word is left alone
    assert replace_labels("xContext: y", ["Context:"]) == "xContext: y"


def test_strip_boilerplate_end_to_end() -> None:
    raw = [f"\nPremise: Ann {i} sleeps. Hypothesis: Bob {i} sleeps." for i in range(12)]
    out, prefix, suffix = strip_boilerplate(
        raw, harness_prefixes=["Identify the relation.\n", "\n"], labels=["Hypothesis:"]
    )
    assert prefix == "Premise:" and suffix == ""
    assert out[3] == "Ann 3 sleeps.\nBob 3 sleeps."


def test_harness_prefix_in_the_input_is_dropped() -> None:
    raw = [f"Sort the following words alphabetically: w{i} v{i}" for i in range(3)]
    out, _, _ = strip_boilerplate(
        raw, harness_prefixes=["Sort the following words alphabetically:"]
    )
    assert out == [f"w{i} v{i}" for i in range(3)]
