"""Request validation, error shapes and response builders of the OpenAI-compatible API (pure, no server)."""

import json

import pytest

from torl.rollout.sampling import SamplingOverrides
from torl.rollout.types import ToolCall
from torl.serving.openai_api import (
    APIError,
    ChoiceResult,
    ServeLimits,
    chat_response,
    chat_turns,
    check_api_key,
    check_context,
    completion_response,
    openai_finish_reason,
    parse_body,
    parse_chat,
    parse_completion,
    single_question,
    sse,
    stream_chunk,
    usage_chunk,
)

LIMITS = ServeLimits(
    model_name="tiny",
    max_model_len=512,
    max_tokens=256,
    default_tool_calls=1,
    max_tool_calls=4,
    max_n=4,
    max_request_bytes=10_000,
)


def chat(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "What is 1+1?"}], **kw}


def refused(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    err = info.value
    body = err.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert 400 <= err.status < 500 and err.message
    return err


def test_valid_chat_request_gets_openai_defaults_and_server_tool_budget():
    _, plan = parse_chat(chat(), LIMITS)
    assert (plan.temperature, plan.top_p, plan.top_k, plan.n, plan.stream) == (1.0, 1.0, -1, 1, False)
    assert plan.max_tool_calls == LIMITS.default_tool_calls
    assert plan.sampling(10, LIMITS).max_tokens == 256  # fills the context up to the server's max_tokens
    assert plan.sampling(10, LIMITS).seed is None
    _, plan = parse_chat(chat(max_tool_calls=3, temperature=0, max_tokens=5, seed=7, stop=None), LIMITS)
    assert plan.max_tool_calls == 3 and plan.temperature == 0.0
    assert plan.sampling(10, LIMITS) == SamplingOverrides(
        max_tokens=5, temperature=0.0, top_p=1.0, top_k=-1, stream=False, logprobs=False, seed=7,
    )  # fmt: skip


def test_client_stop_strings_reach_the_generator():
    _, plan = parse_chat(chat(stop="END"), LIMITS)
    assert plan.sampling(10, LIMITS).stop == ("END",)
    _, plan = parse_chat(chat(stop=["a", "b", "a"], stream=True), LIMITS)
    sampling = plan.sampling(10, LIMITS)
    assert sampling.stop == ("a", "b") and sampling.stream is True and sampling.logprobs is False
    _, plan = parse_chat(chat(stop=[]), LIMITS)
    assert plan.sampling(10, LIMITS).stop == ()


def test_max_completion_tokens_is_an_alias_and_wins():
    _, plan = parse_chat(chat(max_tokens=100, max_completion_tokens=7), LIMITS)
    assert plan.max_tokens == 7


@pytest.mark.parametrize(
    "body,param,status",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", 400),
        ({"model": "tiny"}, "messages", 400),
        ({"model": "tiny", "messages": []}, "messages", 400),
        (chat(model="gpt-4"), "model", 404),
        (chat(max_tokens=-1), "max_tokens", 400),
        (chat(max_tokens=0), "max_tokens", 400),
        (chat(max_tokens=10**12), "max_tokens", 400),
        (chat(max_tokens="10"), "max_tokens", 400),
        (chat(max_tokens=True), "max_tokens", 400),
        (chat(temperature=3), "temperature", 400),
        (chat(temperature="hot"), "temperature", 400),
        (chat(stream="yes"), "stream", 400),
        (chat(n=0), "n", 400),
        (chat(n=5), "n", 400),
        (chat(n=2, stream=True), "n", 400),
        (chat(max_tool_calls=5), "max_tool_calls", 400),
        (chat(max_tool_calls=-1), "max_tool_calls", 400),
        (chat(top_k=0), "top_k", 400),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", 400),
        (chat(stop=[""]), "stop", 400),
        (chat(stop=5), "stop", 400),
        (chat(tools=[{"type": "function"}]), "tools", 400),
        (chat(frequency_penalty=0.5), "frequency_penalty", 400),
        (chat(logprobs=True), "logprobs", 400),
        (chat(temprature=0.5), "temprature", 400),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", 400),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", 400),
        ({"model": "tiny", "messages": "hello"}, "messages", 400),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages",
            400,
        ),
    ],
)
def test_bad_chat_requests_are_4xx_naming_the_parameter(body, param, status):
    err = refused(parse_chat, body, LIMITS)
    assert err.param == param and err.status == status, (err.param, err.status, err.message)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": 3}, "prompt"),
        ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "tiny", "prompt": "a", "suffix": "z"}, "suffix"),
    ],
)
def test_bad_completion_requests(body, param):
    assert refused(parse_completion, body, LIMITS).param == param


