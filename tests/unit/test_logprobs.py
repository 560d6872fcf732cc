"""Chunked log-probs and entropy equal the full-logits computation, in values and gradients, for any chunk size."""

import re

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from torl.rl.batching import pack_responses
from torl.rl.grpo import token_logprobs
from torl.rl.logprobs import causal_lm_logprobs, hidden_logprobs

N, H, V = 10, 8, 13


def _inputs(seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, targets


def _values_and_grads(chunk, use_logp=True, use_entropy=True, **kw):
    """logp, entropy and the gradients of a loss mixing both with per-token weights, as the policy loss does."""
    hidden, weight, bias, targets = _inputs(**kw)
    logp, ent = hidden_logprobs(hidden, weight, bias, targets, chunk)
    return _backward(logp, ent, hidden, weight, bias, use_logp, use_entropy)


def _reference(use_logp=True, use_entropy=True, **kw):
    """The full [N, V] logits through token_logprobs, what the learner computed before chunking."""
    hidden, weight, bias, targets = _inputs(**kw)
    logp, ent = token_logprobs(F.linear(hidden, weight, bias), targets)
    return _backward(logp, ent, hidden, weight, bias, use_logp, use_entropy)


def _backward(logp, ent, hidden, weight, bias, use_logp, use_entropy):
    g = torch.Generator().manual_seed(1)
    loss = 0.0
    if use_logp:
        loss = loss + (torch.randn(N, generator=g) * logp).sum()
    if use_entropy:
        loss = loss + (torch.randn(N, generator=g) * ent).sum()
    loss.backward()
    grads = [hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    return [logp.detach(), ent.detach()], grads


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, N, 64])  # 3 and 4 do not divide N = 10
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_values_and_gradients_equal_the_full_logits(chunk, bias):
    values, grads = _values_and_grads(chunk, bias=bias)
    ref_values, ref_grads = _reference(bias=bias)
    for got, want in zip(values + grads, ref_values + ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use", [(True, False), (False, True)])
def test_one_output_unused_in_the_loss(use):
    """entropy_coef 0 leaves the entropy out of the graph (its gradient arrives as zeros); logp alone likewise."""
    values, grads = _values_and_grads(3, use_logp=use[0], use_entropy=use[1])
    ref_values, ref_grads = _reference(use_logp=use[0], use_entropy=use[1])
    for got, want in zip(values + grads, ref_values + ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, None])
def test_zero_or_none_is_the_unchunked_computation(chunk):
    hidden, weight, bias, targets = _inputs()
    logp, ent = hidden_logprobs(hidden, weight, bias, targets, chunk)
    ref_logp, ref_ent = token_logprobs(F.linear(hidden, weight, bias), targets)
    assert torch.equal(logp, ref_logp) and torch.equal(ent, ref_ent)


@pytest.mark.parametrize("bad", [-1, 2.5, "4", True])
def test_bad_chunk_size_is_rejected_by_name(bad):
    hidden, weight, bias, targets = _inputs()
    with pytest.raises(ValueError, match=r"chunk_tokens must be an integer >= 0 .* got " + re.escape(repr(bad))):
        hidden_logprobs(hidden, weight, bias, targets, bad)


def test_no_grad_and_bf16_head():
    """No graph under no_grad (the proximal pass); a bf16 head gives fp32 log-probs and gradients in bf16."""
    hidden, weight, bias, targets = _inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        logp, ent = hidden_logprobs(hidden, weight, bias, targets, 3)
    assert logp.grad_fn is None and logp.dtype == ent.dtype == torch.float32
    ref_logp, ref_ent = token_logprobs(F.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-5, atol=1e-5)
    values, grads = _values_and_grads(3, dtype=torch.bfloat16)
    ref_values, ref_grads = _reference(dtype=torch.bfloat16)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_causal_lm_logprobs_equal_the_models_own_logits():
    """Decoder + chunked head on a packed row equal the HF forward's logits at the kept positions (final norm and
    tied head included), with gradients reaching the embeddings."""
    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    ids, pos, keep = pack_responses([([3, 4, 5], [6, 7]), ([8], [9, 10, 11, 12])])
    logp, ent = causal_lm_logprobs(model, ids, pos, keep, chunk_tokens=4)
    logits = model(input_ids=ids, position_ids=pos, logits_to_keep=keep, use_cache=False).logits[0]  # as training
    ref_logp, ref_ent = token_logprobs(logits, ids[0, keep + 1])
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids[0, keep + 1], torch.tensor([6, 7, 9, 10, 11, 12]))
    (logp.sum() + ent.sum()).backward()
    emb_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(emb_grad, model.model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_temperature_gives_the_sampling_distributions_logprobs_and_their_gradients(chunk, bias):
    """At T = 0.7 the log-probs, entropies and gradients are those of softmax(logits / T), written out here by hand:
    what vLLM samples from at that temperature and reports as processed log-probs (#30). At T = 1 they differ, so a
    learner that ignored the temperature fails this."""
    t = 0.7
    hidden, weight, b, targets = _inputs(bias=bias)
    logp, ent = hidden_logprobs(hidden, weight, b, targets, chunk, temperature=t)
    values, grads = _backward(logp, ent, hidden, weight, b, True, True)
    hidden, weight, b, targets = _inputs(bias=bias)
    logp_all = torch.log_softmax(F.linear(hidden, weight, b) / t, dim=-1)  # [N, V]
    ref_logp = logp_all.gather(-1, targets[:, None])[:, 0]
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    ref_values, ref_grads = _backward(ref_logp, ref_ent, hidden, weight, b, True, True)
    for got, want in zip(values + grads, ref_values + ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    at_one, _ = hidden_logprobs(hidden.detach(), weight.detach(), None if b is None else b.detach(), targets, chunk)
    assert (at_one - ref_logp.detach()).abs().max() > 0.1
