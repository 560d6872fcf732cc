"""Rollout benchmark: what the per-trajectory async tool loop costs and gains, on one engine, model and prompt set.

Workload. A tiny Qwen2 is trained for a minute to behave like a tool-using policy: it writes filler reasoning words,
at every word starts a ```python block with probability ``--call-p`` (so calls land at varied points of each
response, geometric in position, as a real policy's do), writes the snippet its prompt asks for, and keeps
writing filler until the response budget. The snippets are a realistic mix: quick (95 %), heavy taking 1-3 s
(4 %), and one that runs past the sandbox timeout (1 %). By default the heavy and timeout snippets *sleep*: on a GPU
node the sandbox has CPU cores of its own, while on this 2-core machine a snippet spinning for 10 s takes the
engine's core and the benchmark would measure CPU contention instead of the loop (``--spin`` runs CPU-bound
versions, sympy and ``while True``, to show that cost too). Runs, same prompts and seeds, c=1:

  tools-off  the same loop with tools disabled (one engine call per trajectory: plain generate, the engine's limit)
  async      the per-trajectory tool loop (rollout.mode=async)
  sync       ToRL's batch-synchronous loop (rollout.mode=sync)

Prints (1) async wall / tools-off wall (ToRL: 2.0x; target <= 1.2x), (2) sync wall / async wall (target >= 2x),
(3) async sampled tokens/s / tools-off tokens/s (target >= 0.85). The batch should be long next to the sandbox
timeout, as in ToRL (10 s timeout, about 120 s of generation per step): a trajectory that times out at the end of a
short batch holds the batch for the whole timeout whatever the loop does. It also prints the CPU seconds each process
used per run: on 2 cores the engine is CPU-bound, so whatever the tools cost in CPU (sandbox, Ray calls, the engine
re-admitting continuations) shows up as wall time however well the loop overlaps. Usage:
``python bench/rollout.py [--prompts 512] [--response-tokens 512] [--timeout 10] [--spin] [--heavy 0.04]
[--hang 0.01] [--slots 8]`` (``--heavy 0 --hang 0``: quick snippets only, the loop's own cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time

# Each prompt kind has its own filler words, so the snippet to write is always evident from the last few tokens (a
# tiny model cannot reliably look back 300 tokens to the prompt, and would write the wrong snippet).
WORDS = "so then we get the value of x is and next check it again now sum so far".split()


def filler(kind_index: int) -> list[str]:
    return [" " + w for w in WORDS[3 * kind_index : 3 * kind_index + 3]]


def snippets(spin: bool) -> dict[str, str]:
    """Code each prompt kind asks for: heavy ones take about 1, 2 and 3 s, ``hang`` never ends."""
    if spin:
        heavy = {
            k: f"import sympy\nprint(len(list(sympy.primerange(1, {n}))))"
            for k, n in (("heavy1", 150000), ("heavy2", 300000), ("heavy3", 450000))
        }
        return {"quick": "print(6*7)", **heavy, "hang": "while True:\n    pass"}
    heavy = {f"heavy{s}": f"import time\ntime.sleep({s})\nprint({s})" for s in (1, 2, 3)}
    return {"quick": "print(6*7)", **heavy, "hang": "import time\ntime.sleep(3600)"}


def trace(rng: random.Random, words: list[str], code: str, call_p: float, length: int) -> str:
    """A response: filler words, a tool call started with probability ``call_p`` at each word, more filler."""
    out = []
    while len(out) < length and rng.random() >= call_p:
        out.append(rng.choice(words))
    if len(out) < length:
        out.append(f" ```python\n{code}\n```\n```output\n1\n```\n")
        out += [rng.choice(words) for _ in range(32)]
    return "".join(out)


def warm_model(out_dir: str, codes: dict[str, str], call_p: float, words: int, steps: int = 800) -> str:
    """Tiny checkpoint that behaves like the policy described at the top (``steps`` Adam steps: 800 take about a
    minute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torl.models.modeling import build_random_checkpoint

    rng = random.Random(0)
    data = [
        (f"Q: {k}\nA:", trace(rng, filler(i), c, call_p, words))
        for i, (k, c) in enumerate(codes.items())
        for _ in range(48)
    ]
    path = build_random_checkpoint(os.path.join(out_dir, "tiny"), seed=0, corpus=[p + r for p, r in data] * 4)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    rows = []
    for prompt, response in data:
        p, r = tok.encode(prompt, add_special_tokens=False), tok.encode(response, add_special_tokens=False)
        rows.append((p + r, [-100] * len(p) + r))
    width = max(len(x) for x, _ in rows)
    x = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    y = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (16,))
        w = int(lengths[idx].max())
        loss = model(x[idx, :w], labels=y[idx, :w]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = os.path.join(out_dir, "warm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"warm-start loss {loss.item():.3f} (filler entropy alone is {math.log(3):.2f})")
    return out


ENGINE = "vllm engine core"  # the process group the ratios hinge on


def process_group(info: dict) -> str:
    """Short name a process's CPU is reported under (``info``: psutil's ``name`` and ``cmdline``)."""
    cmd = " ".join(info["cmdline"] or [])
    name = info["name"] or "?"
    if "zygote" in cmd:
        return "sandbox zygote+children"
    if "EngineCore" in name or "EngineCore" in cmd:
        return ENGINE
    if name.startswith("kworker"):
        return "kernel workers"  # their names change with the work they do
    return name


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of every process on the machine, grouped by ``process_group`` (children reaped included)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        ct = p.info["cpu_times"]
        if ct is None:
            continue
        name = process_group(p.info)
        out[name] = out.get(name, 0.0) + ct.user + ct.system + ct.children_user + ct.children_system
    return out


def engine_runqueue_wait() -> float:
    """Seconds the engine core's main thread (the one running the model) spent runnable but waiting for a core.

    From Linux schedstat, so far. On 2 cores this is the direct measure of contention: the engine is CPU-bound, so
    every second another process holds its core is a second of decoding lost.
    """
    import psutil

    total = 0.0
    for p in psutil.process_iter(["name", "cmdline"]):
        if process_group(p.info) != ENGINE:
            continue
        try:
            with open(f"/proc/{p.pid}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
        except OSError:  # exited meanwhile, or not Linux
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=512, help="trajectories per run (one sample per prompt)")
    ap.add_argument("--response-tokens", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=10.0, help="sandbox timeout (ToRL: 10 s)")
    ap.add_argument("--call-p", type=float, default=0.01, help="chance of starting the tool call at each word")
    ap.add_argument("--spin", action="store_true", help="heavy and timeout snippets burn CPU instead of sleeping")
    ap.add_argument("--heavy", type=float, default=0.04, help="share of prompts whose snippet takes 1-3 s")
    ap.add_argument("--hang", type=float, default=0.01, help="share of prompts whose snippet hits the timeout")
    ap.add_argument("--sandbox-workers", type=int, default=2)
    ap.add_argument(
        "--slots", type=int, default=8, help="snippets each sandbox worker runs at once (size the pool for the load)"
    )
    ap.add_argument("--json", default="", help="also write the figures to this file")
    ap.add_argument("--runs", default="tools-off,async,sync", help="runs in order (the ratios need all three)")
    ap.add_argument("--model", default="", help="reuse a warm checkpoint kept by --keep-model")
    ap.add_argument("--keep-model", action="store_true", help="keep the warm checkpoint (prints its path)")
    ap.add_argument(
        "--warm-steps", type=int, default=800, help="training steps of the warm checkpoint (few: a smoke run)"
    )
    args = ap.parse_args()
    runs_wanted = [r for r in args.runs.split(",") if r]
    if not runs_wanted or set(runs_wanted) - {"tools-off", "async", "sync"}:
        ap.error(f"--runs takes a comma-separated subset of tools-off,async,sync (got {args.runs!r})")
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model!r} is not a checkpoint directory (kept by an earlier --keep-model run)")
    if not (0 <= args.heavy and 0 <= args.hang and args.heavy + args.hang <= 1):
        ap.error(
            f"--heavy and --hang are shares of the prompts: each >= 0, together <= 1 (got {args.heavy}, {args.hang})"
        )

    import ray

    from actors.cluster import init_ray
    from actors.generator import GeneratorActor
    from actors.sandbox import SandboxPool
    from torl.config import Config, EngineConfig, ModelConfig, PromptConfig, RolloutConfig, SandboxConfig, ToolConfig
    from torl.rollout.metrics import rollout_metrics
    from torl.rollout.tool_loop import GenRequest

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    codes = snippets(args.spin)
    tmp = None if args.model else tempfile.mkdtemp(prefix="torl-bench-rollout-")
    path = args.model or warm_model(tmp, codes, args.call_p, args.response_tokens, args.warm_steps)
    if args.keep_model:
        print(f"warm checkpoint kept for --model: {path}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    n = args.prompts
    kinds = ["hang"] * round(args.hang * n) + [f"heavy{1 + i % 3}" for i in range(round(args.heavy * n))]
    kinds += ["quick"] * (n - len(kinds))
    rng.shuffle(kinds)
    prompts = {k: tok.encode(f"Q: {k}\nA:", add_special_tokens=False) for k in codes}
    requests = [GenRequest(f"p{i}", i, prompts[k], n=1) for i, k in enumerate(kinds)]

    cfg = Config(
        model=ModelConfig(path=path, max_model_len=args.response_tokens + 64),
        prompt=PromptConfig(max_prompt_tokens=32),
        tool=ToolConfig(max_calls=1),
        sandbox=SandboxConfig(
            num_workers=args.sandbox_workers, concurrency_per_worker=args.slots, timeout_s=args.timeout
        ),
        rollout=RolloutConfig(n=1, max_response_tokens=args.response_tokens, engine=EngineConfig(max_num_seqs=256)),
    )

    init_ray(num_cpus=4)
    pool = SandboxPool.create(cfg.sandbox)
    gen = GeneratorActor.options(num_cpus=1).remote(cfg, path, pool)
    try:
        ray.get(gen.start.remote())
        ray.get(gen.generate.remote(requests[:16], tools=False))  # warm-up (first logprobs request is slow)
        runs, positions, calls = {}, {}, {}
        for name in runs_wanted:
            tools, mode = name != "tools-off", "sync" if name == "sync" else "async"
            cpu0, wait0, t0 = cpu_by_process(), engine_runqueue_wait(), time.perf_counter()
            trajs, m = ray.get(gen.generate.remote(requests, tools=tools, mode=mode))
            runs[name] = dict(m, **rollout_metrics(trajs), wall=time.perf_counter() - t0)
            cpu1 = cpu_by_process()
            runs[name]["engine_wait"] = engine_runqueue_wait() - wait0
            runs[name]["cpu"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}
            positions[name] = [t.loss_mask.index(0) for t in trajs if 0 in t.loss_mask]
            calls[name] = [
                {"kind": k, "status": c.status, "exec_s": c.exec_s, "queue_s": c.queue_s, "code": c.code}
                for t, k in zip(trajs, kinds, strict=True)
                for c in t.tool_calls
            ]
    finally:
        ray.get(gen.shutdown.remote())
        ray.kill(gen)
        pool.shutdown()
        ray.shutdown()
        if tmp is not None and not args.keep_model:
            shutil.rmtree(tmp, ignore_errors=True)

    pos = positions.get("async") or positions.get("sync") or []
    print(
        f"\n{n} trajectories, c=1, mix: {kinds.count('quick')} quick / {sum(k.startswith('heavy') for k in kinds)} "
        f"heavy 1-3 s / {kinds.count('hang')} timeout ({args.timeout:.0f} s), "
        f"{'spinning' if args.spin else 'sleeping'}; budget {args.response_tokens} tokens; "
        "tool call at response token p10/p50/p90 "
        + ("/".join(str(int(q)) for q in statistics.quantiles(pos, n=10)[::4]) if len(pos) > 1 else "-")
    )
    print(
        f"{'run':<10} {'wall s':>8} {'tokens':>8} {'tok/s':>8} {'calls':>6} {'ok':>5} {'timeouts':>8} {'tool wait':>9}"
        f" {'idle s':>7} {'engine waits for core s':>23}"
    )
    for name, m in runs.items():
        # tool/exec_success exists only where calls ran (rollout_metrics): the tools-off row has none to rate.
        ok = f"{m['tool/exec_success']:5.2f}" if "tool/exec_success" in m else f"{'-':>5}"
        print(
            f"{name:<10} {m['wall']:8.2f} {m['rollout/tokens']:8.0f} {m['rollout/tokens_per_s']:8.0f} "
            f"{m['tool/calls']:6.0f} {ok} {m['tool/timeouts']:8.0f} "
            f"{m['time/tool_wait']:9.2f} {m['time/engine_idle_tools']:7.2f} {m['engine_wait']:23.2f}"
        )
    groups = (ENGINE, "ray::Generator", "sandbox zygote+children", "ray::SandboxWorker")
    print(f"CPU seconds by process: {'run':<10} " + " ".join(f"{g:>24}" for g in groups) + f" {'all':>8}")
    for name, m in runs.items():
        cpu = m["cpu"]
        print(
            f"{'':23}{name:<10} " + " ".join(f"{cpu.get(g, 0.0):24.2f}" for g in groups) + f" {sum(cpu.values()):8.2f}"
        )
    if set(runs) != {"tools-off", "async", "sync"}:
        return
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
            json.dump({"figures": figures, "runs": runs, "calls": calls, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