def test_completion_accepts_single_prompt_list_and_echo():
    req, plan = parse_completion({"model": "tiny", "prompt": ["2+2="], "echo": True}, LIMITS)
    assert req.prompt == ["2+2="] and plan.echo


@pytest.mark.parametrize("raw", [b"", b"   ", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_body_must_be_a_json_object(raw):
    assert refused(parse_body, raw, LIMITS).code == "invalid_json"


def test_oversized_body_is_413():
    assert refused(parse_body, b"{" + b" " * 20_000 + b"}", LIMITS).status == 413


def test_context_length_checks():
    assert check_context(500, None, LIMITS) == 12
    assert check_context(10, 256, LIMITS) == 256
    assert refused(check_context, 512, None, LIMITS).code == "context_length_exceeded"
    assert refused(check_context, 300, 256, LIMITS).code == "context_length_exceeded"


def test_api_key():
    check_api_key(None, "")  # no key configured: open
    check_api_key("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer wrong"):
        err = refused(check_api_key, header, "s3cret")
        assert err.status == 401 and err.code == "invalid_api_key"


def test_base_template_takes_exactly_one_user_message():
    req, _ = parse_chat(
        {"model": "tiny", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]},
        LIMITS,
    )
    assert single_question(req) == "Q?"
    assert chat_turns(req) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]
    two = chat(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
        ]
    )
    req, _ = parse_chat(two, LIMITS)
    assert chat_turns(req)[-1] == {"role": "user", "content": "cd"}
    assert refused(single_question, req).param == "messages"
    req, _ = parse_chat(chat(messages=[{"role": "user", "content": "  "}]), LIMITS)
    assert refused(single_question, req).status == 400


def _choice() -> ChoiceResult:
    call = ToolCall(code="print(1+1)", observation="2", status="ok", exec_s=0.25, queue_s=0.5)
    text = "```python\nprint(1+1)\n```\n```output\n2\n```\nSo \\boxed{2}."
    return ChoiceResult(text=text, finish_reason="stop", completion_tokens=30, tool_calls=[call])


def test_chat_response_carries_text_answer_and_tool_calls():
    _, plan = parse_chat(chat(max_tool_calls=2), LIMITS)
    body = chat_response("chatcmpl-1", "tiny", [_choice()], prompt_tokens=12, plan=plan)
    json.dumps(body)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert "```output\n2\n```" in choice["message"]["content"]
    assert choice["torl"]["answer"] == "2" and choice["torl"]["max_tool_calls"] == 2
    assert choice["torl"]["tool_calls"] == [
        {"code": "print(1+1)", "output": "2", "status": "ok", "latency_s": 0.75, "exec_s": 0.25, "queue_s": 0.5}
    ]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}


def test_completion_response_echo_and_no_answer():
    _, plan = parse_completion({"model": "tiny", "prompt": "P:", "echo": True}, LIMITS)
    body = completion_response("cmpl-1", "tiny", [ChoiceResult("no box", "length", 3)], 2, plan, prompt="P:")
    assert body["choices"][0]["text"] == "P:no box" and body["choices"][0]["torl"]["answer"] is None
    assert body["choices"][0]["finish_reason"] == "length" and body["object"] == "text_completion"


def test_stream_chunks_and_sse():
    first = stream_chunk(True, "c", "tiny", text="", role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    end = stream_chunk(True, "c", "tiny", finish_reason="stop", torl={"answer": "2"})
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["torl"] == {"answer": "2"}
    text = stream_chunk(False, "c", "tiny", text="abc")
    assert text["choices"][0]["text"] == "abc" and text["object"] == "text_completion"
    assert usage_chunk(True, "c", "tiny", 3, 4)["usage"]["total_tokens"] == 7
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(sse(text)[len("data: ") :]) == text


def test_finish_reason_mapping():
    assert [openai_finish_reason(r) for r in ("eos", "stop", "length", "abort")] == ["stop", "stop", "length", "abort"]
