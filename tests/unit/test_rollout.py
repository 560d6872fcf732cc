"""The tool loop's state machine, budget, masks and metrics, with a scripted engine and a character tokenizer.

Fakes sit only at the edges (engine rounds, sandbox results, tokenizer); the same paths run for real against vLLM and
the sandbox in tests/integration/test_generator.py.
"""

import asyncio

import pytest

from torl.config import Config, ToolConfig
from torl.rollout.metrics import BatchStats, batch_metrics, merge_batch_metrics, rollout_metrics, tool_warnings
from torl.rollout.tool_loop import (
    LoopSettings,
    Observation,
    RoundOutput,
    ToolFinished,
    ToolLoop,
    ToolStarted,
    derive_seed,
    observation_insert,
    run_async,
    run_sync,
)
from torl.rollout.types import ExecResult, Trajectory

STOP = "```output"


def enc(text: str) -> list[int]:
    return [ord(c) for c in text]


def dec(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def sampled(text: str, finish: str = "stop", stop_reason=None, version: int = 0, stop_tail: str = "") -> RoundOutput:
    """A round whose sampled ids spell ``text`` (+ the stop string and tail when it stopped on the tool stop)."""
    ids = enc(text + (STOP + stop_tail if stop_reason == STOP else ""))
    return RoundOutput(ids, [-0.5] * len(ids), text, finish, stop_reason, version)


def make_loop(max_calls=2, max_model_len=1000, max_resp=500, prompt="Q:", enabled=True) -> ToolLoop:
    s = LoopSettings(ToolConfig(max_calls=max_calls, enabled=enabled), max_model_len, max_resp)
    return ToolLoop(Trajectory("p0", 0, enc(prompt)), 0, s, enc, dec)


class Script:
    """Engine stand-in: returns the scripted rounds in order and records each request."""

    def __init__(self, rounds):
        self.rounds = list(rounds)
        self.requests = []

    async def __call__(self, lp, req):
        self.requests.append(req)
        out = self.rounds.pop(0)
        out.token_ids = out.token_ids[: req.max_tokens]
        out.logprobs = out.logprobs[: req.max_tokens]
        return out


async def ok_tool(lp, code):
    return ExecResult("ok", stdout=f"ran:{code}", wall_s=0.01)


def run(loop, engine, tool=ok_tool):
    return asyncio.run(run_async(loop, engine, tool))


def test_two_tool_calls_masks_budget_and_continuation_ids():
    lp = make_loop(max_calls=2)
    r1 = "a\n```python\nx=1\n```\n"
    r2 = "b\n```python\ny=2\n```\n"
    engine = Script([sampled(r1, stop_reason=STOP), sampled(r2, stop_reason=STOP), sampled("done")])
    t = run(lp, engine)
    obs1, obs2 = "\nran:x=1\n```\n", "\nran:y=2\n```\n"
    assert dec(t.response_ids) == r1 + STOP + obs1 + r2 + STOP + obs2 + "done"
    mask = [1] * len(r1 + STOP) + [0] * len(obs1) + [1] * len(r2 + STOP) + [0] * len(obs2) + [1] * 4
    assert t.loss_mask == mask
    assert [v for v, m in zip(t.versions, mask, strict=True) if m == 0] == [-1] * (len(obs1) + len(obs2))
    assert all(lp_ == 0.0 for lp_, m in zip(t.logprobs, mask, strict=True) if m == 0)
    assert [c.code for c in t.tool_calls] == ["x=1", "y=2"] and t.finish_reason == "eos"
    # Each round continues from exactly prompt + everything so far; the third round has no stop (c reached).
    assert engine.requests[1].ids == enc("Q:") + enc(r1 + STOP + obs1)
    assert engine.requests[2].ids == enc("Q:") + t.response_ids[: -len("done")]
    assert [r.stop for r in engine.requests] == [[STOP], [STOP], []]
    assert engine.requests[2].max_tokens == 500 - (len(t.response_ids) - 4)
    assert t.text == dec(t.response_ids)


def test_events_follow_the_loop_and_carry_the_recorded_calls():
    lp = make_loop(max_calls=2)
    r1 = "a\n```python\nx=1\n```\n"
    engine = Script([sampled(r1, stop_reason=STOP), sampled("done")])
    events = []

    async def hear(ev):
        events.append(ev)

    t = asyncio.run(run_async(lp, engine, ok_tool, hear))
    assert [type(e) for e in events] == [ToolStarted, ToolFinished, Observation]
    assert events[0].code == "x=1"
    assert events[1].call is t.tool_calls[0]  # the one record, not a second format of it
    assert events[2].text == "\nran:x=1\n```\n"
    assert dec(t.response_ids) == r1 + STOP + events[2].text + "done"


def test_stop_without_complete_block_executes_nothing_and_continues():
    lp = make_loop(max_calls=1)
    engine = Script(
        [
            sampled("```python\nx=1\n", stop_reason=STOP),
            sampled("\n```python\nprint(3)\n```\n", stop_reason=STOP),
            sampled("end"),
        ]
    )
    t = run(lp, engine)
    assert len(t.tool_calls) == 1 and t.tool_calls[0].code == "print(3)"
    assert lp.requests == 2 and lp.unexecuted == 1
    # The first stop-string tokens stay (trained), followed directly by the next round.
    assert dec(t.response_ids).startswith("```python\nx=1\n" + STOP + "\n```python")
    assert sum(1 for m in t.loss_mask if m == 0) == len("\nran:print(3)\n```\n")


def test_code_block_spanning_an_unexecuted_stop_is_not_joined():
    # ToRL extracts from the current round only; after a stop with nothing run, the next round's text is new.
    lp = make_loop(max_calls=1)
    engine = Script([sampled("```python\n", stop_reason=STOP), sampled("x\n```\n", stop_reason=STOP), sampled("e")])
    t = run(lp, engine)
    assert t.tool_calls == [] and lp.unexecuted == 2


def test_observation_overflow_is_truncated_and_ends_with_length():
    lp = make_loop(max_calls=1, max_resp=40)
    r1 = "```python\nx\n```\n"  # 16 + 9 stop chars = 25 sampled, 15 left
    engine = Script([sampled(r1, stop_reason=STOP)])

    async def long_tool(lp_, code):
        return ExecResult("ok", stdout="z" * 100)

    t = run(lp, engine, long_tool)
    assert len(t.response_ids) == 40 and t.finish_reason == "length"
    assert t.loss_mask == [1] * 25 + [0] * 15


def test_context_window_budget_counts_prompt():
    lp = make_loop(max_calls=0, max_model_len=12, max_resp=500, prompt="0123456789")
    engine = Script([sampled("abcdef", finish="length")])
    t = run(lp, engine)
    assert engine.requests[0].max_tokens == 2 and t.response_ids == enc("ab") and t.finish_reason == "length"


def test_prompt_without_room_is_a_clear_error():
    with pytest.raises(ValueError, match="no room"):
        make_loop(max_model_len=2, prompt="abc")


def test_eos_and_tools_disabled():
    lp = make_loop(enabled=False)
    engine = Script([sampled("```python\n1\n```\n```output\n5\n```\nok")])
    t = run(lp, engine)
    assert engine.requests[0].stop == [] and t.finish_reason == "eos" and t.tool_calls == []
    assert set(t.loss_mask) == {1}


def test_stop_token_tail_not_duplicated():
    # The token that completed the stop string carried a newline past it: the inserted text must not repeat it.
    assert observation_insert("code\n", "\n", "42", STOP) == "42\n```\n"
    assert observation_insert("code\n", "", "42", STOP) == "\n42\n```\n"
    lp = make_loop(max_calls=1)
    engine = Script([sampled("```python\nx\n```\n", stop_reason=STOP, stop_tail="\n"), sampled("e")])
    t = run(lp, engine)
    assert "```output\nran:x\n```\ne" in t.text


def test_preempted_round_continues_with_versions():
    lp = make_loop(max_calls=1)
    first = sampled("```pyt", finish="abort", version=3)
    first.preempted = True
    engine = Script([first, sampled("hon\nx\n```\n", stop_reason=STOP, version=4), sampled("e", version=4)])
    t = run(lp, engine)
    assert [c.code for c in t.tool_calls] == ["x"]  # the block spans the preemption
    sampled_versions = [v for v, m in zip(t.versions, t.loss_mask, strict=True) if m]
    assert sampled_versions == [3] * 6 + [4] * (len("hon\nx\n```\n") + len(STOP) + 1)


def test_real_abort_finishes():
    lp = make_loop()
    t = run(lp, Script([sampled("ab", finish="abort")]))
    assert t.finish_reason == "abort"


def test_sync_mode_barriers_and_same_result():
    rounds = lambda: [sampled("```python\nx\n```\n", stop_reason=STOP), sampled("fin")]  # noqa: E731
    loops = [make_loop(max_calls=1) for _ in range(3)]
    engines = {id(lp): Script(rounds()) for lp in loops}
    order = []

    async def gen(lp, req):
        order.append(("gen", req.round))
        return await engines[id(lp)](lp, req)

    async def tool(lp, code):
        order.append(("tool", 0))
        return await ok_tool(lp, code)

    trajs = asyncio.run(run_sync(loops, gen, tool))
    assert order == [("gen", 0)] * 3 + [("tool", 0)] * 3 + [("gen", 1)] * 3
    ref = run(make_loop(max_calls=1), Script(rounds()))
    assert all(t.response_ids == ref.response_ids and t.loss_mask == ref.loss_mask for t in trajs)


def test_sync_mode_runs_an_empty_code_block():
    """An empty ```python block is a call ("" runs and prints nothing); sync mode once skipped it and then crashed."""
    loops = [make_loop(max_calls=1) for _ in range(2)]
    engines = {id(lp): Script([sampled("```python\n```\n", stop_reason=STOP), sampled("fin")]) for lp in loops}
    ran = []

    async def tool(lp, code):
        ran.append(code)
        return await ok_tool(lp, code)

    trajs = asyncio.run(run_sync(loops, lambda lp, req: engines[id(lp)](lp, req), tool))
    assert ran == ["", ""] and all(len(t.tool_calls) == 1 and dec(t.response_ids).endswith("fin") for t in trajs)


def test_metrics_and_warnings():
    lp_ok = make_loop(max_calls=1)
    t_ok = run(lp_ok, Script([sampled("```python\nx\n```\n", stop_reason=STOP), sampled("a")]))
    lp_len = make_loop(max_calls=1, max_resp=3)
    t_len = run(lp_len, Script([sampled("abcdef", finish="length")]))
    m = batch_metrics([t_ok, t_len], BatchStats(2.0, [lp_ok, lp_len]))
    assert m["tool/requests"] == 1 and m["tool/unexecuted_requests"] == 0 and m["rollout/rounds_mean"] == 1.5
    assert m["rollout/tokens"] == sum(t_ok.loss_mask) + 3 and m["rollout/tokens_per_s"] == m["rollout/tokens"] / 2.0
    assert tool_warnings(m, ToolConfig()) == []
    # What the trajectories say is rollout_metrics's alone: no key is computed twice (one would overwrite the other).
    content = rollout_metrics([t_ok, t_len])
    assert not set(m) & set(content)
    assert content["tool/calls"] == 1 and content["tool/code_ratio"] == 0.5 and content["tool/exec_success"] == 1.0
    assert content["response/cutoff_rate"] == 0.5 and content["response/eos_rate"] == 0.5

    # Requests that never execute, and a stop string the model writes but that never fires, are reported.
    lp_bad = make_loop(max_calls=1)
    t_bad = run(lp_bad, Script([sampled("```python\nx", stop_reason=STOP), sampled("``` output ```output 1")]))
    m = batch_metrics([t_bad], BatchStats(1.0, [lp_bad]))
    assert m["tool/unexecuted_requests"] == 1 and len(tool_warnings(m, ToolConfig())) == 1
    lp_miss = make_loop(max_calls=1)
    t_miss = run(lp_miss, Script([sampled("```python\nx\n```\n```output\n1")]))
    m = batch_metrics([t_miss], BatchStats(1.0, [lp_miss]))
    assert m["tool/stop_missed"] == 1 and "never fired" in tool_warnings(m, ToolConfig())[0]


def test_seeds_are_deterministic_and_distinct():
    assert derive_seed(1, "p", 0, 0) == derive_seed(1, "p", 0, 0)
    assert len({derive_seed(1, "p", s, r) for s in range(4) for r in range(3)}) == 12
    assert 0 <= derive_seed(7, "x", 3, 2) < 2**31
    # A prompt revisited at another training step samples a new stream; the same step again, the same one.
    assert derive_seed(1, "p", 0, 0, step=3) == derive_seed(1, "p", 0, 0, step=3) != derive_seed(1, "p", 0, 0, step=4)


def test_settings_from_config_overrides():
    s = LoopSettings.from_config(Config(), max_calls=3, tools=False)
    assert s.tool.max_calls == 3 and not s.tool.enabled and s.max_response_tokens == 3072


def test_generator_parts_merge_by_kind():
    a = {"rollout/tokens": 10.0, "rollout/tokens_per_s": 5.0, "time/rollout": 2.0, "time/generate": 0.5}
    b = {"rollout/tokens": 30.0, "rollout/tokens_per_s": 15.0, "time/rollout": 3.0, "time/generate": 1.0}
    assert merge_batch_metrics([a, b]) == {
        "rollout/tokens": 40.0,  # counts add up
        "rollout/tokens_per_s": 20.0,  # generators decode side by side
        "time/rollout": 3.0,  # the batch waits for the slowest
        "time/generate": 0.75,  # means are averaged
    }
    with pytest.raises(KeyError, match="not declared"):
        merge_batch_metrics([{"tool/code_ratio": 0.5}])


def test_every_engine_metric_is_declared_and_measured():
    from torl.rollout.metrics import ENGINE_METRICS, engine_counts

    lp = make_loop(max_calls=1)
    t = run(lp, Script([sampled("done")]))
    measured = set(batch_metrics([t], BatchStats(1.0, [lp])))
    # The generator adds its weight version and engine-idle time to what batch_metrics measures.
    # The sandbox clients' stats() keys are the rest (tests/integration/test_sandbox_pool.py checks those).
    engine = {k for k in ENGINE_METRICS if not k.startswith("sandbox/")}
    assert measured | {"rollout/policy_version", "time/engine_idle_tools"} == engine
    counts = engine_counts(batch_metrics([t], BatchStats(1.0, [lp])))
    assert "rollout/tokens" in counts and "rollout/tokens_per_s" not in counts and "time/rollout" not in counts
