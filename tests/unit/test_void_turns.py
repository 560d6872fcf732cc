"""SimpleTIR's void turns (docs/void-turns.md): which rounds are void, and the filter that drops their trajectories
from the policy update while their rewards stay in the group.

Hand-built trajectories: scripted engine rounds through the real tool loop (a character tokenizer at the edge), and
trajectories written out by hand for the filter.
"""

import asyncio

import pytest

from torl.config import ToolConfig
from torl.rollout.tool_loop import LoopSettings, RoundOutput, ToolLoop, filter_void_turns, run_async
from torl.rollout.tool_protocol import is_void_turn
from torl.rollout.types import ExecResult, Trajectory

STOP = "```output"
CODE = "```python\nprint(6*7)\n```\n"


@pytest.mark.parametrize(
    "text, void",
    [
        ("Let me think about it", True),  # EOS mid-reasoning
        ("The answer is \\boxed{42}.", False),  # a final answer
        (CODE, False),  # a complete block
        ("```python\nprint(6*7)\n", True),  # an unclosed block (SimpleTIR: no complete code)
        (CODE + "and then ```python\nx = 1\n", False),  # a complete block before an unclosed one still counts
        ("The answer is \\boxed", True),  # no opening brace: not SimpleTIR's "\boxed{"
        ("so it is 42", True),
        ("", True),
    ],
)
def test_is_void_turn(text, void):
    assert is_void_turn(text) is void


def enc(text: str) -> list[int]:
    return [ord(c) for c in text]


def dec(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def rnd(text: str, tool_stop: bool = False, finish: str = "stop", detokenized: bool = True) -> RoundOutput:
    """One engine round; ``detokenized=False``: no text, as vLLM returns a round generated without stop strings."""
    ids = enc(text + (STOP if tool_stop else ""))
    return RoundOutput(ids, [-0.5] * len(ids), text if detokenized else "", finish, STOP if tool_stop else None, 0)


def run(rounds: list[RoundOutput], max_calls: int = 3) -> Trajectory:
    settings = LoopSettings(ToolConfig(max_calls=max_calls), 4096, 3000)
    loop = ToolLoop(Trajectory("p", 0, enc("Q:")), 0, settings, enc, dec)
    pending = list(rounds)

    async def engine(lp, req):
        return pending.pop(0)

    async def sandbox(lp, code):
        return ExecResult("ok", "42\n", "", 0)

    return asyncio.run(run_async(loop, engine, sandbox))


@pytest.mark.parametrize(
    "rounds, void_turns",
    [
        ([rnd(CODE, tool_stop=True), rnd("So \\boxed{42}")], 0),  # code, then the answer
        ([rnd(CODE, tool_stop=True), rnd("So it is 42")], 1),  # the last round has no answer: void
        (
            [rnd("I will run it ", tool_stop=True), rnd(CODE, tool_stop=True), rnd("\\boxed{42}")],
            1,
        ),  # request, no code
        ([rnd(CODE, tool_stop=True), rnd(CODE, tool_stop=True), rnd("hmm", finish="length")], 1),  # cut off
        ([rnd("First, \\boxed{42}")], 0),  # one round, the answer without code
        ([rnd("no", tool_stop=True), rnd("still no", tool_stop=True), rnd("nothing")], 3),
    ],
)
def test_tool_loop_counts_void_rounds(rounds, void_turns):
    assert run(rounds).void_turns == void_turns


def test_a_round_after_the_last_call_is_read_from_its_ids():
    """With c = 1 the round after the call has no stop string, and the engine returns no text for it."""
    answered = [rnd(CODE, tool_stop=True), rnd("So \\boxed{42}", detokenized=False)]
    assert run(answered, max_calls=1).void_turns == 0
    assert run([rnd(CODE, tool_stop=True), rnd("So it is 42", detokenized=False)], max_calls=1).void_turns == 1


def traj(pid: str, void_turns: int, reward: float) -> Trajectory:
    return Trajectory(pid, 0, [1], [5, 6, 7], [-0.1] * 3, [1, 0, 1], [0] * 3, reward=reward, void_turns=void_turns)


def test_filter_zeroes_only_void_trajectories_and_keeps_rewards():
    batch = [traj("a", 0, 1.0), traj("b", 2, -1.0), traj("c", 0, -1.0), traj("d", 1, 1.0)]
    assert filter_void_turns(batch) == 0.5
    assert [t.loss_mask for t in batch] == [[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 0, 0]]
    assert [t.reward for t in batch] == [1.0, -1.0, -1.0, 1.0]  # the group's advantage statistics still see them
    assert filter_void_turns([]) == 0.0


def test_void_turn_share_is_reported_with_the_filter_off():
    from torl.rollout.metrics import rollout_metrics

    batch = [traj("a", 0, 1.0), traj("b", 1, -1.0), traj("c", 0, -1.0), traj("d", 0, 1.0)]
    assert rollout_metrics(batch)["tool/void_turn_share"] == 0.25
    assert [t.loss_mask for t in batch] == [[1, 0, 1]] * 4  # reporting drops nothing
