"""Rollout benchmark: what the per-trajectory async tool loop costs and gains, on one engine, model and prompt set.

Workload: a tiny Qwen2 warm-started (a few hundred SGD steps) to write one ```python block behind each of three
prompts and then keep sampling until the response budget: a quick snippet (95 %), heavy sympy taking 1-3 s (4 %),
and a busy loop that hits the sandbox timeout (1 %). Every trajectory calls the tool once (c=1) and samples about
``--response-tokens`` tokens, so the runs below generate about the same number of tokens. Runs:

  tools-off  the same loop with tools disabled (one engine call per trajectory: plain generate, the engine's limit)
  async      the per-trajectory tool loop (rollout.mode=async)
  sync       ToRL's batch-synchronous loop (rollout.mode=sync)

Prints (1) async wall / tools-off wall (ToRL: 2.0x; target <= 1.2x), (2) sync wall / async wall (target >= 2x),
(3) async sampled tokens/s / tools-off tokens/s (target >= 0.85). Usage:
``python bench/rollout.py [--prompts 256] [--response-tokens 384] [--timeout 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

QUICK = "```python\nprint(6*7)\n```\n```output"
HEAVY = "```python\nimport sympy\nprint(len(list(sympy.primerange(1, 300000))))\n```\n```output"
HANG = "```python\nwhile True:\n    pass\n```\n```output"
TRACES = {"Q: quick\nA:": QUICK, "Q: heavy\nA:": HEAVY, "Q: hang\nA:": HANG}


def warm_model(out_dir: str) -> str:
    """Tiny checkpoint that writes the code block behind each prompt (greedy and at temperature 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torl.modeling import build_random_checkpoint

    path = build_random_checkpoint(os.path.join(out_dir, "tiny"), seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    seqs = []
    for prompt, code in TRACES.items():
        p = tok.encode(prompt, add_special_tokens=False)
        ids = p + tok.encode(code, add_special_tokens=False)
        seqs.append((torch.tensor([ids]), torch.tensor([[-100] * len(p) + ids[len(p) :]])))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = sum(model(x, labels=y).loss for x, y in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = os.path.join(out_dir, "warm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"warm-start loss {loss.item():.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256, help="trajectories per run (one sample per prompt)")
    ap.add_argument("--response-tokens", type=int, default=384)
    ap.add_argument("--timeout", type=float, default=10.0, help="sandbox timeout (ToRL: 10 s)")
    ap.add_argument("--sandbox-workers", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args()

    import ray

    from actors.cluster import init_ray
    from actors.generator import GeneratorActor
    from actors.sandbox import SandboxPool
    from torl.config import Config, EngineConfig, ModelConfig, PromptConfig, RolloutConfig, SandboxConfig, ToolConfig
    from torl.rollout import GenRequest

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = tempfile.mkdtemp(prefix="torl-bench-rollout-")
    path = warm_model(tmp)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    n = args.prompts
    kinds = ["hang"] * max(1, round(0.01 * n)) + ["heavy"] * max(1, round(0.04 * n))
    kinds += ["quick"] * (n - len(kinds))
    rng.shuffle(kinds)
    prompts = {k: tok.encode(f"Q: {k}\nA:", add_special_tokens=False) for k in ("quick", "heavy", "hang")}
    requests = [GenRequest(f"p{i}", i, prompts[k], n=1) for i, k in enumerate(kinds)]

    cfg = Config(
        model=ModelConfig(path=path, max_model_len=args.response_tokens + 64),
        prompt=PromptConfig(max_prompt_tokens=32),
        tool=ToolConfig(max_calls=1),
        sandbox=SandboxConfig(num_workers=args.sandbox_workers, concurrency_per_worker=4, timeout_s=args.timeout),
        rollout=RolloutConfig(n=1, max_response_tokens=args.response_tokens, engine=EngineConfig(max_num_seqs=256)),
    )

    init_ray(num_cpus=4)
    pool = SandboxPool.create(cfg.sandbox)
    gen = GeneratorActor.options(num_cpus=1).remote(cfg, path, pool)
    try:
        ray.get(gen.start.remote())
        ray.get(gen.generate.remote(requests[:16], tools=False))  # warm-up (first logprobs request is slow)
        runs = {}
        for name, tools, mode in (("tools-off", False, "async"), ("async", True, "async"), ("sync", True, "sync")):
            t0 = time.perf_counter()
            _, m = ray.get(gen.generate.remote(requests, tools=tools, mode=mode))
            runs[name] = dict(m, wall=time.perf_counter() - t0)
    finally:
        ray.get(gen.shutdown.remote())
        ray.kill(gen)
        pool.shutdown()
        ray.shutdown()

    print(
        f"\n{n} trajectories, c=1, mix: {kinds.count('quick')} quick / {kinds.count('heavy')} heavy sympy / "
        f"{kinds.count('hang')} timeout ({args.timeout:.0f} s), budget {args.response_tokens} tokens"
    )
    print(
        f"{'run':<10} {'wall s':>8} {'tokens':>8} {'tok/s':>8} {'calls':>6} {'ok':>5} {'timeouts':>8} {'tool wait':>9}"
    )
    for name, m in runs.items():
        print(
            f"{name:<10} {m['wall']:8.2f} {m['rollout/tokens']:8.0f} {m['rollout/tokens_per_s']:8.0f} "
            f"{m['tool/calls']:6.0f} {m['tool/exec_success']:5.2f} {m['tool/timeouts']:8.0f} "
            f"{m['time/tool_wait']:9.2f}"
        )
    off, on, sync = runs["tools-off"], runs["async"], runs["sync"]
    figures = {
        "tool_overhead_wall_ratio": on["wall"] / off["wall"],
        "tool_overhead_per_token_ratio": (on["wall"] / on["rollout/tokens"]) / (off["wall"] / off["rollout/tokens"]),
        "sync_over_async_wall": sync["wall"] / on["wall"],
        "loop_tokens_per_s_over_plain": on["rollout/tokens_per_s"] / off["rollout/tokens_per_s"],
    }
    print(
        f"(1) tool overhead, async wall / tools-off wall: {figures['tool_overhead_wall_ratio']:.2f}x "
        f"(per token {figures['tool_overhead_per_token_ratio']:.2f}x; ToRL 2.0x, target <= 1.2x)"
    )
    print(f"(2) sync wall / async wall: {figures['sync_over_async_wall']:.2f}x (target >= 2x)")
    print(
        f"(3) tool-loop tokens/s / plain generate tokens/s: {figures['loop_tokens_per_s_over_plain']:.2f} "
        f"(target >= 0.85)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": figures, "runs": runs, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
