"""Prompt templates: ToRL's tir_base_0309 byte-exact, the 0307 variant, and the chat-template path."""

import pytest

from torl.data.prompts import TEMPLATES, TIR_INSTRUCTION, build_prompt

# Copied character for character from docs/torl-behaviour.md ("Prompt template") (with "\n" written as a newline).
REFERENCE_0309 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "User: Please integrate natural language reasoning with programs to solve the problem above, and put your final "
    "answer within \\boxed{}.\n{QUESTION}\nAssistant:\n"
)


def test_tir_base_0309_is_byte_exact():
    q = "What is $\\frac{1}{2} + \\frac{1}{3}$?"
    assert build_prompt(q, "tir_base_0309") == REFERENCE_0309.replace("{QUESTION}", q)
    assert build_prompt(q) == build_prompt(q, "tir_base_0309")  # the config default


def test_tir_base_0307_adds_r1_zero_sentence_and_keeps_instruction():
    q = "Compute 2+2."
    text = build_prompt(q, "tir_base_0307")
    assert text.startswith("A conversation between User and Assistant. The user asks a question, and the Assistant")
    assert (
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the"
        " answer.\nUser: " + TIR_INSTRUCTION + "\n" + q + "\nAssistant:\n" in text
    )
    assert text != build_prompt(q, "tir_base_0309")


@pytest.mark.parametrize("q", ["{x} and {0} and {question}", "a\\boxed{}b", "line1\nline2"])
def test_question_is_inserted_verbatim(q):
    for name in TEMPLATES:
        text = build_prompt(q, name)
        assert text.count(q) == 1 and text.endswith(q + "\nAssistant:\n")


class _ChatTokenizer:
    """Edge fake: records the messages and renders them like a ChatML template."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"


def test_chat_template_path():
    text = build_prompt("Find x.", "chat", tokenizer=_ChatTokenizer())
    assert text == (
        f"<|im_start|>system\n{TIR_INSTRUCTION}<|im_end|>\n"
        "<|im_start|>user\nFind x.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_without_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("q", "chat")


def test_unknown_template_and_empty_question():
    with pytest.raises(ValueError, match="unknown prompt template 'tir_base_0310'"):
        build_prompt("q", "tir_base_0310")
    with pytest.raises(ValueError, match="non-empty"):
        build_prompt("  ", "tir_base_0309")
