"""Thinking / answer / tool-call events from scripted output streams: real tokens of the Qwen
tokenizer, single characters and every two-piece split, so tags arrive split across pieces."""

from __future__ import annotations

import pytest
from checkpoints import TOKENIZER_DIR

from mlxqwen.events import TextDelta, ThinkingDelta, ToolCall
from mlxqwen.parsing import OutputParser, opens_thinking, parse_tool_call
from mlxqwen.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": ["string", "null"]},
                    "options": {"type": "object"},
                },
            },
        },
    }
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


def merged(events) -> list:
    """Consecutive deltas of one kind joined, so that streams split differently compare equal."""
    out: list = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (TextDelta, ThinkingDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out


def parse(pieces, thinking=False, tools=TOOLS) -> list:
    parser = OutputParser(thinking=thinking, tools=tools)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    assert all(e.text for e in events if isinstance(e, (TextDelta, ThinkingDelta)))
    return merged(events)


def splits(text: str, tok: Tokenizer):
    """The text as the model's tokens, as characters, and cut in two at every position."""
    detok = tok.detokenizer()
    yield [detok.add(i) for i in tok.encode(text)] + [detok.flush()]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


CASES = [
    (
        "thinking opened by the prompt",
        True,
        "Let me think.\nStep 1 </thought> is <b>bold</b>.\n</think>\n\nThe answer is 4.",
        [ThinkingDelta("Let me think.\nStep 1 </thought> is <b>bold</b>."), TextDelta("The answer is 4.")],
    ),
    (
        "thinking emitted by the model",
        False,
        "<think>\nhmm\n</think>\n\nHi <think> stays text",
        [ThinkingDelta("hmm"), TextDelta("Hi <think> stays text")],
    ),
    (
        "no thinking",
        False,
        "  Plain answer with a < sign and <tool_ca text.\n",
        [TextDelta("Plain answer with a < sign and <tool_ca text.")],
    ),
    (
        "unfinished thinking",
        True,
        "still thinking <",
        [ThinkingDelta("still thinking <")],
    ),
    (
        "XML tool call (Qwen3.5/3.6, Qwen3-Coder)",
        True,
        "I need the weather.\n</think>\n\nChecking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan"
        " José\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=units>\n7\n</parameter>\n"
        '<parameter=options>\n{"a": [1, 2]}\n</parameter>\n</function>\n</tool_call>',
        [
            ThinkingDelta("I need the weather."),
            TextDelta("Checking."),
            ToolCall("get_weather", {"city": "San José", "days": 3, "units": "7", "options": {"a": [1, 2]}}),
        ],
    ),
    (
        "JSON tool calls (Qwen2.5/Qwen3)",
        False,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
        [ToolCall("get_weather", {"city": "Paris", "days": 2}), ToolCall("get_weather", {"city": "Rome"})],
    ),
    (
        "malformed calls come back as written, with the spaces around them",
        False,
        'Let me check. <tool_call>\n{"name": broken}\n</tool_call>  Done.\n\n<tool_call>{"name": "f"}</tool_call>'
        " Then\n <tool_call>\n{oops ",
        [
            TextDelta('Let me check. <tool_call>\n{"name": broken}\n</tool_call>  Done.'),
            ToolCall("f", {}),
            TextDelta("Then\n <tool_call>\n{oops "),
        ],
    ),
    (
        "malformed calls come back as text",
        False,
        'A<tool_call>\n{"name": broken}\n</tool_call>B<tool_call><function=f><oops></function></tool_call>'
        '<tool_call>\n{"name": "f"',
        [
            TextDelta("A"),
            TextDelta('<tool_call>\n{"name": broken}\n</tool_call>'),
            TextDelta("B"),
            TextDelta("<tool_call><function=f><oops></function></tool_call>"),
            TextDelta('<tool_call>\n{"name": "f"'),
        ],
    ),
]


@pytest.mark.parametrize("name,thinking,text,expected", CASES, ids=[c[0] for c in CASES])
def test_events_whatever_the_split(tok, name, thinking, text, expected):
    for pieces in splits(text, tok):
        assert parse(pieces, thinking) == merged(expected), pieces


def test_tags_are_split_across_real_tokens(tok):
    # "</think>" typed as text (not the added token) is several BPE tokens
    ids = tok.encode("x</think>y")
    assert tok.token_to_id("</think>") in ids
    plain = [i for t in ("x", "</", "think", ">", "y") for i in tok.encode(t)]
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in plain] + [detok.flush()]
    assert "</think>" not in pieces
    assert parse(pieces, thinking=True) == [ThinkingDelta("x"), TextDelta("y")]


def test_xml_values_without_schema_stay_text():
    call = parse_tool_call("<function=run>\n<parameter=n>\n42\n</parameter>\n</function>")
    assert call == ToolCall("run", {"n": "42"})
    assert call.to_message() == {"type": "function", "function": {"name": "run", "arguments": {"n": "42"}}}
    assert parse_tool_call("<function=run>\n</function>") == ToolCall("run", {})
    assert parse_tool_call('{"name": "f", "arguments": [1]}') is None
    assert parse_tool_call("nothing") is None


def test_opens_thinking():
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_thinking("<|im_start|>assistant\n")
