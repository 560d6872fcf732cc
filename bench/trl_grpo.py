"""TRL's GRPOTrainer on the work bench/train.py gives torl: seconds per step, as one JSON line.

    .venv-trl/bin/python bench/trl_grpo.py [--tools | --no-tools] [configs/preset.yaml] [key=value ...]

Runs under a separate venv, so the project's ``.venv`` stays as setup made it; made once (torch first, CPU build,
as scripts/setup.sh installs it, so nothing pulls a CUDA torch; transformers at the project's pin, which TRL 1.16
accepts):

    python3.11 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0
    .venv-trl/bin/pip install trl==1.16.0 transformers==5.19.0 accelerate==1.15.0 math-verify==0.9.0 \
        sympy==1.14.0 pyyaml

It imports only torl's pure modules (config, data, prompts, sampler, tool loop, grading), never vLLM, Ray or torl's
learner.
``bench/train.py --vs-trl`` runs it beside torl's modes with the same arguments, so both sides read one config:

- the model directory (``model.path``, the CPU default's ``models/torl-tiny-base``), in fp32;
- the prompts: torl's PromptSampler batches, in torl's order (``data.batch_size`` prompts per step, each drawn
  in the step torl draws it), tokenized as torl does (the same ids);
- ``rollout.n`` samples per prompt at ``rollout.temperature``/``top_p``/``top_k``; ``rollout.max_response_tokens``
  as the completion budget (tool output included, as in torl and in TRL's own tool loop);
- one AdamW step per batch at ``optim.lr`` (constant), ``optim.weight_decay``, ``optim.betas``, ``optim.grad_clip``;
  PPO clip ``algo.clip_low``/``clip_high``, no KL (``algo.kl_coef=0``), token-mean loss (TRL's "dapo" loss type is
  torl's token-mean), group-std-normalised advantages;
- the reward: torl's own check (``torl.rl.grading.score``: +1 correct, -1 wrong or unboxed);
- ``trainer.total_steps`` steps; the first is the warm-up and is left out, as in bench/train.py.

Generation is TRL's default on CPU: ``transformers`` ``generate`` on the training model (TRL's vLLM modes need a GPU:
``vllm_mode="colocate"`` and ``"server"`` both run a CUDA vLLM engine). Gradient checkpointing is off, as in torl's
CPU default (GRPOConfig turns it on by default: it recomputes activations in backward and would slow TRL down).

Tools: TRL 1.16's ``GRPOTrainer(tools=[...])`` speaks the chat-template tool protocol: the prompt is rendered with
the tools' JSON schema, the model must emit a JSON tool call that the tokenizer's response template parses, and the
result comes back as a ``tool`` message. The ToRL base model writes ```` ```python ```` blocks and stops at
```` ```output ```` in a plain-text prompt; it never emits a JSON tool call (and its chat template cannot render
one, so TRL refuses ``tools=`` at construction), so TRL's native tool loop would never call anything. ``--tools``
therefore uses TRL's extension point for custom multi-turn rollouts, ``rollout_func``, with TRL's own generation path
(the same ``GenerationConfig`` TRL builds, ``unwrap_model_for_generation``, ``model.generate``, plus the stop string)
and the same batch-synchronous structure as TRL's ``_tool_call_loop``: the whole batch generates a round, the
snippets of the rounds that asked for the tool run one after another (as TRL runs sync tools), the trajectories
that called a tool generate their next round together, and tool-output tokens get mask 0 (``env_mask``). The
protocol bookkeeping (which block runs, the ```` ```output ```` frame, budgets) is torl's ``ToolLoop``, so the
trajectories follow the same rules as torl's. The tool itself is what a TRL user writes: a fresh
``python -c`` per snippet with ``sandbox.timeout_s``, without torl's sandbox isolation (namespaces, seccomp,
Landlock).

Printed: per-step wall seconds (the interval between optimizer steps, everything included), the median over the
steps after the warm-up, and per phase: generation (tool calls included), tool execution alone, reward, and the rest
(TRL's log-prob/loss/backward/optimizer step and bookkeeping); mean completion tokens and tool calls per step, so
the two sides' work can be compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_PRESET = REPO / "configs" / "tiny_cpu.yaml"

# Pure torl modules only (no Ray, no vLLM, no torl learner): the config, data, prompts, sampler, protocol, grading.
from torl.config import Config  # noqa: E402
from torl.config_load import load_config, split_cli  # noqa: E402
from torl.data.problems import load_problems  # noqa: E402
from torl.data.prompts import build_prompt  # noqa: E402
from torl.data.sampler import PromptSampler, encode_problems  # noqa: E402
from torl.infra.paths import resolve  # noqa: E402
from torl.rl.grading import score, shutdown_helpers  # noqa: E402
from torl.rollout.tool_loop import LoopSettings, RoundOutput, ToolLoop  # noqa: E402
from torl.rollout.types import ExecResult, Trajectory  # noqa: E402


def torl_batches(cfg: Config, tokenizer) -> list[list]:
    """The prompt batches torl's training driver draws for steps 1..total_steps (jobs/setup_run.py's encoding)."""
    problems = [p for spec in cfg.data.train_files for p in load_problems(spec, skip_bad_rows=cfg.data.skip_bad_rows)]
    encoded, _ = encode_problems(
        problems,
        lambda q: build_prompt(q, cfg.prompt.template, tokenizer),
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        cfg.prompt.max_prompt_tokens - cfg.prompt.filter_margin,
    )
    sampler = PromptSampler(encoded, cfg.data.batch_size, cfg.data.seed, cfg.data.shuffle)
    return [sampler.next_batch() for _ in range(cfg.trainer.total_steps)]


def run_snippet(code: str, timeout_s: float, workdir: str) -> ExecResult:
    """The python-exec tool a TRL user writes: a fresh interpreter per snippet, output captured."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, cwd=workdir
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return ExecResult("timeout", out, "", None, time.perf_counter() - t0)
    status = "ok" if p.returncode == 0 else "error"
    return ExecResult(status, p.stdout, p.stderr, p.returncode, time.perf_counter() - t0)


