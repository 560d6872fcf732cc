"""Teach a tiny model a few traces so that greedy decoding replays them on any CPU, not just the one that trained it.

A low loss does not make every greedy choice certain: one token of a trace can win by a hair while the average loss
is tiny, and then another machine's BLAS rounding (another core type, another thread count) flips it and the replay
goes elsewhere. So training runs until every labelled token beats its runner-up by ``margin`` nats, and the caller
gets an error, not a flaky test, when that does not happen. Rounding moves logits by ~1e-5 between CPUs, and vLLM's
batched CPU kernels by up to ~3e-4 from Hugging Face's, so a margin of 1 nat leaves three orders of magnitude.
"""

from __future__ import annotations

import torch

IGNORE = -100


def greedy_margin(model, seqs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Smallest (target logit - best other logit) over every labelled position of ``seqs`` ([1, T] ids, labels)."""
    worst = float("inf")
    with torch.no_grad():
        for ids, labels in seqs:
            logits = model(input_ids=ids).logits[0, :-1].float()  # position t predicts token t+1
            target = labels[0, 1:]
            keep = target != IGNORE
            logits, target = logits[keep], target[keep]
            chosen = logits.gather(-1, target[:, None])[:, 0]
            others = logits.scatter(-1, target[:, None], float("-inf")).max(-1).values
            worst = min(worst, float((chosen - others).min()))
    return worst


def memorize(
    model,
    seqs: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    margin: float = 1.0,
    max_steps: int = 3000,
    check_every: int = 25,
) -> int:
    """Train ``model`` on ``seqs`` with Adam until greedy decoding picks every labelled token by ``margin``.

    Returns the steps taken. Raises AssertionError, with the margin reached, when ``max_steps`` do not suffice."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(1, max_steps + 1):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            model.eval()
            reached = greedy_margin(model, seqs)
            model.train()
            if reached >= margin:
                model.eval()
                return step
    model.eval()
    raise AssertionError(
        f"after {max_steps} steps the weakest labelled token wins by {greedy_margin(model, seqs):.3f} nats, "
        f"not {margin}: greedy replay would depend on this CPU's rounding"
    )
