"""Measure a checkpoint on synthetic held-out problems through a simple in-process tool loop (HF generate).

A self-contained check used right after pretraining (no Ray, no vLLM): round 1 generates until ```output or EOS,
the last complete ```python block runs in a fresh ``python -I`` subprocess with a timeout, the observation is
spliced in exactly as ``torl.rollout.tool_loop`` does (``tool_protocol`` formatting, c = 1), and round 2 continues
without a stop string. The answer is the last ``\\boxed{}``, graded by ``torl.rl.grading``. The training job's
validation through vLLM is the reference; this gives the same figures in a minute without a cluster.

Not here: sandboxing untrusted code (our own model's arithmetic snippets run with a timeout and ``-I`` only, in a
temporary directory; use the sandbox pool for anything else), vLLM, batching across processes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torl.config import ToolConfig
from torl.data.prompts import build_prompt
from torl.rl import grading
from torl.rollout import tool_protocol
from torl.rollout.types import ExecResult

logger = logging.getLogger(__name__)
STOP = "```output"


def run_snippet(code: str, timeout_s: float = 5.0) -> ExecResult:
    """Run ``code`` in a fresh isolated-mode interpreter with a wall-clock limit."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return ExecResult("timeout", wall_s=time.time() - t0)
    status = "ok" if proc.returncode == 0 else ("killed" if proc.returncode < 0 else "error")
    return ExecResult(status, proc.stdout, proc.stderr, proc.returncode, wall_s=time.time() - t0)


@dataclass
class Sample:
    problem_id: str
    level: str
    answer: str
    text: str = ""  # the whole response, observation included
    code_ran: bool = False
    exec_ok: bool = False
    finished: bool = False  # ended with EOS (not cut off)
    correct: bool = False


def _generate(model, tokenizer, prompts: list[str], temperature: float, max_new: int, stop: bool, seed: int):
    """Batched generate with left padding; returns (new text, ended with EOS) per prompt."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": tokenizer.pad_token_id}
    kw["eos_token_id"] = tokenizer.eos_token_id
    if stop:
        kw.update(stop_strings=[STOP], tokenizer=tokenizer)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    new = out[:, enc.input_ids.shape[1] :]
    results = []
    for row in new.tolist():
        ended = tokenizer.eos_token_id in row
        if ended:
            row = row[: row.index(tokenizer.eos_token_id)]
        row = [t for t in row if t != tokenizer.pad_token_id]
        results.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    return results


def _tool_round(samples: list[Sample], texts: list[tuple[str, bool]], cfg: ToolConfig, timeout_s: float) -> list[int]:
    """Execute the code of rows that stopped at ```output; returns the indices that continue in round 2."""
    again = []
    for i, (text, ended) in enumerate(texts):
        s = samples[i]
        if ended or STOP not in text:
            s.text, s.finished = text, ended
            continue
        before = text[: text.index(STOP)]
        code = tool_protocol.last_code_block(before)
        if code is None:  # a stop without a complete block: nothing runs, generation resumes (ToRL quirk (iii))
            s.text = before + STOP
        else:
            result = run_snippet(code, timeout_s)
            s.code_ran, s.exec_ok = True, tool_protocol.is_success(result, cfg)
            body = tool_protocol.format_observation(result, cfg)
            s.text = before + tool_protocol.observation_text(body, before.endswith("\n"))
        again.append(i)
    return again


def evaluate(
    model_dir: str | Path,
    problems: list,
    levels: list[str] | None = None,
    temperature: float = 0.0,
    samples_per_problem: int = 1,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    seed: int = 0,
    timeout_s: float = 5.0,
) -> dict[str, float]:
    """Accuracy, code ratio, execution success, accuracy with/without code and well-formedness on ``problems``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = ToolConfig()
    levels = levels or ["?"] * len(problems)
    jobs = [(p, lv) for p, lv in zip(problems, levels, strict=True) for _ in range(samples_per_problem)]
    samples: list[Sample] = []
    for b in range(0, len(jobs), batch_size):
        chunk = [Sample(p.id, lv, p.answer) for p, lv in jobs[b : b + batch_size]]
        prompts = [build_prompt(p.question, "tir_base_0309") for p, _ in jobs[b : b + batch_size]]
        first = _generate(model, tokenizer, prompts, temperature, max_new_tokens, True, seed + b)
        again = _tool_round(chunk, first, cfg, timeout_s)
        if again:
            cont = [prompts[i] + chunk[i].text for i in again]
            second = _generate(model, tokenizer, cont, temperature, max_new_tokens, False, seed + b + 1)
            for i, (text, ended) in zip(again, second, strict=True):
                chunk[i].text += text
                chunk[i].finished = ended
        for s in chunk:
            pred = grading.extract_boxed(s.text)
            quick = None if pred is None else grading.quick_equivalent(pred, s.answer)
            s.correct = pred is not None and (quick if quick is not None else grading.is_equivalent(pred, s.answer))
        samples += chunk
    return summarize(samples)


def summarize(samples: list[Sample]) -> dict[str, float]:
    def frac(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    code = [s for s in samples if s.code_ran]
    text = [s for s in samples if not s.code_ran]
    out = {
        "n": float(len(samples)),
        "acc": frac([s.correct for s in samples]),
        "code_ratio": frac([s.code_ran for s in samples]),
        "exec_success": frac([s.exec_ok for s in code]),
        "acc_with_code": frac([s.correct for s in code]),
        "acc_without_code": frac([s.correct for s in text]),
        "well_formed": frac([s.finished and grading.extract_boxed(s.text) is not None for s in samples]),
    }
    for level in sorted({s.level for s in samples}):
        out[f"acc_{level}"] = frac([s.correct for s in samples if s.level == level])
    return out
