"""ChatSession never reprocesses its history: counted on a hybrid (Gated DeltaNet) model over
10 turns, and checked against a from-scratch computation after regenerate, edit, cancel."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TOKENIZER_DIR, build_reference, save_checkpoint
from scripted import ScriptedRuntime, scripted_llm

import mlxqwen
from mlxqwen import ContextLimitError, PrefillProgress, TextDelta, ThinkingDelta, ToolCall
from mlxqwen.chat_template import ChatTemplate
from mlxqwen.tokenizer import Tokenizer

REPLY = 6


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ref = build_reference("qwen3_5_text", vocab_size=151936)
    return mlxqwen.load(save_checkpoint(ref, tmp_path_factory.mktemp("hybrid")))


@pytest.fixture
def fed(llm, monkeypatch) -> list[int]:
    """Counts every token fed to the model (prefill chunks and decode steps)."""
    counter = [0]
    runtime = llm.runtime
    prefill, decode = runtime.prefill, runtime.decode

    def counting_prefill(seq, tokens):
        counter[0] += len(tokens)
        return prefill(seq, tokens)

    def counting_decode(seqs, tokens):
        counter[0] += tokens.size
        return decode(seqs, tokens)

    monkeypatch.setattr(runtime, "prefill", counting_prefill)
    monkeypatch.setattr(runtime, "decode", counting_decode)
    return counter


def turn_tokens(llm, message: str, first: bool, system: str | None = None) -> list[int]:
    """What the template appends for a user message after a reply cut by max_tokens."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    text = llm.tokenizer.chat_template.render(messages)
    return llm.tokenizer.encode(text if first else "<|im_end|>\n" + text[text.index("<|im_start|>user") :])


def reply_tokens(done) -> list[int]:
    return [t.token for t in done.logprobs]


def check_against_scratch(llm, chat, message: str) -> None:
    """The next reply from the session's cache equals a plain greedy loop over the same tokens
    computed from scratch in one pass."""
    done = chat.send(message, temperature=0, max_tokens=REPLY, logprobs=0)
    tokens = chat._tokens
    prompt = tokens[: len(tokens) - done.stats.generated_tokens]
    cache = llm.model.make_cache()
    logits = llm.model(mx.array([prompt]), cache=cache)[0, -1]
    expected, logprobs = [], []
    for _ in range(done.stats.generated_tokens):
        expected.append(int(mx.argmax(logits)))
        logprobs.append(float(logits[expected[-1]] - mx.logsumexp(logits)))
        logits = llm.model(mx.array([[expected[-1]]]), cache=cache)[0, -1]
    assert reply_tokens(done) == expected
    np.testing.assert_allclose([t.logprob for t in done.logprobs], logprobs, atol=1e-3)


def test_ten_turns_prefill_only_new_tokens(llm, fed):
    system = "You are a helpful assistant."
    chat = llm.chat(system=system, temperature=0, max_tokens=REPLY)
    naive = 0
    for turn in range(10):
        message = f"Question {turn}: what is {turn} plus {turn * 7}? Explain briefly."
        new = turn_tokens(llm, message, turn == 0, system)
        before, cached = fed[0], chat.tokens
        done = chat.send(message)
        assert (done.stats.cached_tokens, done.stats.prompt_tokens) == (cached, len(new))
        assert fed[0] - before == len(new) + REPLY
        assert chat._tokens[cached : cached + len(new)] == new
        naive += len(llm.tokenizer.encode(llm.prompt_text(chat.history[:-1]))) + REPLY
    assert fed[0] == chat.tokens  # every token of the conversation went through the model once
    assert len(chat.history) == 21 and chat.history[-1]["role"] == "assistant"
    assert naive > 3 * fed[0]
    check_against_scratch(llm, chat, "One more question.")


def test_thinking_of_earlier_turns_stays_in_the_cache(llm):
    chat = llm.chat(temperature=0, max_tokens=REPLY)
    first = chat.send("Hello")
    assert first.thinking and not first.text  # the template opened <think>; the reply stayed in it
    thinking_ids = llm.tokenizer.encode(first.thinking)
    chat.send("Again")
    rerender = llm.tokenizer.encode(llm.prompt_text(chat.history[:-1]))
    cached = chat._tokens
    # the template would drop the first reply's thinking; the cache keeps the reply as generated
    assert llm.tokenizer.decode(cached).count(first.thinking) == 1
    assert llm.tokenizer.decode(rerender).count(first.thinking) == 0
    assert len(thinking_ids) > 0


def test_regenerate_and_edit_last_roll_back(llm, fed):
    chat = llm.chat(temperature=0, max_tokens=REPLY)
    chat.send("First question")
    second = chat.send("Second question", logprobs=0)
    tokens = chat.tokens

    before = fed[0]
    again = chat.regenerate(logprobs=0)
    assert fed[0] - before == 1 + REPLY  # the prompt's last token, then the reply: nothing recomputed
    assert reply_tokens(again) == reply_tokens(second) and chat.tokens == tokens
    sampled = chat.regenerate(temperature=1.0, seed=5)
    assert chat.history[-1] == sampled.to_message() and len(chat.history) == 4
    check_against_scratch(llm, chat, "Third question")

    before = fed[0]
    chat.edit_last("A different third question")
    new = turn_tokens(llm, "A different third question", first=False)
    assert fed[0] - before == len(new) + REPLY
    assert [m["content"] for m in chat.history if m["role"] == "user"][-1] == "A different third question"
    assert len(chat.history) == 6
    check_against_scratch(llm, chat, "Fourth question")


