"""`mlxqwen serve`'s three dialects, driven by the official `ollama`, `openai` and `anthropic`
clients and raw HTTP against a real server process. The model is a parrot (tests/parrot.py)
that says exactly what it is told, so every reply, thinking block and tool call is known."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from serving import running

PARROT = str(Path(__file__).parent / "parrot.py")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("parrot") / "server.log"
    with running([sys.executable, PARROT, "{port}"], log) as server:
        yield server


@pytest.fixture(scope="module")
def ollama_client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def anthropic_client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- Ollama -----------------------------------------------------------------------------


def test_ollama_chat_streamed_and_not(ollama_client):
    reply = ollama_client.chat(model="parrot", messages=user("say: Hello there"), think=False)
    assert reply.message.content == "Hello there" and not reply.message.thinking
    assert reply.done and reply.done_reason == "stop" and reply.eval_count == 3
    assert reply.prompt_eval_count > 0 and reply.total_duration >= reply.eval_duration > 0
    chunks = list(ollama_client.chat(model="parrot", messages=user("say: Hello there"), think=False, stream=True))
    assert "".join(c.message.content for c in chunks) == "Hello there"
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].done_reason == "stop" and chunks[-1].eval_count == 3


def test_ollama_thinking_apart_and_levels(ollama_client):
    reply = ollama_client.chat(model="parrot", messages=user("say: Two and two.\n</think>\n\nFour."), think=True)
    assert (reply.message.thinking, reply.message.content) == ("Two and two.", "Four.")
    low = ollama_client.chat(model="parrot-levels", messages=user("say the prompt"), think="low")
    assert "Reasoning effort: low" in low.message.thinking
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="parrot-levels", messages=user("say the prompt"), think="high")
    assert e.value.status_code == 400 and "thinking levels are low, medium, xhigh" in e.value.error
    # a model that thinks only on or off takes any level as on
    on = ollama_client.chat(model="parrot", messages=user("say the prompt"), think="high")
    assert on.message.thinking == "<think>"  # the parrot repeats the <think> that the template opened


def test_ollama_tools_and_tool_messages(ollama_client):
    reply = ollama_client.chat(model="parrot", messages=user(f"say: {CALL}"), tools=[WEATHER], think=False)
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    history = [
        *user(f"say: {CALL}"),
        {"role": "assistant", "content": "", "tool_calls": [{"function": call.function.model_dump()}]},
        {"role": "tool", "content": '{"celsius": 21}', "tool_name": "get_weather"},
        *user("say: 21 °C in Paris."),
    ]
    after = ollama_client.chat(model="parrot", messages=history, tools=[WEATHER], think=False)
    assert after.message.content == "21 °C in Paris."


def test_ollama_generate_options_raw_and_errors(ollama_client):
    assert ollama_client.generate(model="parrot", prompt="say: abc def", think=False).response == "abc def"
    raw = ollama_client.generate(model="parrot", prompt="say: raw!<|im_end|>", raw=True)
    assert raw.response == "raw!"
    cut = ollama_client.generate(model="parrot", prompt="say: one two three four", options={"num_predict": 2})
    assert cut.done_reason == "length" and cut.eval_count == 2
    stopped = ollama_client.generate(
        model="parrot", prompt="say: one two three", think=False, options={"stop": [" two"]}
    )
    assert stopped.response == "one"
    parts = list(ollama_client.generate(model="parrot:latest", prompt="say: streamed", think=False, stream=True))
    assert "".join(p.response for p in parts) == "streamed" and parts[-1].done
    for bad, status, words in [
        (dict(model="nope", prompt="x"), 404, "not found"),
        (dict(model="parrot", prompt="x", images=[b"\x89PNG"]), 400, "does not take images"),
        (dict(model="parrot", prompt="x", options={"temperature": "hot"}), 400, "options.temperature"),
        (dict(model="parrot", prompt="x", options={"top_p": 7}), 400, "top_p"),
        (dict(model="parrot", prompt="x", options={"num_ctx": 8}), 400, "over options.num_ctx=8"),
        (dict(model="parrot", prompt="x", format={"type": "nonsense"}), 400, "unusable JSON schema"),
    ]:
        with pytest.raises(ollama.ResponseError) as e:
            ollama_client.generate(**bad)
        assert e.value.status_code == status and words in e.value.error


def test_ollama_models_show_ps_version_keep_alive(ollama_client, server):
    names = {m.model for m in ollama_client.list().models}
    assert names == {"parrot", "parrot-levels"}
    shown = ollama_client.show("parrot")
    assert "enable_thinking" in shown.template and {"completion", "tools", "thinking"} <= set(shown.capabilities)
    ollama_client.generate(model="parrot-levels", prompt="say: hi", keep_alive="10m")
    (entry,) = [m for m in ollama_client.ps().models if m.model == "parrot-levels"]
    assert entry.expires_at is not None
    assert httpx.get(f"{server.url}/api/version").json()["version"]
    ollama_client.generate(model="parrot-levels", keep_alive=0)  # no prompt, keep_alive 0: unload
    assert "parrot-levels" not in {m.model for m in ollama_client.ps().models}


def test_ollama_pull_and_delete_stay_inside_the_library(server):
    for name in ("../../etc/passwd", "/tmp", str(Path(__file__).parent)):
        r = httpx.post(f"{server.url}/api/pull", json={"model": name})
        assert r.status_code == 400 and "never a path" in r.json()["error"]
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "parrot"})
    assert r.status_code == 403 and "only models in mlxqwen's library" in r.json()["error"]
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "../parrot"})
    assert r.status_code == 404


def test_disconnect_cancels_the_generation(server):
    """A client that leaves mid-reply stops it: the model (keep_alive 0) unloads as soon as its
    generation ends, long before the 1,000-token reply would have."""
    body = {"model": "parrot", "prompt": "say: " + "go " * 1000, "keep_alive": 0, "think": False}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=30) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 5  # the reply alone takes 10 s
    while "parrot" in [m["model"] for m in httpx.get(f"{server.url}/api/ps").json()["models"]]:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.1)


# --- OpenAI -----------------------------------------------------------------------------


def test_openai_chat_streamed_and_not(openai_client):
    done = openai_client.chat.completions.create(
        model="parrot", messages=user("say: Think.\n</think>\n\nHello!"), seed=3, stop=["zzz"]
    )
    choice = done.choices[0]
    assert choice.message.content == "Hello!" and choice.message.reasoning_content == "Think."
    assert choice.finish_reason == "stop" and done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0
    chunks = list(
        openai_client.chat.completions.create(
            model="parrot",
            messages=user("say: Think.\n</think>\n\nHello!"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Hello!"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Think."
    assert chunks[-1].usage.total_tokens == done.usage.total_tokens and not chunks[-1].choices


def test_openai_tool_calls_streamed_and_not(openai_client):
    messages = user(f"say: {CALL}")
    no_thinking = {"reasoning_effort": "none"}
    done = openai_client.chat.completions.create(model="parrot", messages=messages, tools=[WEATHER], **no_thinking)
    (call,) = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(
        openai_client.chat.completions.create(
            model="parrot", messages=messages, tools=[WEATHER], stream=True, **no_thinking
        )
    )
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
        *user("say: 21 °C."),
    ]
    after = openai_client.chat.completions.create(model="parrot", messages=history, tools=[WEATHER], **no_thinking)
    assert after.choices[0].message.content == "21 °C."


def test_openai_reasoning_effort_logprobs_and_errors(openai_client):
    low = openai_client.chat.completions.create(
        model="parrot-levels", messages=user("say the prompt"), reasoning_effort="low"
    )
    assert "Reasoning effort: low" in low.choices[0].message.reasoning_content
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="parrot-levels", messages=user("x"), reasoning_effort="high")
    assert "low, medium, xhigh" in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    off = openai_client.chat.completions.create(
        model="parrot", messages=user("say the prompt"), reasoning_effort="none"
    )
    assert off.choices[0].message.content == ""  # thinking off: the prompt closed an empty <think>
    scored = openai_client.chat.completions.create(
        model="parrot", messages=user("say: a b"), logprobs=True, top_logprobs=2, reasoning_effort="none"
    )
    entries = scored.choices[0].logprobs.content
    assert "".join(e.token for e in entries[:-1]) == "a b" and all(len(e.top_logprobs) == 2 for e in entries)
    assert entries[0].logprob > -1e-3  # the parrot is sure
    with pytest.raises(openai.BadRequestError, match="n=1"):
        openai_client.chat.completions.create(model="parrot", messages=user("x"), n=2)
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="missing", messages=user("x"))
    assert e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="image_url"):
        image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
        openai_client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": image}])


def test_openai_completions_and_models(openai_client):
    done = openai_client.completions.create(model="parrot", prompt="say: plain<|im_end|>", max_tokens=10)
    assert done.choices[0].text == "plain" and done.choices[0].finish_reason == "stop"
    parts = list(openai_client.completions.create(model="parrot", prompt="say: plain<|im_end|>", stream=True))
    assert "".join(p.choices[0].text for p in parts) == "plain"
    assert {m.id for m in openai_client.models.list()} == {"parrot", "parrot-levels"}
    assert openai_client.models.retrieve("parrot").id == "parrot"


# --- Anthropic ----------------------------------------------------------------------------


def test_anthropic_messages_with_thinking_budget(anthropic_client):
    reply = anthropic_client.messages.create(
        model="parrot", max_tokens=100, system="Be brief.", messages=user("say: Hmm.\n</think>\n\nYes.")
    )
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert (reply.content[0].thinking, reply.content[1].text) == ("Hmm.", "Yes.")
    assert reply.stop_reason == "end_turn" and reply.usage.output_tokens > 0 and reply.usage.input_tokens > 0
    for budget, level in [(1024, "low"), (8000, "medium"), (32000, "xhigh")]:
        thinking = {"type": "enabled", "budget_tokens": budget}
        r = anthropic_client.messages.create(
            model="parrot-levels", max_tokens=100, thinking=thinking, messages=user("say the prompt")
        )
        assert f"Reasoning effort: {level}" in r.content[0].thinking
    off = anthropic_client.messages.create(
        model="parrot", max_tokens=100, thinking={"type": "disabled"}, messages=user("say: Plain.")
    )
    assert [(b.type, b.text) for b in off.content] == [("text", "Plain.")]
    short = anthropic_client.messages.create(model="parrot", max_tokens=2, messages=user("say: a b c d e"))
    assert short.stop_reason == "max_tokens"


def test_anthropic_tool_use_and_results(anthropic_client):
    tool = {"name": "get_weather", "description": "Weather.", "input_schema": WEATHER["function"]["parameters"]}
    reply = anthropic_client.messages.create(
        model="parrot", max_tokens=200, tools=[tool], thinking={"type": "disabled"}, messages=user(f"say: {CALL}")
    )
    (use,) = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and (use.name, use.input) == ("get_weather", {"city": "Paris"})
    history = [
        *user(f"say: {CALL}"),
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 °C"}]},
        {"role": "assistant", "content": "Noted."},
        *user("say: It is 21 °C."),
    ]
    after = anthropic_client.messages.create(
        model="parrot", max_tokens=100, tools=[tool], thinking={"type": "disabled"}, messages=history
    )
    assert after.content[-1].text == "It is 21 °C."


def test_anthropic_streaming_event_sequence(anthropic_client):
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    with anthropic_client.messages.stream(
        model="parrot", max_tokens=300, tools=[tool], messages=user(f"say: Look.\n</think>\n\nOne moment.\n\n{CALL}")
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "Look." and final.content[1].text == "One moment."
    assert final.content[2].input == {"city": "Paris"} and final.stop_reason == "tool_use"


def test_anthropic_errors_in_its_shape(anthropic_client):
    with pytest.raises(anthropic.NotFoundError) as e:
        anthropic_client.messages.create(model="missing", max_tokens=5, messages=user("x"))
    assert e.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": e.value.body["error"]["message"]},
    }
    with pytest.raises(anthropic.BadRequestError, match="image blocks"):
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
        anthropic_client.messages.create(model="parrot", max_tokens=5, messages=[{"role": "user", "content": [image]}])


# --- safety over raw HTTP ---------------------------------------------------------------------


def test_prompt_over_the_context_is_a_400_with_the_numbers(server):
    long = "say: " + "word " * 5000
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "parrot", "messages": user(long)})
    assert r.status_code == 400 and "5012 tokens, and the maximum context is 4096" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/api/generate", json={"model": "parrot", "prompt": long, "stream": True})
    assert r.status_code == 400 and "maximum context" in r.json()["error"]


def test_cors_allows_localhost_origins_only(server):
    def preflight(origin: str) -> httpx.Response:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        return httpx.options(f"{server.url}/v1/chat/completions", headers=headers)

    assert preflight("http://localhost:3000").headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_bad_bodies_and_unknown_paths_in_each_dialect(server):
    r = httpx.post(f"{server.url}/api/chat", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "parrot", "messages": user("x")})
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: required"
    assert httpx.get(f"{server.url}/api/nothing").json() == {"error": "Not Found"}


def test_one_log_line_per_request_without_prompt_text(server, ollama_client):
    ollama_client.generate(model="parrot", prompt="say: secret words", think=False)
    time.sleep(0.2)
    lines = [line for line in server.log_text().splitlines() if "POST /api/generate" in line]
    assert "model=parrot tokens=" in lines[-1] and "+3 " in lines[-1] and "status=200" in lines[-1]
    assert "secret" not in server.log_text()


def test_json_schema_is_enforced_in_every_dialect(ollama_client, openai_client):
    """The parrot is told to write no JSON at all: only the engine's constrained sampling makes it valid."""
    said = ollama_client.chat(model="parrot", messages=user("say: no JSON here"), format=SCHEMA, think=False)
    jsonschema.validate(json.loads(said.message.content), SCHEMA)
    done = openai_client.chat.completions.create(
        model="parrot",
        messages=user("say: no JSON here"),
        reasoning_effort="none",
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(done.choices[0].message.content), SCHEMA)
    # JSON mode: what follows a complete object is cut (the parrot would go on with words)
    anything = ollama_client.generate(model="parrot", prompt='say: {"a":1} and more words', format="json", think=False)
    assert json.loads(anything.response) == {"a": 1}


def test_keep_alive_durations():
    from mlxqwen.server.errors import APIError
    from mlxqwen.server.requests import duration

    cases = {"5m": 300, "1h30m": 5400, "0": 0, "90": 90, "2.5s": 2.5, "-1": None, "-5m": None, 30: 30, -1: None}
    for value, seconds in cases.items():
        assert duration(value, 7) == seconds
    assert duration(None, 7) == 7
    for bad in ("soon", "5 minutes", True, [1]):
        with pytest.raises(APIError, match="keep_alive: .* is not a duration"):
            duration(bad, 7)
