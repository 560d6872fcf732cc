"""Pretrain the project's small base model on synthetic ToRL-format traces, deterministically, on CPU.

``build_base_model(recipe, out_dir)`` draws traces from ``torl.data.tasks`` (train split only: the held-out split is
never seen), trains a byte-level BPE on them (``torl.models.modeling``), then trains a random-init Qwen2 with
next-token loss on the response tokens (the prompt is context only; the observation body is masked, as RL will mask it,
so the model never learns to predict tool output). Data order, initialisation and sampling are fixed by
``recipe.seed``. The output is an ordinary HF checkpoint plus ``recipe.json`` holding the recipe and its hash, which
the job uses as a cache key.

Not here: the command line and caching policy (``jobs/make_base_model.py``), measuring the result
(``torl.models.base_report``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from torl.config import opt
from torl.data import tasks
from torl.infra.progress import Progress
from torl.models import modeling

logger = logging.getLogger(__name__)

# Bump when trace synthesis or training changes in a way the recipe fields do not capture (invalidates caches).
RECIPE_VERSION = 2
OUTPUT_OPEN = "```output\n"
FIRST_LOSSES = 8
OUTPUT_CLOSE = "\n```\n"
# Recipe fields added after models/torl-tiny-base shipped, with the value that leaves its traces unchanged.
LATER_FIELDS = {"bug_style": "simple", "fix_frac": 0.0, "easy_code_frac": None}


@dataclass(frozen=True)
class BaseModelRecipe:
    """Everything that determines the base model. Defaults are the CPU default model (configs/base_model.yaml)."""

    output_dir: str = opt("models/torl-tiny-base", "where the model goes (relative paths: the checkout)")
    seed: int = opt(1, "fixes traces, their order, the tokenizer and the initial weights")
    num_traces: int = opt(12000, "pretraining traces drawn from the train split (repeats allowed)")
    easy_frac: float = opt(tasks.EASY_FRAC, "share of easy items (text-only answers can be right)")
    code_frac: float = opt(0.4, "share of traces that write code (ToRL's base model: ~40% at step 0)")
    easy_code_frac: float | None = opt(
        None,
        "share of easy-item traces that write code; None = code_frac (the choice ignores the item). The selective"
        " preset's model writes code on easy items less often than on hard ones, as a real base model's tool"
        " propensity depends on the problem, which gives RL a feature to separate them by",
    )
    bug_frac: float = opt(0.08, "share of code traces whose code fails (real error shown, then a guess or a fix)")
    hard_text_acc: float = opt(0.1, "how often a text-only answer to a hard item (or a guess after an error) is right")
    bug_style: Literal["simple", "realistic"] = opt(
        "simple",
        "simple: a stray name, dropped import or syntax error, then a guess (the CPU default). realistic: a typo'd"
        " name, missing import, off-by-one index or / for //, then a fix in fix_frac of cases (torl.data.tasks)",
    )
    fix_frac: float = opt(0.0, "bug_style=realistic: share of failed programs followed by a block that fixes them")
    vocab_size: int = opt(768, "byte-level BPE vocabulary asked for (the trainer may stop short)")
    tokenizer_traces: int = opt(3000, "traces the BPE is trained on")
    hidden: int = opt(128, "Qwen2 hidden size; head_dim = hidden / heads must suit vLLM's CPU attention")
    layers: int = opt(4, "decoder layers")
    heads: int = opt(4, "attention heads")
    kv_heads: int = opt(2, "key/value heads (grouped-query attention)")
    intermediate: int = opt(512, "MLP width")
    max_positions: int = opt(2048, "longest context the model supports")
    steps: int = opt(1500, "optimizer steps")
    batch_size: int = opt(32, "traces per step")
    lr: float = opt(3e-3, "peak AdamW learning rate")
    min_lr_frac: float = opt(0.1, "cosine decay to lr * min_lr_frac")
    warmup_steps: int = opt(100, "linear warm-up steps")
    weight_decay: float = opt(0.01, "AdamW weight decay on matrices (not on norms or biases)")
    grad_clip: float = opt(1.0, "gradient norm clip")
    threads: int = opt(
        0,
        "torch.set_num_threads; 0 = every core (the build runs alone, before any actor). Use 1 when something else"
        " is busy on the machine: there two threads ran ~7x slower than one.",
    )
    eval_n: int = opt(256, "held-out problems of the report measured after training (0 = skip)")

    def shape(self) -> modeling.ModelShape:
        return modeling.ModelShape(
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            intermediate=self.intermediate,
            max_positions=self.max_positions,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of what determines the weights (not where they go, nor the report size)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("output_dir", "eval_n", "threads")}
        # Fields added after a model shipped enter the hash only when set, so that model keeps its fingerprint.
        fields = {k: v for k, v in fields.items() if LATER_FIELDS.get(k, object()) != v}
        blob = json.dumps({"version": RECIPE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_recipe(
    files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()
) -> BaseModelRecipe:
    """A recipe from YAML files (later wins) and ``key=value`` overrides; unknown keys fail with a suggestion."""
    from torl.config_load import load_dataclass

    return load_dataclass(BaseModelRecipe, files, overrides)


# --- data --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized trace: ids and a 0/1 loss mask (1 = response token the model learns to produce)."""

    ids: list[int]
    mask: list[int]
    kind: str


