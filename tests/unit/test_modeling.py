"""The from-scratch tokenizer and model: ids agree across loaders, ToRL text round-trips, shapes suit vLLM CPU."""

import json

import pytest

from torl.modeling import IM_END, PAD_TOKEN, ModelShape, build_model, padded_vocab

TORL_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "User: Please integrate natural language reasoning with programs to solve the problem above, and put your final "
    "answer within \\boxed{}.\nWhat is the remainder when 987654 is divided by 37?\nAssistant:\n"
    "I will compute it.\n```python\nprint(987654 % 37)\n```\n```output\n21\n```\nSo the answer is \\boxed{21}."
)


@pytest.fixture(scope="module")
def auto_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    "text",
    [
        TORL_TEXT,
        "```output\nZeroDivisionError: division by zero\n```\n",
        "x = 3/4  # é ü 中文 \t\n\n  end",
        "\\boxed{-17/5}",
    ],
)
def test_auto_tokenizer_ids_equal_tokenizer_json_ids(tiny_model_dir, auto_tok, text):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ids = auto_tok(text, add_special_tokens=False).input_ids
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert auto_tok.decode(ids) == text


def test_digits_are_single_tokens(auto_tok):
    ids = auto_tok("1234567890", add_special_tokens=False).input_ids
    assert [auto_tok.decode([i]) for i in ids] == list("1234567890")


def test_special_tokens_and_chat_template(tiny_model_dir, auto_tok):
    assert auto_tok.eos_token == IM_END and auto_tok.pad_token == PAD_TOKEN
    assert auto_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert auto_tok("a<|im_end|>", add_special_tokens=False).input_ids[-1] == 2
    text = auto_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0


def test_checkpoint_is_small_tied_qwen2(tiny_model_dir, auto_tok):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    assert cfg["vocab_size"] >= len(auto_tok)


def test_build_model_rejects_head_dim_vllm_cannot_run():
    with pytest.raises(ValueError, match="head_dim"):
        build_model(ModelShape(hidden=64, heads=4, kv_heads=1), vocab_size=512, seed=0)


def test_build_model_is_deterministic_given_seed():
    a = build_model(ModelShape(), vocab_size=320, seed=3)
    b = build_model(ModelShape(), vocab_size=320, seed=3)
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_padded_vocab():
    assert padded_vocab(512) == 512 and padded_vocab(513) == 576