class Phases:
    """Seconds per phase inside the current optimizer step, reset at each step's end."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.now[key] = self.now.get(key, 0.0) + seconds

    def count(self, key: str, n: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + n

    def take(self) -> dict[str, float]:
        out = {**self.now, **self.counts}
        self.now, self.counts = {}, {}
        return out


def make_rollout_func(cfg: Config, phases: Phases, workdir: str):
    """ToRL's tool loop on TRL's transformers generation, batch-synchronous like TRL's ``_tool_call_loop``."""
    import torch
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import pad

    settings = LoopSettings.from_config(cfg)
    stop = cfg.tool.stop

    def generate(trainer, id_lists: list[list[int]], max_new: int, stops: list[str]) -> list[list[int]]:
        # TRL's _generate_single_turn (regular generation path), with the tool stop string added.
        tok = trainer.processing_class
        gen_cfg = copy.deepcopy(trainer.generation_config)
        gen_cfg.max_new_tokens = max_new
        gen_cfg.stop_strings = stops or None
        tensors = [torch.tensor(ids) for ids in id_lists]
        padded = pad(tensors, padding_value=tok.pad_token_id, padding_side="left")
        mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                generation_kwargs=trainer.generation_kwargs,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            out = model.generate(
                input_ids=padded, attention_mask=mask, generation_config=gen_cfg, tokenizer=tok if stops else None
            )
        return out[:, padded.size(1) :].tolist()

    def cut(tok, ids: list[int], budget: int, stops: list[str], eos: set[int]) -> RoundOutput:
        """One row of a batched generate as vLLM would report it: ids up to EOS or the stop string (kept), text
        without the stop string, finish and stop reasons; cut to this row's budget."""
        end = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        ids = ids[:end]
        reason, stop_reason = ("stop", None) if end and ids[-1] in eos else ("length", None)
        if stops:
            text = tok.decode(ids, skip_special_tokens=False)
            if stop in text:  # the shortest prefix whose text holds the stop string (monotone in the prefix)
                lo, hi = 1, len(ids)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if stop in tok.decode(ids[:mid], skip_special_tokens=False):
                        hi = mid
                    else:
                        lo = mid + 1
                ids, reason, stop_reason = ids[:lo], "stop", stop
        if len(ids) > budget:
            ids, reason, stop_reason = ids[:budget], "length", None
        text = tok.decode(ids, skip_special_tokens=True)
        if stop_reason is not None:
            text = text[: text.find(stop)]
        return RoundOutput(ids, [0.0] * len(ids), text, reason, stop_reason, version=0)

    def rollout(prompts: list[str], trainer) -> dict:
        tok = trainer.processing_class
        eos = set(trainer.eos_token_ids)
        prompt_ids = tok(text=prompts, add_special_tokens=False)["input_ids"]
        loops = [
            ToolLoop(
                Trajectory(problem_id=str(i), group=i, prompt_ids=list(ids)),
                i,
                settings,
                lambda text: tok(text, add_special_tokens=False)["input_ids"],
                lambda ids: tok.decode(ids, skip_special_tokens=True),
            )
            for i, ids in enumerate(prompt_ids)
        ]
        t_gen = time.perf_counter()
        tool_s = 0.0
        while live := [(lp, req) for lp in loops if (req := lp.next_request()) is not None]:
            by_stops: dict[tuple[str, ...], list] = {}
            for lp, req in live:
                by_stops.setdefault(tuple(req.stop), []).append((lp, req))
            calls = []
            for stops, group in by_stops.items():
                rows = generate(trainer, [r.ids for _, r in group], max(r.max_tokens for _, r in group), list(stops))
                for (lp, req), ids in zip(group, rows, strict=True):
                    code = lp.on_round(cut(tok, ids, req.max_tokens, list(stops), eos))
                    if code is not None:
                        calls.append((lp, code))
            for lp, code in calls:  # one after another, as TRL's loop runs sync tools
                t0 = time.perf_counter()
                result = run_snippet(code, cfg.sandbox.timeout_s, workdir)
                lp.on_tool_result(result, time.perf_counter() - t0)
                tool_s += time.perf_counter() - t0
        trajs = [lp.result() for lp in loops]
        phases.add("tools", tool_s)
        phases.add("rollout_loop", time.perf_counter() - t_gen)
        phases.count("tool_calls", sum(len(t.tool_calls) for t in trajs))
        phases.count("obs_tokens", sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs))
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [t.response_ids for t in trajs],
            "logprobs": None,
            "env_mask": [t.loss_mask for t in trajs],
        }

    return rollout


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", dest="tools", action="store_true", default=True, help="ToRL tool loop (default)")
    ap.add_argument("--no-tools", dest="tools", action="store_false", help="plain generation (tool.enabled=false)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the median (engine warm-up)")
    args, rest = ap.parse_known_args(argv)
    files, overrides = split_cli(rest)
    if not args.tools:
        overrides.append("tool.enabled=false")
    cfg = load_config(files or [str(DEFAULT_PRESET)], overrides)
    steps = cfg.trainer.total_steps
    if steps <= args.warmup:
        raise SystemExit(f"trainer.total_steps={steps} leaves no step after a warm-up of {args.warmup}")

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    model_path = str(resolve(cfg.model.path))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or model_path)
    batches = torl_batches(cfg, tokenizer)
    encoded = [e for b in batches for e in b]
    rows = [
        {"prompt": build_prompt(e.problem.question, cfg.prompt.template, tokenizer), "answer": e.problem.answer}
        for e in encoded
    ]
    # TRL tokenizes the text column itself (no special tokens added): the same ids as torl's, checked.
    for row, e in zip(rows, encoded, strict=True):
        assert tokenizer(text=row["prompt"])["input_ids"] == e.prompt_ids, row["prompt"]
    phases = Phases()

    def reward(completions: list[str], answer: list[str], **_) -> list[float]:
        t0 = time.perf_counter()
        out = [score(str(c), str(a), cfg.reward)[0] for c, a in zip(completions, answer, strict=True)]
        phases.add("reward_s", time.perf_counter() - t0)
        return out

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            phases.add("generate", time.perf_counter() - t0)
            phases.count("completion_tokens", sum(len(ids) for ids in out[1]))
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            phases.add("generate_and_score", time.perf_counter() - t0)
            return out

    records: list[dict[str, float]] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            rec = {"step": state.global_step, "step_s": now - self.t, **phases.take()}
            rec["train_s"] = rec["step_s"] - rec.get("generate_and_score", 0.0)
            records.append(rec)
            self.t = now
            print(f"[trl] step {state.global_step}/{steps}: {rec['step_s']:.2f} s", file=sys.stderr, flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if records and logs and "reward" in logs:
                records[-1]["reward_mean"] = logs["reward"]

    rc, n = cfg.rollout, cfg.rollout.n
    with tempfile.TemporaryDirectory() as tmp:
        gargs = GRPOConfig(
            output_dir=tmp,
            use_cpu=True,
            bf16=False,
            fp16=False,
            model_init_kwargs={"dtype": "float32"},
            gradient_checkpointing=False,
            per_device_train_batch_size=cfg.data.batch_size * n,
            gradient_accumulation_steps=1,
            num_generations=n,
            max_steps=steps,
            shuffle_dataset=False,  # rows are already in torl's order, one step's batch after another
            max_completion_length=rc.max_response_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            top_k=max(rc.top_k, 0),
            learning_rate=cfg.optim.lr,
            lr_scheduler_type="constant",
            warmup_steps=cfg.optim.warmup_steps,
            weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.betas[0],
            adam_beta2=cfg.optim.betas[1],
            max_grad_norm=cfg.optim.grad_clip,
            beta=cfg.algo.kl_coef,
            epsilon=cfg.algo.clip_low,
            epsilon_high=cfg.algo.clip_high,
            loss_type="dapo",
            scale_rewards="group" if cfg.algo.norm_adv_by_std else "none",
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=rc.seed,
            dataloader_num_workers=0,
        )
        trainer = Timed(
            model=model_path,
            reward_funcs=reward,
            args=gargs,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[StepTimes()],
            rollout_func=make_rollout_func(cfg, phases, tmp) if args.tools else None,
        )
        trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts: the JSON line below is the output
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    shutdown_helpers()

    timed = [r for r in records if r["step"] > args.warmup]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in timed)

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in timed) / len(timed)

    result = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mode": "tools" if args.tools else "no tools",
        "steps": steps,
        "warmup_steps": args.warmup,
        "prompts_per_step": cfg.data.batch_size,
        "samples_per_prompt": n,
        "max_response_tokens": rc.max_response_tokens,
        "lr": cfg.optim.lr,
        "s_per_step_median": median("step_s"),
        "s_per_step_mean": mean("step_s"),
        "phases_mean": {
            "generate": mean("generate"),
            "tools": mean("tools"),
            "reward": mean("reward_s"),
            "train": mean("train_s"),
        },
        "completion_tokens_per_step": mean("completion_tokens"),  # tool output included
        "sampled_tokens_per_step": mean("completion_tokens") - mean("obs_tokens"),
        "obs_tokens_per_step": mean("obs_tokens"),
        "tool_calls_per_step": mean("tool_calls"),
        "reward_mean": mean("reward_mean"),
        "wall_s": wall,
        "per_step": records,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
