"""Training step time by phase: on-policy with one learner thread, on-policy, pipelined; and generator idle time.

    python bench/train.py [key=value ...]      # overrides apply to every run (default: the tiny CPU preset)
    python bench/train.py --vs-trl [key=value ...]   # also without tools, and TRL's GRPOTrainer on the same work
    python bench/train.py --variants=on-policy,pipelined [key=value ...]   # a subset (ratios of those only)

Runs the same short training five times in one process on one Ray cluster: trainer.max_staleness=0 (ToRL's
strictly on-policy order) with the learner held to one torch thread (learner.num_threads=1, the earlier CPU
default), the same with learner.num_threads=0 (auto: on-policy the learner gets every core, since nothing else
computes while it trains), and max_staleness=1, 2, 4 (rollouts of up to k later steps overlap training of step t).
Prints per-phase seconds per step, step-time ratios, the share of wall time the generators had no rollout to work
on, and what recomputing the old log-probs costs.
Figures are ratios from the same run; the first step of each run (engine warm-up) is left out.

--vs-trl adds torl without tools (tool.enabled=false; on-policy and pipelined), then runs bench/trl_grpo.py under
.venv-trl/bin/python (TRL's GRPOTrainer on the same model, prompts, samples, token budget, fp32 and lr: see that
file; .venv-trl is made as it says) with and without tools, and prints each mode's median s/step on both sides and
the ratio TRL/torl, with the work each side did per step (sampled tokens, tool calls). Hold the machine for it:
on a shared machine run it as `flock /tmp/torl-cpu.lock python bench/train.py --vs-trl`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.train import main as train_main  # noqa: E402

PHASES = [
    "time/step",
    "time/wait_rollout",
    "time/rollout",
    "time/grade",
    "time/train",
    "time/sync",
    "time/tool_wait",
    "time/generate",
    "learner/time_old_logprobs",
]


def run(name: str, variant: list[str], out: Path, overrides: list[str]) -> list[dict]:
    args = [
        f"trainer.output_dir={out}",
        "trainer.val_before_train=false",
        "trainer.val_every=0",
        "trainer.save_every=0",
        "wandb.mode=disabled",
        "trainer.resume=never",
        "trainer.total_steps=6",
        *variant,
        *overrides,
    ]
    if train_main(args) != 0:
        raise SystemExit(f"training run {name!r} failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] >= 2]  # step 1 includes engine warm-up


def summarise(rows: list[dict]) -> dict[str, float]:
    out = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in [*PHASES, *WORK]}
    out["time/step median"] = statistics.median(r["time/step"] for r in rows)
    total = sum(r["time/step"] for r in rows)
    # With staleness 0 the engine idles while grading/training/syncing; time/rollout is its busy span per step.
    out["generator_idle_share"] = max(0.0, 1.0 - sum(r.get("time/rollout", 0.0) for r in rows) / total)
    return out


# What each step did (means per step), to check that torl and TRL did the same work; old_logprobs_reused: the share
# of steps whose old log-probs came from the training forward (time_old_logprobs then ~0).
WORK = ["rollout/tokens", "rollout/obs_tokens", "tool/calls", "learner/old_logprobs_reused"]

VARIANTS = {
    "1 thread": ["trainer.max_staleness=0", "learner.num_threads=1"],
    "on-policy": ["trainer.max_staleness=0"],
    "pipelined": ["trainer.max_staleness=1"],
    "k=2": ["trainer.max_staleness=2"],
    "k=4": ["trainer.max_staleness=4"],
}
# --vs-trl: the same two orders without the tool (ToRL's C=0 ablation), for TRL's plain GRPO.
NO_TOOL_VARIANTS = {
    "no tools": ["trainer.max_staleness=0", "tool.enabled=false"],
    "no tools k=1": ["trainer.max_staleness=1", "tool.enabled=false"],
}
# (row label, torl variant, TRL mode): TRL has one order, on-policy, so both torl orders face the same TRL figure.
VS_TRL = [
    ("tools, on-policy", "on-policy", "tools"),
    ("tools, pipelined (k=1)", "pipelined", "tools"),
    ("no tools, on-policy", "no tools", "no tools"),
    ("no tools, pipelined (k=1)", "no tools k=1", "no tools"),
]
TRL_PYTHON = REPO / ".venv-trl" / "bin" / "python"


def run_trl(tools: bool, argv: list[str]) -> dict:
    """bench/trl_grpo.py in .venv-trl with the same overrides (and step count) as torl's runs; its JSON line."""
    cmd = [str(TRL_PYTHON), str(REPO / "bench" / "trl_grpo.py"), "--tools" if tools else "--no-tools"]
    proc = subprocess.run([*cmd, "trainer.total_steps=6", *argv], stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"bench/trl_grpo.py {cmd[2]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_vs_trl(results: dict[str, dict[str, float]], trl: dict[str, dict]) -> None:
    any_trl = next(iter(trl.values()))
    print(
        f"\ntorl vs TRL {any_trl['trl_version']} GRPOTrainer (transformers {any_trl['transformers_version']}, "
        f"torch {any_trl['torch_version']}), same run, same work: median s/step after the warm-up step"
    )
    print(f"{'mode':<28}{'torl s/step':>12}{'TRL s/step':>12}{'TRL/torl':>10}")
    for label, variant, mode in VS_TRL:
        ours, theirs = results[variant]["time/step median"], trl[mode]["s_per_step_median"]
        print(f"{label:<28}{ours:>12.2f}{theirs:>12.2f}{theirs / ours:>9.2f}x")
    print("work per step (means)         sampled tokens   tool-output tokens   tool calls")
    for label, variant, _ in VS_TRL:
        r = results[variant]
        work = f"{r['rollout/tokens']:>14.0f}{r['rollout/obs_tokens']:>21.0f}{r['tool/calls']:>13.1f}"
        print(f"  torl {label:<24}{work}")
    for mode, t in trl.items():
        print(
            f"  TRL  {mode:<24}{t['sampled_tokens_per_step']:>14.0f}{t['obs_tokens_per_step']:>21.0f}"
            f"{t['tool_calls_per_step']:>13.1f}"
        )
    print("TRL phases (s/step, means)    generate (tools incl.)   tools   reward   train")
    for mode, t in trl.items():
        p = t["phases_mean"]
        print(f"  {mode:<28}{p['generate']:>22.2f}{p['tools']:>8.2f}{p['reward']:>9.2f}{p['train']:>8.2f}")


def main(argv: list[str]) -> int:
    vs_trl = "--vs-trl" in argv
    argv = [a for a in argv if a != "--vs-trl"]
    if vs_trl and not TRL_PYTHON.exists():
        raise SystemExit(f"--vs-trl needs {TRL_PYTHON}: see bench/trl_grpo.py for how to make .venv-trl")
    variants = {**VARIANTS, **(NO_TOOL_VARIANTS if vs_trl else {})}
    picked = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("--variants=")]
    argv = [a for a in argv if not a.startswith("--variants=")]
    if picked:
        unknown = set(picked[-1]) - set(variants)
        if unknown or vs_trl:
            raise SystemExit(f"--variants takes names from {', '.join(variants)} (without --vs-trl); got {unknown}")
        variants = {name: variants[name] for name in picked[-1]}
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: summarise(run(name, variant, Path(tmp) / f"run{i}", argv))
            for i, (name, variant) in enumerate(variants.items())
        }
    trl: dict[str, dict] = {}
    if vs_trl:
        import ray

        ray.shutdown()  # the embedded cluster's processes must not share the cores with TRL's run
        trl = {mode: run_trl(mode == "tools", argv) for mode in ("tools", "no tools")}
    print(f"{'phase (s/step)':<24}" + "".join(f"{name:>13}" for name in results))
    for key in [*PHASES, "time/step median", "generator_idle_share", *WORK]:
        print(f"{key:<24}" + "".join(f"{r[key]:>13.3f}" for r in results.values()))
    if "1 thread" in results:
        base = results["1 thread"]["time/step"]
        for name in ("on-policy", "pipelined"):
            if name in results:
                print(f"{name} / on-policy with 1 learner thread, step time: {results[name]['time/step'] / base:.2f}x")
    if "on-policy" in results:
        k0 = results["on-policy"]["time/step"]
        for name, k in (("pipelined", 1), ("k=2", 2), ("k=4", 4)):
            if name in results:
                print(f"max_staleness={k} / max_staleness=0, step time: {results[name]['time/step'] / k0:.2f}x")
        print(
            "old log-probs recompute / learner step, on-policy: "
            f"{results['on-policy']['learner/time_old_logprobs'] / results['on-policy']['time/train']:.2f}"
        )
    if trl:
        print_vs_trl(results, trl)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
