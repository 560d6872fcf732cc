"""The OpenAI-compatible HTTP surface of the served model: request schemas, validation, errors and response shapes.

Pure logic for ``actors/serve.py``: parse and check a request body against the server's limits (``ServeLimits``),
turn it into a ``GenerationPlan`` (sampling overrides + tool budget), and build OpenAI-shaped responses, stream
chunks and errors. Every bad input becomes an ``APIError`` that renders as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, never a 500. Client ``stop`` strings
are honoured (generation ends before the first one) alongside the tool loop's own stop string.

Beyond OpenAI: ``max_tool_calls`` in the request (the tool budget, capped by the server) and a ``torl`` field on each
choice carrying the extracted boxed answer and every tool call (code, output, status, latency). OpenAI clients ignore
it; it is readable as ``choice.model_extra["torl"]`` in the official Python client.

Not here: tokenization and prompt templates (``torl.data.prompts``), the tool loop itself (``actors/generator.py``),
HTTP plumbing (``actors/serve.py``).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from torl.rl.grading import extract_boxed
from torl.rollout.sampling import SamplingOverrides
from torl.rollout.types import ToolCall

# ---------------------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """A request the server refuses, rendered in OpenAI's error shape with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def check_api_key(authorization: str | None, expected: str) -> None:
    """Raise a 401 unless ``authorization`` is ``Bearer <expected>``; no check when ``expected`` is empty."""
    if not expected:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    # Constant-time comparison so response timing does not leak the key prefix.
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


# ---------------------------------------------------------------------------------------------------------------
# Request schemas. Unknown fields are rejected (as OpenAI does) so a typo never silently changes sampling.


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the chat API's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None  # vLLM extension; -1 or None = off
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # Accepted for client compatibility, honoured only at their neutral values (checked in ``_plan``).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    # torl extension: how many code blocks may run in this request (0 = plain generation).
    max_tool_calls: int | None = Field(default=None, ge=0)


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Any = None  # OpenAI function calling: not supported (the interpreter is the tool), rejected if set
    tool_choice: Any = None
    response_format: Any = None


# ---------------------------------------------------------------------------------------------------------------
# Validation against server limits