def test_regenerate_with_another_thinking_setting(llm, fed):
    chat = llm.chat(temperature=0, max_tokens=REPLY)
    chat.send("First question")
    chat.send("Second question", think=True)
    before = fed[0]
    again = chat.regenerate(think=False)  # another generation prompt, after what it shares with the last
    assert fed[0] - before == again.stats.prompt_tokens + REPLY and again.stats.prompt_tokens > 1
    assert llm.tokenizer.decode(chat._tokens).count("<think>\n\n</think>") == 1
    assert not again.thinking and chat.history[-1] == again.to_message() and len(chat.history) == 4
    before = fed[0]
    assert chat.regenerate(think=False).stats.prompt_tokens == 1  # the same setting: nothing read again
    assert fed[0] - before == 1 + REPLY
    check_against_scratch(llm, chat, "Third question")


def test_cancel_keeps_the_session_consistent(llm, monkeypatch):
    chat = llm.chat(temperature=0)
    chat.send("Start", max_tokens=REPLY)

    seen = 0
    for event in chat.stream("Tell me a long story", max_tokens=200):
        if isinstance(event, (TextDelta, ThinkingDelta)):
            seen += 1
            if seen == 2:
                threading.Thread(target=chat.cancel).start()
    assert event.finish_reason == "cancelled" and event.stats.generated_tokens < 20
    assert chat.history[-1] == event.to_message() and chat.history[-2]["content"] == "Tell me a long story"
    check_against_scratch(llm, chat, "Shorter please")

    # stopped while the prompt is being read: the message is dropped, the cache rolled back
    history, tokens = chat.history, chat.tokens
    monkeypatch.setattr(llm.runtime, "prefill_chunk", 4)
    for event in chat.stream("A long message " * 8):
        if isinstance(event, PrefillProgress):
            chat.cancel()
    assert event.finish_reason == "cancelled" and event.stats.generated_tokens == 0
    assert chat.history == history and chat.tokens == tokens

    # the reader stops reading: the partial reply is kept
    events = chat.stream("Another one", max_tokens=50)
    for event in events:
        if isinstance(event, (TextDelta, ThinkingDelta)):
            break
    events.close()
    assert chat.history[-2]["content"] == "Another one" and chat.history[-1]["role"] == "assistant"
    check_against_scratch(llm, chat, "Go on")
    assert chat.regenerate(max_tokens=3).stats.generated_tokens == 3


def test_restored_history_and_limits(llm, monkeypatch, fed):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    chat = llm.chat(history=history, temperature=0, max_tokens=REPLY)
    chat.send("How are you?")
    full = llm.prompt_text(history + [{"role": "user", "content": "How are you?"}])
    assert fed[0] == len(llm.tokenizer.encode(full)) + REPLY == chat.tokens

    snapshot, tokens = chat.history, chat.tokens
    monkeypatch.setattr(llm.runtime, "max_context", tokens + 10)
    with pytest.raises(ContextLimitError):
        chat.send("This message is longer than ten tokens, surely it is.")
    assert chat.history == snapshot and chat.tokens == tokens
    chat.reset()
    assert chat.tokens == 0 and chat.history == []
    with pytest.raises(RuntimeError, match="send a message first"):
        chat.regenerate()


def scripted(template: str) -> ScriptedRuntime:
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    source = (TOKENIZER_DIR / "templates" / f"{template}.jinja").read_text()
    tokenizer.chat_template = ChatTemplate(source, {"eos_token": "<|im_end|>"})
    return ScriptedRuntime(tokenizer)


def test_cache_is_the_rendered_conversation_and_tool_calls(llm):
    backend = scripted("qwen2.5")
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"properties": {}}}}
    chat = scripted_llm(backend).chat(system="Be brief.", tools=[weather])
    backend.say("Hello! How can I help?")
    assert chat.send("Hi").finish_reason == "stop"
    backend.say('<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    done = chat.send("Weather in Oslo?")
    assert done.tool_calls == (ToolCall("weather", {"city": "Oslo"}),) and done.finish_reason == "tool_calls"
    backend.say("It is -3 in Oslo.")
    assert chat.send({"role": "tool", "content": "-3"}).text == "It is -3 in Oslo."
    assert chat.history[-2] == {"role": "tool", "content": "-3"}

    # each reply's EOS (<|im_end|>) is fed once; the cache holds the conversation exactly as
    # the template renders it (this template keeps replies as they are)
    rendered = backend.tokenizer.encode(
        backend.tokenizer.chat_template.render(chat.history, tools=[weather], add_generation_prompt=False)
    )
    assert chat._tokens == rendered[:-1]  # all but the final "\n"
    assert backend.fed == chat.tokens


def test_chat_needs_a_template():
    backend = scripted("qwen2.5")
    backend.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        scripted_llm(backend).chat()


def test_turns_in_different_threads(llm):
    """A UI may run each turn in a new worker thread: the cache must not hold lazy work tied
    to the previous thread's MLX stream."""
    chat = llm.chat()
    replies, errors = [], []

    def turn(message):
        try:
            replies.append(chat.send(message, max_tokens=3, temperature=0))
        except Exception as e:  # re-raised below, in the test's thread
            errors.append(e)

    for message in ("one", "two", "three"):
        worker = threading.Thread(target=turn, args=(message,))
        worker.start()
        worker.join()
    assert not errors and len(replies) == 3
