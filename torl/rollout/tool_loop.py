"""The per-trajectory tool loop as a pure state machine, its typed events, and its async and batch-synchronous drivers.

One ``ToolLoop`` holds a trajectory being built token by token: it says what to generate next (a ``RoundRequest``:
the exact ids so far, the token budget left, the stop list), takes the engine's ``RoundOutput`` (sampled ids and their
logprobs, kept as sampled: never decoded and re-tokenized, unlike ToRL), decides whether the round is a tool request,
and splices in the tokenized observation with loss mask 0. ``run_async`` drives one loop against awaitable engine and
sandbox callables (one asyncio task per trajectory); ``run_sync`` drives a whole batch round by round with barriers,
as ToRL does, and exists only to measure what the async loop gains.

Not here: the vLLM engine, Ray and the sandbox (``actors/generator.py`` passes them in as callables), the TIR text
protocol itself (``torl.rollout.tool_protocol``), metrics (``torl.rollout.metrics``), grading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from torl.config import Config, ToolConfig
from torl.rollout import tool_protocol
from torl.rollout.tool_protocol import LoopState
from torl.rollout.types import ExecResult, FinishReason, ToolCall, Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenRequest:
    """One prompt to sample ``n`` responses for (the n samples share ``group``)."""

    problem_id: str
    group: int
    prompt_ids: list[int]
    answer: str = ""
    n: int = 1
    # The training step this rollout serves: part of every sample's seed, so a prompt drawn again in a later epoch
    # samples a new random stream while a rerun of the same step samples the same one. A further dynamic-sampling
    # draw of the step passes a value of its own (``torl.rl.dynamic_sampling.draw_seed_step``).
    step: int = 0


@dataclass(frozen=True)
class LoopSettings:
    """What the tool loop needs from the config, flattened (so unit tests build it in one line)."""

    tool: ToolConfig
    max_model_len: int
    max_response_tokens: int

    @classmethod
    def from_config(cls, cfg: Config, max_calls: int | None = None, tools: bool | None = None) -> LoopSettings:
        tool = cfg.tool
        if max_calls is not None or tools is not None:
            tool = dataclasses.replace(
                tool,
                max_calls=tool.max_calls if max_calls is None else max_calls,
                enabled=tool.enabled if tools is None else tools,
            )
        return cls(tool, cfg.model.max_model_len, cfg.rollout.max_response_tokens)


@dataclass(frozen=True)
class RoundRequest:
    """Generate from exactly ``ids`` (prompt + response so far), at most ``max_tokens``, stopping at ``stop``."""

    ids: list[int]
    max_tokens: int
    stop: list[str]
    round: int  # 0-based generation round of this trajectory (a seed ingredient)


@dataclass
class RoundOutput:
    """What one engine call sampled. ``token_ids`` include the stop string's tokens (vLLM keeps them)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str  # this round's text without the stop string (vLLM's include_stop_str_in_output=False)
    finish_reason: str  # vLLM's: "stop" (EOS or stop string), "length", "abort"
    stop_reason: str | int | None  # the matched stop string; None for EOS
    version: int  # policy version that sampled these tokens
    preempted: bool = False  # aborted by a weight update: continue from here instead of finishing


def derive_seed(base: int, problem_id: str, sample: int, round_: int, step: int = 0) -> int:
    """A 31-bit seed that depends only on its inputs, so a rerun samples the same trajectories.

    A fresh seed per round: re-using one seed each round would replay the same random stream after every tool call;
    and per training step, or every revisit of a prompt would replay its first visit's stream.
    """
    digest = hashlib.blake2b(f"{base}|{step}|{problem_id}|{sample}|{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Retokenizer:
    """What ToRL's text round trip needs from the tokenizer (``tool.compat_retokenise``)."""

    # text -> (ids, character offsets), no special tokens added (ToRL: add_special_tokens=False, offsets mapping)
    encode_offsets: Callable[[str], tuple[list[int], list[tuple[int, int]]]]
    # ids -> text with special tokens skipped, as vLLM's output text (ToRL reads the engine's text)
    decode_plain: Callable[[list[int]], str]
    eos_text: str  # appended once unless the response was cut at the length limit (ToRL: tokenizer.eos_token)


def torl_token_mask(offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]) -> list[int]:
    """ToRL's loss mask from character ranges: a token is masked (0) when it starts inside a range [s, e) and ends
    after s (``_tokenize_and_find_mask_token_indices``), so a token that starts before s is trained even when it
    reaches into the range.

    >>> torl_token_mask([(0, 3), (3, 7), (7, 9)], [(4, 9)])
    [1, 1, 0]
    """
    return [0 if any(s <= a < e and b > s for s, e in ranges) else 1 for a, b in offsets]


def observation_insert(round_text: str, tail: str, body: str, stop: str) -> str:
    """The text to append after the sampled stop string so the context reads as ToRL's observation frame.

    ToRL drops the stop string from the text and re-inserts ``[\\n]```output\\n{body}\\n```\\n``
    (docs/torl-behaviour.md ("Observation format") step 5). We keep the sampled stop-string tokens (they are trained),
    so we insert only what follows ``stop`` in that frame, minus any characters the stop string's last token already
    carried past it (``tail``, e.g. a token "output\\n" leaves tail "\\n"). The optional newline ToRL adds *before*
    ```output cannot be inserted without altering sampled ids, so the model's own text stands there.
    """
    full = tool_protocol.observation_text(body, round_text.endswith("\n"))
    at = full.find(stop)
    after = full[at + len(stop) :] if at >= 0 else full
    if tail and after.startswith(tail):
        return after[len(tail) :]
    return after


class ToolLoop:
    """State of one trajectory: generate, maybe execute, append, repeat (veRL's agent-loop states, made explicit).

    ``tokenize`` maps observation text to ids (no special tokens); ``decode`` maps ids to text (for the tail past the
    stop string and the final decoded response). ``retokenizer`` is needed with ``tool.compat_retokenise``: the loop
    then also keeps ToRL's response text and rebuilds the trajectory from it at the end (``_retokenised``).
    """

    def __init__(
        self,
        traj: Trajectory,
        sample: int,
        settings: LoopSettings,
        tokenize: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        step: int = 0,
        retokenizer: Retokenizer | None = None,
    ) -> None:
        if settings.tool.compat_retokenise and retokenizer is None:
            raise ValueError("tool.compat_retokenise needs a Retokenizer (the tokenizer's offsets and EOS text)")
        self.traj = traj
        self.sample = sample
        self.step = step  # the training step (GenRequest.step), for the sampling seed
        self.s = settings
        self._tokenize = tokenize
        self.decode = decode
        self.rounds = 0
        self.calls = 0  # executed tool calls (c counts these)
        self.requests = 0  # rounds that ended at the tool stop string
        self.unexecuted = 0  # ... of which had no complete python block (nothing ran; ToRL quirk iii, fixed)
        self.void_turns = 0  # rounds that ended with neither a complete python block nor a final answer (SimpleTIR)
        self.preemptions = 0
        # ToRL's execution_pass (tool.compat_code_ok): set at the end of every round that still allowed a call.
        self._exec_pass = False
        self._retok = retokenizer if settings.tool.compat_retokenise else None
        self._text = ""  # ToRL's response text (compat_retokenise): round texts, observation frames
        self._mask_ranges: list[tuple[int, int]] = []  # character ranges of _text ToRL masks
        self._round_ids: list[int] = []  # sampled ids of the round so far (a preempted round spans several outputs)
        self._round_allowed = False  # the current round was generated with the tool stop string set
        self.done = False
        self.pending_code: str | None = None
        self._round_text = ""
        self._tail = ""
        if self._left() <= 0:
            raise ValueError(
                f"prompt of {traj.problem_id} has {len(traj.prompt_ids)} tokens: no room to generate within "
                f"max_model_len={settings.max_model_len}"
            )

    # -- budget ---------------------------------------------------------------------------------------------------
    def _left(self) -> int:
        """Tokens the response may still grow by: within the context window and the response cap (obs included)."""
        used = len(self.traj.response_ids)
        return min(self.s.max_model_len - len(self.traj.prompt_ids) - used, self.s.max_response_tokens - used)

    @property
    def budget_used(self) -> int:
        """Rounds counted against c: executed calls, plus unexecuted requests under ToRL's accounting."""
        return self.calls + (self.unexecuted if self.s.tool.compat_round_per_request else 0)

    def _stops(self) -> list[str]:
        t = self.s.tool
        # After c calls the stop list is cleared: a later ```output is ordinary text (ToRL's last round).
        return [t.stop] if t.enabled and self.budget_used < t.max_calls else []

    # -- transitions ----------------------------------------------------------------------------------------------
    def next_request(self) -> RoundRequest | None:
        if self.done:
            return None
        left = self._left()
        if left <= 0:
            self._finish("length")
            return None
        stops = self._stops()
        if not self._round_ids:  # a new round (not the continuation of a preempted one)
            self._round_allowed = bool(stops)
        ids = self.traj.prompt_ids + self.traj.response_ids
        if self._retok is not None:
            # ToRL decodes the prompt and re-encodes it with the response text every round (_tir_generate); a round
            # cut by a weight update continues after its own text so far.
            text = self._text + self._retok.decode_plain(self._round_ids)
            ids, _ = self._retok.encode_offsets(self.decode(self.traj.prompt_ids) + text)
            left = min(left, self.s.max_model_len - len(ids))
            if left <= 0:
                self._finish("length")
                return None
        return RoundRequest(ids, left, stops, self.rounds)

    def on_round(self, out: RoundOutput, gen_s: float = 0.0) -> str | None:
        """Append the sampled tokens; return the code to execute if this round is a tool request, else None."""
        assert not self.done and self.pending_code is None, "on_round called out of order"
        if len(out.token_ids) != len(out.logprobs):
            raise AssertionError(f"engine returned {len(out.token_ids)} ids but {len(out.logprobs)} logprobs")
        t = self.traj
        t.response_ids.extend(out.token_ids)
        t.logprobs.extend(out.logprobs)
        t.loss_mask.extend([1] * len(out.token_ids))
        t.versions.extend([out.version] * len(out.token_ids))
        t.gen_s += gen_s
        # Text since the last tool call: a preempted round continues the same round (code may span the break).
        self._round_text += out.text
        self._round_ids.extend(out.token_ids)
        if out.preempted:
            self.preemptions += 1
            return None
        self.rounds += 1
        tool = self.s.tool
        code = tool_protocol.last_code_block(self._round_text)
        if out.finish_reason in ("abort", "length"):
            state = LoopState.STOP
        else:
            state = tool_protocol.next_state(out.finish_reason, out.stop_reason, code, self.budget_used, tool)
        # The engine's text exists only where a stop string was set (it skips detokenising otherwise): a round
        # after the last call is read from its ids.
        if tool_protocol.is_void_turn(self._round_text if self._round_allowed else self.decode(self._round_ids)):
            self.void_turns += 1
        self._end_round_text(out, state)
        if state is LoopState.STOP:
            self._finish(out.finish_reason if out.finish_reason in ("abort", "length") else "eos")
            return None
        self.requests += 1
        if state is LoopState.GENERATE:
            # ToRL quirk (iii): a stop without a complete block executes nothing; generation continues with the
            # stop-string tokens kept (ToRL loses that text).
            self.unexecuted += 1
            self._round_text = ""
            return None
        self._tail = self._tail_after_stop(out.token_ids, tool.stop)
        self.pending_code = code
        return code

    def _end_round_text(self, out: RoundOutput, state: LoopState) -> None:
        """Close the round in ToRL's bookkeeping: its execution_pass (reset by every round that allowed a call) and,
        with compat_retokenise, its text: the plain text without the stop string, and ToRL's newline after it in a
        round that allowed a call (``_tir_generate`` adds one to every response of such a round)."""
        ids, self._round_ids = self._round_ids, []
        if self._round_allowed:
            self._exec_pass = False  # set again by on_tool_result when this round's call passes
        if self._retok is None:
            return
        text = self._retok.decode_plain(ids)
        if state is not LoopState.STOP:  # a tool request: the engine's text ends before the stop string
            at = text.find(self.s.tool.stop)
            text = text[:at] if at >= 0 else text
        if self._round_allowed and self.s.tool.compat_newline_before_output and not text.endswith("\n"):
            text += "\n"
        self._text += text

    def _tail_after_stop(self, ids: list[int], stop: str) -> str:
        """Characters the last sampled tokens carry past the stop string (vLLM cuts text, not tokens)."""
        for k in (4, 16, len(ids)):
            text = self.decode(ids[-k:])
            at = text.rfind(stop)
            if at >= 0:
                return text[at + len(stop) :]
        return ""

    def on_tool_result(self, result: ExecResult, wait_s: float) -> None:
        """Splice the observation for ``result`` into the context (mask 0), truncated to the budget if needed."""
        assert self.pending_code is not None, "on_tool_result without a pending call"
        body = tool_protocol.format_observation(result, self.s.tool)
        text = observation_insert(self._round_text, self._tail, body, self.s.tool.stop)
        ids = self._tokenize(text)
        left = self._left()
        overflow = len(ids) > left
        if overflow:
            ids = ids[: max(left, 0)]
        t = self.traj
        t.response_ids.extend(ids)
        t.logprobs.extend([0.0] * len(ids))
        t.loss_mask.extend([0] * len(ids))
        t.versions.extend([-1] * len(ids))
        ok = tool_protocol.is_success(result, self.s.tool)
        error = result.stderr if result.status == "sandbox_error" else ""
        t.tool_calls.append(ToolCall(self.pending_code, body, result.status, result.wall_s, result.queue_s, ok, error))
        t.tool_s += wait_s
        self._exec_pass = ok
        if self._retok is not None:
            # ToRL masks from just after the re-inserted ```output to the end of the frame.
            start = len(self._text) + len(tool_protocol.OUTPUT_OPEN) - 1  # after "```output", before its newline
            self._text += tool_protocol.OUTPUT_OPEN + body + tool_protocol.OUTPUT_CLOSE
            self._mask_ranges.append((start, len(self._text)))
        self.calls += 1
        self.pending_code = None
        self._round_text = ""
        self._tail = ""
        if overflow or self._left() <= 0:
            self._finish("length")

    def _finish(self, reason: FinishReason) -> None:
        self.done = True
        self.traj.finish_reason = reason

    def result(self) -> Trajectory:
        """The finished trajectory, with its decoded text; per-token alignment checked."""
        assert self.done, "trajectory not finished"
        if self._retok is not None:
            self._retokenised()
        if self.s.tool.compat_code_ok:
            self.traj.exec_pass = self._exec_pass
        self.traj.void_turns = self.void_turns
        self.traj.text = self.decode(self.traj.response_ids)
        self.traj.check()
        return self.traj

    def _retokenised(self) -> None:
        """Replace the sampled ids by ToRL's: encode(text + EOS text unless cut at the length limit), cut to the
        response budget, masked by ToRL's character rule. A re-encoded token keeps its sampling log-prob and version
        where it matches a sampled token in order (difflib's matching blocks over the ids); a token re-tokenising
        changed gets log-prob 0.0 and the version of the sampled token before it."""
        t = self.traj
        text = self._text + ("" if t.finish_reason == "length" else self._retok.eos_text)
        ids, offsets = self._retok.encode_offsets(text)
        ids, offsets = ids[: self.s.max_response_tokens], offsets[: self.s.max_response_tokens]
        mask = torl_token_mask(offsets, self._mask_ranges)
        rows = zip(t.response_ids, t.logprobs, t.versions, t.loss_mask, strict=True)
        sampled = [(i, lp, v) for i, lp, v, m in rows if m]
        matched: dict[int, int] = {}
        blocks = difflib.SequenceMatcher(None, [s[0] for s in sampled], ids, autojunk=False).get_matching_blocks()
        for b in blocks:
            matched.update({b.b + k: b.a + k for k in range(b.size)})
        logprobs, versions = [], []
        version = sampled[0][2] if sampled else -1
        for j, keep in enumerate(mask):
            if j in matched:
                _, lp, version = sampled[matched[j]]
            else:
                lp = 0.0
            logprobs.append(lp if keep else 0.0)
            versions.append(version if keep else -1)
        t.response_ids, t.loss_mask, t.logprobs, t.versions = ids, mask, logprobs, versions

    @property
    def stop_missed(self) -> bool:
        """The model wrote the stop string but no stop fired while calls were still allowed (tools silently dead)."""
        t = self.s.tool
        return t.enabled and self.requests == 0 and self.calls < t.max_calls and t.stop in self.traj.text


def filter_void_turns(trajs: Sequence[Trajectory]) -> float:
    """SimpleTIR's void-turn filter (arXiv 2509.02479, docs/void-turns.md): a trajectory with a void turn is left out
    of the policy update (its loss mask zeroed, as SimpleTIR zeroes its response mask in the policy loss) but keeps
    its reward in its group's advantage statistics. Returns the share of ``trajs`` dropped.

    >>> t = Trajectory("p", 0, [1], [5, 6], [0.0, 0.0], [1, 1], [0, 0], void_turns=1)
    >>> filter_void_turns([t]), t.loss_mask
    (1.0, [0, 0])
    """
    dropped = [t for t in trajs if t.void_turns]
    for t in dropped:
        t.loss_mask = [0] * len(t.loss_mask)
    return len(dropped) / len(trajs) if trajs else 0.0


@dataclass(frozen=True)
class TextDelta:
    """Model text as the engine streams it (vLLM holds a stop string back from the deltas)."""

    text: str


@dataclass(frozen=True)
class ToolStarted:
    """A round ended in a tool request; ``code`` goes to the sandbox now."""

    code: str


@dataclass(frozen=True)
class ToolFinished:
    """The call as the trajectory records it (``Trajectory.tool_calls[-1]``: formatted body, status, times)."""

    call: ToolCall


@dataclass(frozen=True)
class Observation:
    """The exact text spliced into the context after a call (loss mask 0)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Last event of a served trajectory; ``text`` is what the client sees (cut before a matched client stop)."""

    trajectory: Trajectory
    text: str


LoopEvent = TextDelta | ToolStarted | ToolFinished | Observation
StreamEvent = LoopEvent | Finished
GenerateFn = Callable[[ToolLoop, RoundRequest], Awaitable[RoundOutput]]
ToolFn = Callable[[ToolLoop, str], Awaitable[ExecResult]]
EventFn = Callable[[LoopEvent], Awaitable[None]]


async def run_async(
    loop: ToolLoop, generate: GenerateFn, run_tool: ToolFn, on_event: EventFn | None = None
) -> Trajectory:
    """Drive one trajectory to the end; awaiting the tool yields the engine to every other trajectory.

    The one driver of training, evaluation and serving. ``on_event`` (serving's stream) hears each tool call start
    and finish and each observation as it happens; text deltas come from ``generate`` itself, which owns the engine
    stream.
    """
    while (req := loop.next_request()) is not None:
        t0 = time.perf_counter()
        out = await generate(loop, req)
        code = loop.on_round(out, time.perf_counter() - t0)
        if code is None:
            continue
        if on_event is not None:
            await on_event(ToolStarted(code))
        t0 = time.perf_counter()
        result = await run_tool(loop, code)
        before = len(loop.traj.response_ids)
        loop.on_tool_result(result, time.perf_counter() - t0)
        if on_event is not None:
            await on_event(ToolFinished(loop.traj.tool_calls[-1]))
            await on_event(Observation(loop.decode(loop.traj.response_ids[before:])))
    return loop.result()


async def run_sync(loops: Sequence[ToolLoop], generate: GenerateFn, run_tool: ToolFn) -> list[Trajectory]:
    """ToRL's batch-synchronous rollout: every live trajectory generates a round, then all tools run, then repeat.

    Kept only to measure the async loop's gain (``rollout.mode=sync``): the slowest generation and the slowest tool
    call of each round hold up the whole batch.
    """
    while live := [(lp, req) for lp in loops if (req := lp.next_request()) is not None]:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(generate(lp, req) for lp, req in live))
        gen_s = time.perf_counter() - t0
        codes = [(lp, lp.on_round(out, gen_s)) for (lp, _), out in zip(live, outs, strict=True)]
        calls = [(lp, code) for lp, code in codes if code is not None]  # "" (an empty block) is a call too
        if calls:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(run_tool(lp, code) for lp, code in calls))
            wait_s = time.perf_counter() - t0
            for (lp, _), res in zip(calls, results, strict=True):
                lp.on_tool_result(res, wait_s)
    return [lp.result() for lp in loops]
