"""Padding-free attention over packed rows (#28): flex attention's block mask, built by transformers from the packed
position ids, gives the same log-probs as the dense path (sdpa with its block-diagonal mask) and as each sequence
run alone, to 1e-5. GPU learners use it (``learner.attn_implementation=auto``, torl/infra/devices.py); torch's flex
attention runs forward on CPU (its first call compiles for a few seconds), so the equality is checked here.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from torl.rl.batching import pack_responses
from torl.rl.logprobs import causal_lm_logprobs

# (prompt, response) lengths: one row crosses the 128-token blocks of flex's block mask several times, with a
# one-token response, a long sequence spanning blocks, and sequences starting mid-block.
LENGTHS = [(5, 40), (17, 3), (60, 150), (2, 1), (31, 70), (90, 45)]


def _pairs() -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randint(3, 300, (p,), generator=gen).tolist(), torch.randint(3, 300, (r,), generator=gen).tolist())
        for p, r in LENGTHS
    ]


def _logprobs(model_dir, impl: str, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl).eval()
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        return causal_lm_logprobs(model, *pack_responses(pairs), chunk_tokens=0)  # [N], [N]


def test_flex_attention_on_packed_rows_equals_the_dense_path(tiny_model_dir):
    pairs = _pairs()
    flex_logp, flex_ent = _logprobs(tiny_model_dir, "flex_attention", pairs)
    dense_logp, dense_ent = _logprobs(tiny_model_dir, "sdpa", pairs)
    assert flex_logp.shape == (sum(r for _, r in LENGTHS),)
    torch.testing.assert_close(flex_logp, dense_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex_ent, dense_ent, rtol=0, atol=1e-5)
    # No attention across sequences: the packed row gives each sequence's log-probs computed alone (dense).
    alone = torch.cat([_logprobs(tiny_model_dir, "sdpa", [pair])[0] for pair in pairs])
    torch.testing.assert_close(flex_logp, alone, rtol=0, atol=1e-5)