@dataclass(frozen=True)
class ServeLimits:
    """What the server allows; built once from the config by the deployment."""

    model_name: str
    max_model_len: int  # engine context (prompt + response tokens)
    max_tokens: int  # largest max_tokens a request may ask for (and the default when it asks for none)
    default_tool_calls: int  # tool budget when the request sets none (ToRL's c)
    max_tool_calls: int  # server-side cap on the per-request budget
    max_n: int  # choices per request
    max_request_bytes: int  # bodies larger than this get a 413


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request, reduced to what the tool loop needs (prompt rendering happens in the deployment)."""

    max_tokens: int | None  # None = fill the context (checked against the prompt length in ``check_context``)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    max_tool_calls: int
    stream: bool
    include_usage: bool
    echo: bool = False
    stop: tuple[str, ...] = ()  # client stop strings (OpenAI: generation ends before the first one)

    def sampling(self, prompt_tokens: int, limits: ServeLimits) -> SamplingOverrides:
        """The trajectory's sampling: these overrides, ``max_tokens`` resolved against the prompt length, the client's
        stop strings, and what the engine must report (token deltas only when streaming; never logprobs, which this
        server does not return: both cost the engine per-token work)."""
        return SamplingOverrides(
            max_tokens=check_context(prompt_tokens, self.max_tokens, limits),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stream=self.stream,
            logprobs=False,
            stop=self.stop,
        )


_ERROR_TYPES = {
    "missing": "is required",
    "extra_forbidden": "is not a supported parameter",
}


def _validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI 400 naming the parameter (e.g. ``messages[0].role``)."""
    err = exc.errors()[0]
    param = ""
    for part in err["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in ("str", "list[str]", "list[_TextPart]", "int", "float", "bool") or "[" in str(part):
            continue  # union branch names pydantic adds to the location
        else:
            param += ("." if param else "") + str(part)
    reason = _ERROR_TYPES.get(err["type"], err["msg"])
    got = "" if err["type"] in ("missing",) else f" (got {json.dumps(err.get('input'), default=str)[:80]})"
    return APIError(400, f"'{param}' {reason}{got}", param=param or None, code=err["type"])


def parse_body(raw: bytes, limits: ServeLimits) -> dict[str, Any]:
    """Decode a JSON object body, or raise a 4xx."""
    if len(raw) > limits.max_request_bytes:
        raise APIError(413, f"Request body of {len(raw)} bytes exceeds the limit of {limits.max_request_bytes}.")
    if not raw.strip():
        raise APIError(400, "Request body is empty; expected a JSON object.", code="invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
    return data


def parse_completion(data: dict[str, Any], limits: ServeLimits) -> tuple[CompletionRequest, GenerationPlan]:
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise APIError(400, "Only a single prompt per request is supported.", param="prompt")
    if req.suffix:
        raise APIError(400, "'suffix' is not supported.", param="suffix")
    return req, _plan(req, limits, echo=req.echo)


def parse_chat(data: dict[str, Any], limits: ServeLimits) -> tuple[ChatCompletionRequest, GenerationPlan]:
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    for name in ("tools", "tool_choice", "response_format"):
        if getattr(req, name) is not None:
            raise APIError(400, f"'{name}' is not supported: the Python interpreter is the only tool.", param=name)
    if req.messages[-1].role != "user":
        raise APIError(400, "The last message must come from the user.", param="messages")
    return req, _plan(req, limits)


def _plan(req: _Request, limits: ServeLimits, echo: bool = False) -> GenerationPlan:
    if req.model != limits.model_name:
        raise APIError(
            404, f"The model '{req.model}' does not exist; this server serves '{limits.model_name}'.",
            param="model", code="model_not_found",
        )  # fmt: skip
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"'{param}' must be between 1 and {limits.max_tokens}, got {max_tokens}.", param=param)
    if req.n > limits.max_n:
        raise APIError(400, f"'n' must be at most {limits.max_n}, got {req.n}.", param="n")
    if req.stream and req.n != 1:
        raise APIError(400, "Streaming supports n=1 only.", param="n")
    if req.max_tool_calls is not None and req.max_tool_calls > limits.max_tool_calls:
        raise APIError(
            400, f"'max_tool_calls' must be at most {limits.max_tool_calls}, got {req.max_tool_calls}.",
            param="max_tool_calls",
        )  # fmt: skip
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(400, f"'{name}' is not supported (only 0).", param=name)
    if req.logprobs not in (None, False, 0) or req.logit_bias:
        raise APIError(400, "'logprobs' and 'logit_bias' are not supported.", param="logprobs")
    if req.top_k is not None and (req.top_k == 0 or req.top_k < -1):
        raise APIError(400, f"'top_k' must be -1 (off) or >= 1, got {req.top_k}.", param="top_k")
    stop = _stop_strings(req.stop)
    include_usage = bool((req.stream_options or {}).get("include_usage", False))
    return GenerationPlan(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's defaults
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        n=req.n,
        max_tool_calls=limits.default_tool_calls if req.max_tool_calls is None else req.max_tool_calls,
        stream=req.stream,
        include_usage=include_usage,
        echo=echo,
        stop=stop,
    )


MAX_STOP = 4  # OpenAI's limit on stop sequences per request


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """The client's stop strings (a string or a list of up to 4), each non-empty; they apply alongside the tool loop's
    own stop string, which wins when both match while tool calls remain."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}.", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "'stop' strings must be non-empty.", param="stop")
    return tuple(dict.fromkeys(stops))


def check_context(prompt_tokens: int, max_tokens: int | None, limits: ServeLimits) -> int:
    """The response token budget for a prompt of ``prompt_tokens``; 400 if the prompt leaves no room for it.

    Without an explicit ``max_tokens`` the budget is what fits in the context, up to the server's ``max_tokens``.
    """
    room = limits.max_model_len - prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise APIError(
                400, f"The prompt is {prompt_tokens} tokens; this model's context is {limits.max_model_len} tokens.",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip
        return min(room, limits.max_tokens)
    if max_tokens > room:
        raise APIError(
            400, f"This model's maximum context length is {limits.max_model_len} tokens; the prompt has "
            f"{prompt_tokens} tokens and max_tokens asks for {max_tokens}.",
            param="max_tokens", code="context_length_exceeded",
        )  # fmt: skip
    return max_tokens


def chat_turns(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as plain ``{"role", "content"}`` dicts for a chat template (developer counts as system)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


def single_question(req: ChatCompletionRequest) -> str:
    """The question for a single-turn base-model template (ToRL's ``tir_base_*``): exactly one user message.

    ToRL's template has one ``{QUESTION}`` slot and ignores the dataset's system message
    (docs/torl-behaviour.md ("Prompt template")), so system messages are ignored here too; a multi-turn conversation
    cannot be expressed and is refused.
    """
    users = [m for m in req.messages if m.role == "user"]
    if len(users) != 1 or any(m.role == "assistant" for m in req.messages):
        raise APIError(
            400, "This model uses a single-turn base template: send exactly one user message (and no assistant "
            "turns).", param="messages",
        )  # fmt: skip
    question = users[0].text()
    if not question.strip():
        raise APIError(400, "The user message is empty.", param="messages[0].content")
    return question


# ---------------------------------------------------------------------------------------------------------------
# Responses


@dataclass
class ChoiceResult:
    """One finished choice: the response text (tool outputs included) and what the tool loop did."""

    text: str
    finish_reason: str  # "stop" or "length" (OpenAI's words), "abort" if the engine aborted
    completion_tokens: int
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def answer(self) -> str | None:
        return extract_boxed(self.text)


def openai_finish_reason(reason: str) -> str:
    """Trajectory finish reasons -> OpenAI's: eos and a client stop string are both "stop"."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "code": call.code,
        "output": call.observation,
        "status": call.status,
        "latency_s": round(call.exec_s + call.queue_s, 6),
        "exec_s": round(call.exec_s, 6),
        "queue_s": round(call.queue_s, 6),
    }


def torl_extra(answer: str | None, tool_calls: list[ToolCall], max_tool_calls: int) -> dict[str, Any]:
    """The extension object carried on each choice as ``torl``."""
    return {
        "answer": answer,
        "tool_calls": [tool_call_json(c) for c in tool_calls],
        "max_tool_calls": max_tool_calls,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    req_id: str, model: str, choices: list[ChoiceResult], prompt_tokens: int, plan: GenerationPlan, prompt: str = ""
) -> dict[str, Any]:
    return {
        "id": req_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": (prompt if plan.echo else "") + c.text,
                "finish_reason": c.finish_reason,
                "logprobs": None,
                "torl": torl_extra(c.answer, c.tool_calls, plan.max_tool_calls),
            }
            for i, c in enumerate(choices)
        ],
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def chat_response(
    req_id: str, model: str, choices: list[ChoiceResult], prompt_tokens: int, plan: GenerationPlan
) -> dict[str, Any]:
    return {
        "id": req_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
                "torl": torl_extra(c.answer, c.tool_calls, plan.max_tool_calls),
            }
            for i, c in enumerate(choices)
        ],
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def stream_chunk(
    chat: bool,
    req_id: str,
    model: str,
    text: str | None = None,
    finish_reason: str | None = None,
    torl: dict[str, Any] | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One streamed chunk (single choice): a text delta, a tool event (``torl``), or the closing finish reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if torl is not None:
        choice["torl"] = torl
    return {
        "id": req_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(chat: bool, req_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The final chunk when ``stream_options.include_usage`` is set: no choices, only usage (as OpenAI sends)."""
    return {
        "id": req_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event line; ``"[DONE]"`` ends the stream."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def models_response(model: str, created: int, root: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "torl", "root": root}],
    }
