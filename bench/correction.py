"""Rollout correction of one training batch: the tensor pass the learner runs vs the per-token Python pass it replaced.

    .venv/bin/python bench/correction.py [--seqs 2048 --tokens 2000 --mode tis --level token]

Every learner rank corrects the whole batch against the engine's log-probs before its updates (``Learner.train_step``,
``torl.rl.grpo.rollout_correction``). The Python form walked every token of every sequence (about 690 ns per token, 2.8
s per step at ToRL's 2048 x 2000 tokens, while the GPUs waited); the tensor form is one pass over the flat batch. The
baseline below is that per-token form (token-level tis: the ratio, its clamp, the cap and the five statistics), kept
only to measure against. Two tensor figures: from the trajectories' Python lists (flatten, correct, cut back per
sequence, as ``train_step`` does) and from tensors already on the device (the micro-batch path). Inputs: random
log-probs, ratios spread around 1, 10 % of tokens tool output.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time

import torch

from torl.rl.grpo import rollout_correction


def python_pass(proximal: list[list[float]], behaviour: list[list[float]], masks: list[list[int]], cap: float):
    """The per-token form: weights, masks and per-sequence sums, one Python step per token (token-level tis)."""
    out = []
    for prox, behav, mask in zip(proximal, behaviour, masks, strict=True):
        log_ratio = [max(-20.0, min(20.0, p - b)) if m else 0.0 for p, b, m in zip(prox, behav, mask, strict=True)]
        raw = [math.exp(r) if m else 1.0 for r, m in zip(log_ratio, mask, strict=True)]
        weights = [min(w, cap) if m else 1.0 for w, m in zip(raw, mask, strict=True)]
        trained = [i for i, m in enumerate(mask) if m]
        stats = (
            float(len(trained)),
            sum(math.exp(log_ratio[i]) - 1.0 - log_ratio[i] for i in trained),
            sum(-log_ratio[i] for i in trained),
            float(sum(1 for i in trained if raw[i] > cap)),
            sum(raw[i] for i in trained),
            max((abs(log_ratio[i]) for i in trained), default=0.0),
        )
        out.append((weights, list(mask), stats))
    return out


def tensor_pass_from_lists(proximal, behaviour, masks, mode: str, level: str, cap: float):
    """What ``train_step`` does: flatten the lists, one tensor pass, cut the weights and masks back per sequence."""
    seq_index = torch.tensor(list(itertools.chain.from_iterable([j] * len(m) for j, m in enumerate(masks))))
    dtypes = (torch.float64, torch.float64, torch.float32)
    flat = [
        torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=dt)
        for rows, dt in zip((proximal, behaviour, masks), dtypes, strict=True)
    ]
    weights, kept, stats = rollout_correction(*flat, seq_index, len(masks), mode, level, cap, 0.5, 2.0)
    w, k, out, start = weights.tolist(), kept.long().tolist(), [], 0
    for m in masks:
        out.append((w[start : start + len(m)], k[start : start + len(m)]))
        start += len(m)
    return out, stats.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2000, help="response tokens per sequence")
    ap.add_argument("--mode", default="tis", choices=["none", "tis", "mis", "mis_reject"])
    ap.add_argument("--level", default="token", choices=["token", "sequence", "geometric"])
    ap.add_argument("--cap", type=float, default=2.0)
    args = ap.parse_args()
    rng = random.Random(0)
    behaviour = [[-rng.random() * 3 for _ in range(args.tokens)] for _ in range(args.seqs)]
    proximal = [[b + rng.gauss(0.0, 0.3) for b in row] for row in behaviour]
    masks = [[int(rng.random() > 0.1) for _ in range(args.tokens)] for _ in range(args.seqs)]
    n = args.seqs * args.tokens
    torch.set_num_threads(1)  # as a learner rank's share of a CPU, and comparable with the one-thread Python pass

    t0 = time.perf_counter()
    reference = python_pass(proximal, behaviour, masks, args.cap)
    t_python = time.perf_counter() - t0
    t0 = time.perf_counter()
    from_lists, stats = tensor_pass_from_lists(proximal, behaviour, masks, args.mode, args.level, args.cap)
    t_lists = time.perf_counter() - t0
    seq_index = torch.tensor([j for j in range(args.seqs) for _ in range(args.tokens)])
    flat = [torch.tensor(rows, dtype=torch.float64).flatten() for rows in (proximal, behaviour)]
    mask = torch.tensor(masks, dtype=torch.float32).flatten()
    t0 = time.perf_counter()
    rollout_correction(*flat, mask, seq_index, args.seqs, args.mode, args.level, args.cap, 0.5, 2.0)
    t_tensors = time.perf_counter() - t0

    if (args.mode, args.level) == ("tis", "token"):  # the two forms must agree before their times mean anything
        for (w_ref, k_ref, s_ref), (w, k), s in zip(reference, from_lists, stats, strict=True):
            assert k == k_ref and max(abs(a - b) for a, b in zip(w, w_ref, strict=True)) < 1e-9
            assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(s, s_ref, strict=True))
    print(f"rollout correction of {args.seqs} x {args.tokens} tokens ({args.mode}, {args.level}), one thread:")
    print(f"  per-token Python pass   {t_python:7.3f} s  {t_python / n * 1e9:6.0f} ns/token")
    print(f"  tensor pass from lists  {t_lists:7.3f} s  {t_lists / n * 1e9:6.0f} ns/token")
    print(f"  tensor pass on tensors  {t_tensors:7.3f} s  {t_tensors / n * 1e9:6.0f} ns/token")
    print(f"  speed-up: {t_python / t_lists:.1f}x from lists, {t_python / t_tensors:.1f}x on tensors")


if __name__ == "__main__":
    main()
