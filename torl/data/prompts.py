"""Prompt templates: turn a problem's question into the text the model continues.

``tir_base_0309`` is ToRL's training and evaluation prompt (``verl/utils/dataset/rl_dataset.py``), reproduced
byte-exact: a plain-text base-model prompt, no chat template, the question after the instruction (the instruction
still says "the problem above", as in ToRL and the paper's Figure 3). ``tir_base_0307`` is ToRL's older R1-Zero-style
variant. ``chat`` formats the same instruction with the tokenizer's chat template, for instruct models.

Not here: tokenisation and prompt-length filtering (the data/rollout side does that with the model's tokenizer).
"""

from __future__ import annotations

from typing import Any

# The instruction both ToRL templates share (ToRL: rl_dataset.py, template_type tir_base_0309 / tir_base_0307).
TIR_INSTRUCTION = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)

_PREAMBLE_0309 = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it."
# ToRL's older variant adds DeepSeek-R1-Zero's sentence. Reconstructed from the reference description (the ToRL
# source of this variant is not available here); the line structure follows tir_base_0309.
_PREAMBLE_0307 = (
    _PREAMBLE_0309 + " The assistant first thinks about the reasoning process in the mind and then provides the user"
    " with the answer."
)

TEMPLATES: dict[str, str] = {
    "tir_base_0309": _PREAMBLE_0309 + "\nUser: " + TIR_INSTRUCTION + "\n{question}\nAssistant:\n",
    "tir_base_0307": _PREAMBLE_0307 + "\nUser: " + TIR_INSTRUCTION + "\n{question}\nAssistant:\n",
}


def build_prompt(question: str, template: str = "tir_base_0309", tokenizer: Any = None) -> str:
    """The prompt text for ``question`` under ``template`` (a ``PromptConfig.template`` value).

    >>> build_prompt("1+1?").endswith("\\n1+1?\\nAssistant:\\n")
    True

    ``chat`` needs a Hugging Face tokenizer with a chat template; the instruction goes into the system message and
    the question into the user message (the layout of Qwen2.5-Math-Instruct's TIR prompt), and the assistant turn is
    opened with ``add_generation_prompt=True``.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"build_prompt: question must be a non-empty string, got {question!r}")
    if template in TEMPLATES:
        # str.replace, not str.format: questions contain braces ("\frac{1}{2}") that format would choke on.
        return TEMPLATES[template].replace("{question}", question)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat template (tokenizer.chat_template)")
        messages = [{"role": "system", "content": TIR_INSTRUCTION}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    raise ValueError(f"unknown prompt template {template!r}; choose one of {[*TEMPLATES, 'chat']}")
