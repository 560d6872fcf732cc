"""Per-token log-probs and entropies from a causal LM's final hidden states, chunk by chunk over the tokens.

The learner's largest allocation used to be the head: the micro-batch's full ``[N, V]`` logits in fp32 plus
``log_softmax`` and the entropy's temporaries, all kept for backward (40-50 GB at N = 16384 and Qwen's 152k
vocabulary). Here the head is applied to ``chunk_tokens`` hidden states at a time and no chunk's logits outlive its
step: the backward recomputes them. Peak memory then scales with chunk x V, in forward and backward alike, at the cost
of one more head matmul per chunk. Values and gradients equal the unchunked computation
(``torl.rl.grpo.token_logprobs`` over the full logits, which ``chunk_tokens`` 0 or None still runs). Every function
takes the sampling temperature: the log-probs are those of softmax(logits / T), the distribution the engine samples
from.

Not here: which positions are kept and how rows are packed (``torl.rl.batching``), the loss (``torl.rl.grpo``), FSDP
(the learner binds ``causal_lm_logprobs`` as an FSDP forward method, ``actors/learner.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from torl.rl.grpo import token_logprobs


def check_chunk_tokens(chunk_tokens: int | None) -> None:
    """Reject anything but None or an int >= 0, before any compute, naming the value."""
    if chunk_tokens is None:
        return
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be an integer >= 0 (0 or None = unchunked), got {chunk_tokens!r}")


def _log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """One chunk's log-probabilities [C, V] at ``temperature``: head in the model's dtype, softmax in fp32 of the
    logits divided by T, exactly as ``token_logprobs`` does it on the full logits (the only [C, V] tensor alive
    when this returns)."""
    z = F.linear(hidden, weight, bias).float()  # a fresh tensor: dividing in place costs no second [C, V]
    return torch.log_softmax(z.div_(temperature) if temperature != 1.0 else z, dim=-1)


class _ChunkedHead(torch.autograd.Function):
    """``token_logprobs(hidden @ weight.T + bias, targets, temperature)`` computed ``chunk`` rows at a time.

    Saves only the inputs and the [N] entropies; backward recomputes each chunk's log-softmax. The gradient of the
    scaled logits u = z / T of one row, with p = softmax(u) and H the entropy: d logp_t / du = onehot(t) - p and
    dH / du = -p * (log p + H); the head's logits z get that divided by T. In-place ops keep at most two [C, V]
    fp32 tensors alive per chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        for s in range(0, n, chunk):
            logp_all = _log_softmax(hidden[s : s + chunk], weight, bias, temperature)  # [C, V]
            logp[s : s + chunk] = logp_all.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            entropy[s : s + chunk] = -logp_all.exp().mul_(logp_all).sum(-1)
            del logp_all  # else it lives on through the next chunk's head, a third [C, V] at the peak
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.chunk, ctx.temperature = chunk, temperature
        return logp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: torch.Tensor, grad_entropy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulated over chunks in fp32: one bf16 sum per chunk would round N / chunk times.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, sl = hidden[s : s + ctx.chunk], slice(s, s + ctx.chunk)
            logp_all = _log_softmax(h, weight, bias, ctx.temperature)  # [C, V]
            p = logp_all.exp()  # [C, V]
            dz = logp_all.add_(entropy[sl, None]).mul_(p).mul_(-grad_entropy[sl, None])  # entropy term, in place
            dz.addcmul_(p, grad_logp[sl, None], value=-1.0)  # -g * p
            del p
            dz.scatter_add_(-1, targets[sl, None], grad_logp[sl, None])  # +g at the target: g * (onehot - p)
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)  # from the scaled logits u = z / T back to the head's z
            dz_head = dz.to(weight.dtype)  # the head's backward runs in its own dtype, as autograd would
            if grad_h is not None:
                grad_h[sl] = dz_head @ weight
            if grad_w is not None and grad_w.dtype == h.dtype:
                grad_w.addmm_(dz_head.t(), h)  # no weight-sized temporary
            elif grad_w is not None:
                grad_w += dz_head.t() @ h
            if grad_b is not None:
                grad_b += dz.sum(0)
            del logp_all, dz, dz_head  # as in forward: not alive during the next chunk's head
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def hidden_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and the entropy of each position, fp32 at ``temperature``, from final hidden states.

    ``hidden`` [N, H] (after the model's final norm), ``weight`` [V, H] and ``bias`` [V] or None of the LM head,
    ``targets`` [N]. ``chunk_tokens`` rows at a time (peak memory ~ 2 x chunk x V fp32 in forward and backward);
    0 or None = the full [N, V] logits at once. Returns ``logp`` [N], ``entropy`` [N].
    """
    check_chunk_tokens(chunk_tokens)
    if not chunk_tokens:
        return token_logprobs(F.linear(hidden, weight, bias), targets, temperature)
    return _ChunkedHead.apply(hidden, weight, bias, targets, chunk_tokens, temperature)


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    keep: torch.Tensor,
    chunk_tokens: int | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden_logprobs`` of a Hugging Face causal LM (``model.model`` the decoder, ``model.lm_head`` the head;
    Qwen2, Llama) on one packed row: position ``keep[i]`` predicts token ``keep[i] + 1``.

    ``input_ids``/``position_ids`` [1, L], ``keep`` [N]. Returns ``logp`` [N], ``entropy`` [N]. The decoder and
    the head are called separately so the full logits never exist; under FSDP the caller must run this as a
    registered forward method of the root (``register_fsdp_forward_method``) so the root's parameters are gathered.
    """
    # No KV cache: with one, transformers skips its packed-sequence detection (which reads the restarting position
    # ids) and every sequence of the row would attend to the ones before it.
    out = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[0, keep]  # [N, H]
    head = model.lm_head
    return hidden_logprobs(hidden, head.weight, head.bias, input_ids[0, keep + 1], chunk_tokens, temperature)
