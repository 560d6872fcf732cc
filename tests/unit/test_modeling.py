"""The from-scratch tokenizer and model: ids agree across loaders, ToRL text round-trips, shapes suit vLLM CPU."""

import json

import pytest

from torl.models.modeling import IM_END, PAD_TOKEN, ModelShape, build_model, padded_vocab

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


# --- the pretraining recipe (torl.models.pretrain)
# ---------------------------------------------------------------------


def test_encode_trace_matches_how_the_tool_loop_builds_ids(auto_tok):
    import random

    from torl.data import tasks
    from torl.models import pretrain
    from torl.rollout.tool_loop import observation_insert

    rng = random.Random(0)
    ts = tasks.make_tasks("train", 200, seed=0)
    seen = set()
    for t in ts:
        prompt, response, kind = tasks.make_trace(t, rng, code_frac=0.5, bug_frac=0.3)
        ex = pretrain.encode_trace(auto_tok, prompt, response, kind)
        enc = lambda s: auto_tok(s, add_special_tokens=False).input_ids  # noqa: E731
        if kind == "text":
            want = enc(prompt) + enc(response) + [auto_tok.eos_token_id]
            assert ex.mask == [0] * len(enc(prompt)) + [1] * (len(want) - len(enc(prompt)))
        else:
            round_text, rest = response.split("```output\n", 1)
            body, after = rest.split("\n```\n", 1)
            obs = observation_insert(round_text, "", body, "```output")
            want = enc(prompt) + enc(round_text + "```output") + enc(obs) + enc(after) + [auto_tok.eos_token_id]
            assert sum(1 for m in ex.mask if m == 0) == len(enc(prompt)) + len(enc(obs))
        assert ex.ids == want
        seen.add(kind)
    assert seen == {"text", "code", "bug"}


def test_recipe_overrides_fingerprint_and_unknown_keys():
    from torl.config import ConfigError
    from torl.models.pretrain import BaseModelRecipe, load_recipe

    base = BaseModelRecipe()
    assert load_recipe([], ["steps=7"]).steps == 7
    assert load_recipe([], ["output_dir=/x", "eval_n=3"]).fingerprint() == base.fingerprint()
    assert load_recipe([], ["seed=2"]).fingerprint() != base.fingerprint()
    with pytest.raises(ConfigError, match="hiden"):
        load_recipe([], ["hiden=32"])


def test_lr_schedule_warms_up_then_decays_to_floor():
    from torl.models.pretrain import BaseModelRecipe, _lr_at

    r = BaseModelRecipe(steps=100, warmup_steps=10, lr=1.0, min_lr_frac=0.1)
    assert _lr_at(0, r) == pytest.approx(0.1) and _lr_at(9, r) == pytest.approx(1.0)
    assert _lr_at(99, r) == pytest.approx(0.1, abs=0.01)


def test_fixture_model_was_built_by_the_recipe(tiny_model_dir):
    meta = json.loads((tiny_model_dir / "recipe.json").read_text())
    assert meta["recipe"]["hidden"] == 64 and meta["final_loss"] < 6.0
    assert set(meta["trace_kinds"]) == {"code", "bug", "text"}


def test_recipe_fields_added_later_keep_the_shipped_fingerprint_until_set():
    from pathlib import Path

    from torl.models.pretrain import load_recipe

    repo = Path(__file__).resolve().parents[2]
    default = load_recipe([str(repo / "configs" / "base_model.yaml")])
    shipped = json.loads((repo / "models" / "torl-tiny-base" / "recipe.json").read_text())["fingerprint"]
    assert default.fingerprint() == shipped  # bug_style and fix_frac came later: at their defaults they are not hashed
    realistic = load_recipe([str(repo / "configs" / "base_model.yaml")], ["bug_style=realistic"])
    assert realistic.fingerprint() != shipped
    assert load_recipe([], ["bug_style=realistic", "fix_frac=0.4"]).fingerprint() != realistic.fingerprint()
    assert load_recipe([], ["easy_code_frac=0.2"]).fingerprint() not in (shipped, default.fingerprint())
