"""Build small Qwen2-architecture checkpoints from scratch: a byte-level BPE tokenizer and a random-init model.

The tokenizer is trained with Qwen2's own pre-tokenizer (regex split + byte-level, NFC), so that
``AutoTokenizer`` (which swaps in ``Qwen2Tokenizer`` when ``config.json`` says ``qwen2``) and vLLM produce the same
ids as the saved ``tokenizer.json`` (docs/platform-notes.md §4). Digits are single tokens, as in Qwen. Special tokens:
``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), plus a ChatML chat template.

Not here: the task generator and trace synthesis (``torl.data.tasks``), pretraining (``torl.models.pretrain``), the job
that caches a built model on disk (``jobs/make_base_model.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenization regex (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX): digits are split one by one.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2 in this order

# Qwen-style ChatML template (no default system message, so prompts stay short for a small model).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A few lines covering the ToRL template, code and observation frames: enough for the seconds-to-build test
# tokenizer. The real recipe trains on its synthetic traces instead (and adds these lines too).
SEED_CORPUS = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "User: Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}.\nWhat is 123 times 456?\nAssistant:\n",
    "Let me compute it with Python.\n```python\nprint(123 * 456)\n```\n```output\n56088\n```\n"
    "The answer is \\boxed{56088}.",
    "```python\nfrom math import comb\nfrom fractions import Fraction\nx = comb(10, 3)\nprint(x % 7)\n```\n",
    "```output\nNameError: name 'a' is not defined\n```\nTraceback (most recent call last):\n",
    "Find the remainder when 98765 is divided by 43. The sum of the first 20 terms is 3/4 so the value is -1/2.",
    "def solve():\n    total = 0\n    for i in range(1, 11):\n        total += i ** 2\n    return total\n",
    "import sympy\nx, y = sympy.symbols('x y')\nprint(sympy.solve([2*x + 3*y - 7, x - y + 1], [x, y]))\n",
    "So the answer is \\boxed{42}. Therefore, the final answer is \\boxed{\\frac{3}{4}}.",
)


@dataclass(frozen=True)
class ModelShape:
    """Size of a small Qwen2 model; head_dim = hidden / heads must be one vLLM's CPU attention supports (32, 64)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 128
    max_positions: int = 2048
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # docs/platform-notes.md §5


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with Qwen2's pre-tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Every byte is in the base alphabet, so any text round-trips; the three special tokens get ids 0, 1, 2.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens (259)")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # Qwen2Tokenizer uses NFC; keep it so ids agree on any input
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(SEED_CORPUS) + list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    logger.info("trained tokenizer: %d tokens (asked %d)", len(fast), vocab_size)
    return fast


def build_model(shape: ModelShape, vocab_size: int, seed: int, tokenizer=None):
    """A random-init ``Qwen2ForCausalLM`` (fp32, tied embeddings); token ids of specials come from ``tokenizer``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape.hidden % shape.heads or shape.head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"hidden={shape.hidden}/heads={shape.heads} gives head_dim {shape.hidden / shape.heads}; "
            f"vLLM CPU attention needs one of {VLLM_CPU_HEAD_DIMS}"
        )
    if shape.heads % shape.kv_heads:
        raise ValueError(f"heads={shape.heads} is not a multiple of kv_heads={shape.kv_heads}")
    eos = tokenizer.convert_tokens_to_ids(IM_END) if tokenizer is not None else 2
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN) if tokenizer is not None else 0
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.to(torch.float32)
    return model


def padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of ``n_tokens`` (rounded up; a larger table works in HF and vLLM)."""
    return -(-n_tokens // multiple) * multiple


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model (safetensors), tokenizer and a generation config that stops on ``<|im_end|>``."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_random_checkpoint(
    out_dir: str | Path,
    shape: ModelShape | None = None,
    seed: int = 0,
    corpus: Iterable[str] = (),
    vocab_size: int = 512,
) -> Path:
    """Tokenizer + random-init model saved to ``out_dir`` in about a second (the test fixture's model)."""
    shape = shape or ModelShape()
    tokenizer = train_tokenizer(corpus, vocab_size)
    model = build_model(shape, padded_vocab(len(tokenizer)), seed, tokenizer)
    return save_checkpoint(model, tokenizer, out_dir)
