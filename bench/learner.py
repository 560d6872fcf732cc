"""Training tokens/s of the learner group vs a plain single-process PyTorch loop on the same model and batch.

    .venv/bin/python bench/learner.py [--hidden 256 --layers 4 --seqs 32 --steps 4 --workers 1,2]

The baseline is the limit on CPU: one process using all threads, the same packed micro-batches and the same GRPO
token-mean loss, AdamW and grad clip, no Ray and no FSDP. Learner configurations: 1 worker with all CPUs (no FSDP
wrap) and 2 workers with one CPU each (FSDP2 over gloo); ``--workers 2`` starts only the second. Tokens = prompt +
response tokens trained per optimizer step; the median step time after one warm-up step is reported, both as
measured inside the actor (``time/train``) and as seen by the driver (adds the object-store transfer of the batch).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from torl.config import Config, LearnerConfig, OptimConfig
from torl.models.modeling import ModelShape, build_random_checkpoint
from torl.rl.batching import pack, plan_micro_batches
from torl.rl.grpo import group_advantages, token_logprobs
from torl.rollout.types import Trajectory


def make_batch(n_seqs: int, prompt_len: int, resp_len: int, vocab: int, group_size: int = 4) -> list[Trajectory]:
    rng = random.Random(0)
    trajs = []
    for i in range(n_seqs):
        g = i // group_size
        p = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        r_len = rng.randrange(resp_len // 2, resp_len * 3 // 2)
        r = [rng.randrange(3, vocab) for _ in range(r_len)]
        mask = [0 if 10 <= k < 30 else 1 for k in range(r_len)]  # a tool-output run
        lp = [-5.0 if m else 0.0 for m in mask]
        trajs.append(Trajectory(f"p{g}", g, p, r, lp, mask, [0] * r_len, reward=float(rng.random() < 0.5)))
    return trajs


def baseline_step(model, opt, trajs, budget: int) -> float:
    t0 = time.perf_counter()
    adv = group_advantages([t.reward for t in trajs], [t.group for t in trajs])
    total = sum(sum(t.loss_mask) for t in trajs)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
    opt.zero_grad(set_to_none=True)
    for mb in plan_micro_batches(lengths, 1, budget)[0]:
        sub = [trajs[i] for i in mb]
        ids, pos = pack([t.prompt_ids + t.response_ids for t in sub])
        keep, off = [], 0
        for t in sub:
            keep.append(torch.arange(off + len(t.prompt_ids) - 1, off + len(t.prompt_ids) + len(t.response_ids) - 1))
            off += len(t.prompt_ids) + len(t.response_ids)
        keep = torch.cat(keep)
        logits = model(input_ids=ids, position_ids=pos, logits_to_keep=keep).logits[0]
        logp, _ = token_logprobs(logits, ids[0, keep + 1])
        old = torch.tensor([x for t in sub for x in t.logprobs])
        a = torch.tensor([adv[i] for i in mb for _ in trajs[i].response_ids])
        mask = torch.tensor([x for t in sub for x in t.loss_mask], dtype=torch.float32)
        ratio = torch.exp(logp - old)
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
        ((pg * mask).sum() / total).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t0


def run_group(model_dir: str, trajs, workers: int, cpus_per_worker: float, budget: int, steps: int):
    from actors.learner_group import LearnerGroup

    cfg = Config(
        optim=OptimConfig(lr=1e-5),
        learner=LearnerConfig(num_workers=workers, num_cpus=cpus_per_worker, micro_batch_tokens=budget),
    )
    group = LearnerGroup(cfg, model_dir)
    inner, outer = [], []
    try:
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            m = group.train_step(trajs)
            outer.append(time.perf_counter() - t0)
            inner.append(m["learner/time_train"])
    finally:
        group.shutdown()
    return statistics.median(inner[1:]), statistics.median(outer[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--resp-len", type=int, default=192)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the machine given to each configuration")
    ap.add_argument("--workers", default="1,2", help="learner groups to measure: worker counts, sharing --cpus")
    args = ap.parse_args()
    group_sizes = [int(w) for w in args.workers.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus))

    with tempfile.TemporaryDirectory() as tmp:
        shape = ModelShape(hidden=args.hidden, layers=args.layers, heads=args.hidden // 32, kv_heads=2,
                           intermediate=args.hidden * 2)  # fmt: skip
        model_dir = str(build_random_checkpoint(os.path.join(tmp, "model"), shape=shape, seed=0))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        vocab = model.config.vocab_size
        trajs = make_batch(args.seqs, args.prompt_len, args.resp_len, vocab)
        tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.2f}M params; batch {args.seqs} "
              f"seqs, {tokens} tokens, micro-batch budget {args.budget}")  # fmt: skip

        torch.set_num_threads(args.cpus)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        base = statistics.median([baseline_step(model, opt, trajs, args.budget) for _ in range(args.steps + 1)][1:])
        del model, opt
        print(f"plain PyTorch, 1 process, {args.cpus} threads: {base:.3f} s/step, {tokens / base:,.0f} tok/s")

        from actors.cluster import init_ray

        init_ray(num_cpus=args.cpus)
        for workers in group_sizes:
            inner, outer = run_group(model_dir, trajs, workers, args.cpus / workers, args.budget, args.steps)
            print(
                f"learner group, {workers} worker(s) x {args.cpus / workers:g} CPU: {inner:.3f} s/step in actor "
                f"({tokens / inner:,.0f} tok/s, ratio {base / inner:.2f}); driver wall {outer:.3f} s "
                f"({tokens / outer:,.0f} tok/s, ratio {base / outer:.2f})"
            )
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
