"""Peak memory of the learner's log-prob step: the full logits at once vs the chunked head (torl/rl/logprobs.py).

    .venv/bin/python bench/logprobs_memory.py [--model models/smollm2-135m-instruct --tokens 4096 --chunks 0 1024]

The step is what the learner does with the decoder's output for one micro-batch: the LM head, log-probs and entropy
(``torl.rl.logprobs.hidden_logprobs``), the GRPO loss over them (``torl.rl.grpo.policy_loss``, token-mean weights), and
its backward to the hidden states and the head weight. Chunk 0 is the unchunked computation (the full [N, V] fp32
logits through log_softmax, what the learner did before); the default is ``learner.logprob_chunk_tokens``.

Method (CPU, peak resident memory): the parent loads the model once, packs ``--tokens`` tokens of random
(prompt, response) sequences into one row (``torl.rl.batching.pack_responses``), computes the final hidden states at
the response positions and saves them with the head weight, the targets and the loss inputs. Each variant then runs in
a fresh subprocess with one thread: it loads that file, runs a warm-up step on 8 rows (the first call of each kernel
pages in torch's code, which RSS counts), resets the process's peak-RSS mark (``/proc/self/clear_refs``: VmHWM =
VmRSS), runs the step once and reports VmHWM - VmRSS-before: the step's peak growth over what was resident. Tensors
this large are mmapped by glibc and handed back to the OS when freed, so RSS follows the live tensors.
(``ru_maxrss`` cannot be reset: importing transformers and loading the file peak above the chunked step.) The
model's own forward is not in the figure: the decoder's activations are the same for both variants.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from torl.config import AlgoConfig, LearnerConfig
from torl.rl.batching import pack_responses
from torl.rl.grpo import aggregation_weights, policy_loss
from torl.rl.logprobs import hidden_logprobs

REPO = Path(__file__).resolve().parents[1]


def _pairs(tokens: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) pairs filling exactly ``tokens``: prompts 64-400 tokens, responses 256-1536 (ToRL-like)."""
    rng = random.Random(seed)
    pairs, left = [], tokens
    while left > 0:
        p = min(rng.randrange(64, 401), max(left - 1, 1))
        r = min(rng.randrange(256, 1537), left - p)
        pairs.append(([rng.randrange(vocab) for _ in range(p)], [rng.randrange(vocab) for _ in range(r)]))
        left -= p + r
    return pairs


def prepare(model_dir: str, tokens: int, path: Path) -> int:
    """Hidden states of one packed micro-batch and the loss inputs, saved for the measuring subprocesses."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pairs = _pairs(tokens, model.config.vocab_size)
    ids, pos, keep = pack_responses(pairs)  # [1, L], [1, L], [N]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state[0, keep]  # [N, H]
        head = model.lm_head
        targets = ids[0, keep + 1]  # [N]
        old, _ = hidden_logprobs(hidden, head.weight, head.bias, targets, 1024)  # [N], the proximal policy
    g = torch.Generator().manual_seed(0)
    adv = torch.cat([torch.full((len(r),), float(torch.randn(1, generator=g))) for _, r in pairs])  # [N]
    seq_index = torch.cat([torch.full((len(r),), j) for j, (_, r) in enumerate(pairs)])  # [N]
    mask = torch.ones(len(keep))  # [N]
    torch.save(
        {
            "hidden": hidden.contiguous(),
            "weight": head.weight.detach().clone(),
            "targets": targets,
            "old": old + 0.1 * torch.randn(len(keep), generator=g),  # ratios off 1, some clipped
            "adv": adv,
            "mask": mask,
            "weights": aggregation_weights(mask, seq_index, "token-mean", int(mask.sum()), len(pairs)),
        },
        path,
    )
    return len(keep)


def _rss_mb() -> tuple[float, float]:
    """(current, peak since the last reset) resident set size in MB, from ``/proc/self/status``."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _step(d: dict[str, torch.Tensor], rows: slice, chunk: int, entropy_coef: float) -> float:
    """Log-probs, entropy, policy loss and backward on ``rows`` of the saved micro-batch; returns the loss."""
    algo = AlgoConfig()
    hidden = d["hidden"][rows].detach().requires_grad_()
    weight = d["weight"].detach().requires_grad_()
    logp, entropy = hidden_logprobs(hidden, weight, None, d["targets"][rows], chunk)
    loss, _ = policy_loss(
        logp,
        d["old"][rows],
        d["adv"][rows],
        d["mask"][rows],
        d["weights"][rows],
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        entropy=entropy,
        entropy_coef=entropy_coef,
    )
    loss.backward()
    return float(loss.detach())


def measure(path: Path, chunk: int, entropy_coef: float) -> None:
    """One log-prob step in this (fresh) process after a warm-up; prints ``peak_mb seconds loss`` for the parent."""
    torch.set_num_threads(1)
    d = torch.load(path)
    _step(d, slice(0, 8), min(chunk, 3), entropy_coef)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
    base, _ = _rss_mb()
    t0 = time.perf_counter()
    loss = _step(d, slice(None), chunk, entropy_coef)
    seconds = time.perf_counter() - t0
    _, peak = _rss_mb()
    print(f"{peak - base:.1f} {seconds:.2f} {loss:.6f}")


def run_variant(path: Path, chunk: int, entropy_coef: float) -> tuple[float, float, float]:
    cmd = [sys.executable, __file__, "--measure", str(path), "--chunk", str(chunk)]
    cmd += ["--entropy-coef", str(entropy_coef)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--tokens", type=int, default=4096, help="micro_batch_tokens: the packed row's length")
    default_chunk = LearnerConfig().logprob_chunk_tokens
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, default_chunk], help="0 = unchunked")
    ap.add_argument("--entropy-coef", type=float, default=AlgoConfig().entropy_coef)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(Path(args.measure), args.chunk, args.entropy_coef)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.pt"
        n = prepare(args.model, args.tokens, path)
        vocab = torch.load(path)["weight"].shape[0]
        print(f"log-prob step: {args.tokens}-token row, {n} response tokens, vocab {vocab}, fp32 on CPU, 1 thread,")
        print(f"entropy_coef {args.entropy_coef}; peak = VmHWM (reset before the step) - VmRSS, fresh process")
        print(f"{'chunk':>8}{'peak MB':>10}{'seconds':>9}{'loss':>12}")
        rows = {c: run_variant(path, c, args.entropy_coef) for c in args.chunks}
        for c, (mb, s, loss) in rows.items():
            print(f"{c or 'full':>8}{mb:>10.0f}{s:>9.2f}{loss:>12.6f}")
    if 0 in rows:
        for c in (c for c in rows if c):
            print(f"peak ratio full / chunk {c}: {rows[0][0] / rows[c][0]:.1f}x")


if __name__ == "__main__":
    main()