def make_traces(recipe: BaseModelRecipe) -> list[tuple[str, str, str]]:
    """(prompt, response, kind) triples, deterministic in ``recipe.seed``."""
    task_list = tasks.make_tasks("train", recipe.num_traces, recipe.seed, easy_frac=recipe.easy_frac, unique=False)
    rng = random.Random(f"torl-traces/{recipe.seed}")
    kw = {"code_frac": recipe.code_frac, "bug_frac": recipe.bug_frac, "hard_text_acc": recipe.hard_text_acc}
    kw.update(bug_style=recipe.bug_style, fix_frac=recipe.fix_frac, easy_code_frac=recipe.easy_code_frac)
    return [tasks.make_trace(t, rng, **kw) for t in task_list]


def encode_trace(tokenizer, prompt: str, response: str, kind: str = "") -> Example:
    """Tokenize a trace the way the tool loop builds it at inference, and mask what the model does not produce.

    Segments: the prompt (mask 0); the model's text up to and including the stop string ```output (mask 1); the
    inserted observation "\\n{body}\\n```\\n", tokenized on its own as ``torl.rollout.tool_loop.observation_insert``
    does (mask 0); the model's text after it plus ``<|im_end|>`` (mask 1).
    """
    stop = OUTPUT_OPEN.rstrip("\n")

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False).input_ids if s else []

    ids = enc(prompt)
    mask = [0] * len(ids)
    rest = response
    while OUTPUT_OPEN in rest:
        head, tail = rest.split(OUTPUT_OPEN, 1)
        body, sep, rest = tail.partition(OUTPUT_CLOSE)
        if not sep:
            raise ValueError(f"unterminated ```output frame in trace: {response!r}")
        for seg, m in ((head + stop, 1), ("\n" + body + OUTPUT_CLOSE, 0)):
            seg_ids = enc(seg)
            ids += seg_ids
            mask += [m] * len(seg_ids)
    seg_ids = enc(rest) + [tokenizer.convert_tokens_to_ids(modeling.IM_END)]
    ids += seg_ids
    mask += [1] * len(seg_ids)
    return Example(ids, mask, kind)


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Index batches over ``steps`` steps: epoch-wise permutations from a seeded RNG (deterministic order)."""
    rng = random.Random(f"torl-order/{seed}")
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def _collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # [B, T]
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e.ids, e.mask, strict=True)])
    return ids, attn, labels


def _lr_at(step: int, recipe: BaseModelRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_frac
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, examples: list[Example], recipe: BaseModelRecipe, pad_id: int) -> dict[str, float]:
    """Next-token training on the masked response tokens; returns summary figures."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    t0, tokens, losses = time.time(), 0, []
    bar = Progress(recipe.steps, "base model", unit="step")
    for step, idx in enumerate(_batches(len(examples), recipe.batch_size, recipe.steps, recipe.seed)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        ids, attn, labels = _collate([examples[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        tokens += int(attn.sum())
        losses.append(loss.item())
        recent = losses[-50:]
        bar.update(1, loss=sum(recent) / len(recent), tok_s=tokens / (time.time() - t0))
    bar.close()
    model.eval()
    tail = losses[-50:] or [float("nan")]
    return {
        "final_loss": sum(tail) / len(tail),
        "train_s": time.time() - t0,
        "train_tokens": tokens,
        # The first losses depend only on the recipe (data, order, init, warm-up): tests/integration/test_base_model
        # replays them to check that the recipe still builds the model that ships in models/.
        "first_losses": losses[:FIRST_LOSSES],
    }


def initial_state(recipe: BaseModelRecipe) -> tuple[Any, list[Example], torch.nn.Module]:
    """Tokenizer, encoded traces and the initialised model: everything training starts from, fixed by the recipe.

    All of it is pure Python or seeded torch initialisation, so it is identical on every machine."""
    traces = make_traces(recipe)
    tok_texts = [p + r for p, r, _ in traces[: recipe.tokenizer_traces]]
    tokenizer = modeling.train_tokenizer(tok_texts, recipe.vocab_size)
    examples = [encode_trace(tokenizer, p, r, k) for p, r, k in traces]
    model = modeling.build_model(recipe.shape(), modeling.padded_vocab(len(tokenizer)), recipe.seed, tokenizer)
    torch.manual_seed(recipe.seed)
    return tokenizer, examples, model


def build_base_model(recipe: BaseModelRecipe, out_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Build tokenizer + model from ``recipe`` and save them (with ``recipe.json``) into ``out_dir``."""
    out = Path(out_dir or recipe.output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads or os.cpu_count() or 1)
    try:
        t0 = time.time()
        tokenizer, examples, model = initial_state(recipe)
        logger.info("%d traces, %d tokenizer tokens, %.1f s", len(examples), len(tokenizer), time.time() - t0)
        stats = train(model, examples, recipe, tokenizer.pad_token_id) if recipe.steps > 0 else {}
        tmp = out.with_name(out.name + ".tmp")
        modeling.save_checkpoint(model, tokenizer, tmp)
        info = {
            "fingerprint": recipe.fingerprint(),
            "recipe": recipe.to_dict(),
            "params": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer),
            "trace_kinds": dict(sorted(Counter(e.kind for e in examples).items())),
            "mean_trace_tokens": sum(len(e.ids) for e in examples) / max(1, len(examples)),
            "build_s": time.time() - t0,
            **stats,
        }
        (tmp / "recipe.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)  # publish atomically: a half-written directory never looks like a finished model
        return out, info
    finally:
        torch.set_num_threads(threads)


def cached_fingerprint(out_dir: str | Path) -> str | None:
    """The recipe fingerprint of a finished model in ``out_dir``, or None."""
    meta = Path(out_dir) / "recipe.json"
    if not (meta.is_file() and (Path(out_dir) / "config.json").is_file()):
        return None
    try:
        return json.loads(meta.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


MANIFEST = "SHA256SUMS"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out_dir: str | Path) -> Path:
    """Record the sha256 of every file of a finished model (``sha256sum -c`` reads the same format)."""
    out = Path(out_dir)
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    (out / MANIFEST).write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))
    return out / MANIFEST


def verify_manifest(out_dir: str | Path) -> list[str]:
    """What is wrong with a model directory against its manifest: missing, changed or unlisted files (empty = ok).

    The shipped base model travels in git; a partial checkout, a Git LFS pointer or a stray edit would otherwise load
    as a silently different model."""
    out = Path(out_dir)
    manifest = out / MANIFEST
    if not manifest.is_file():
        return [f"{manifest} is missing"]
    problems, listed = [], set()
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed.add(name)
        path = out / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(path) != digest:
            problems.append(f"{name} differs from its recorded sha256")
    unlisted = [p.name for p in out.iterdir() if p.is_file() and p.name not in listed | {MANIFEST}]
    problems += [f"{name} is not in {MANIFEST}" for name in sorted(unlisted)]
    return problems
