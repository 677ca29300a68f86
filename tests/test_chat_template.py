"""Chat templates render exactly as transformers' `apply_chat_template` for the real Qwen templates,
load from every place a checkpoint keeps them, and run sandboxed."""

from __future__ import annotations

import json
import re
import shutil

import jinja2
import pytest
from checkpoints import TOKENIZER_DIR

from mlxqwen import ModelLoadError
from mlxqwen.chat_template import ChatTemplate
from mlxqwen.errors import ChatTemplateError
from mlxqwen.tokenizer import Tokenizer

TEMPLATES = {
    "qwen3.5": TOKENIZER_DIR / "chat_template.jinja",
    **{p.stem: p for p in sorted((TOKENIZER_DIR / "templates").glob("*.jinja"))},
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "Hi there! ¿Qué tal? 你好"}],
    "multi-turn with reasoning": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks"},
    ],
    "tool calls and results": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 25}'},
        {"role": "assistant", "content": "Paris 21°, Rome 25°."},
        {"role": "user", "content": "Great"},
    ],
    "pending tool result": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "-3"},
    ],
    "content parts": [
        {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this."}]}
    ],
    "no user message": [{"role": "system", "content": "Alone."}],
}

VARIANTS = {
    "generation prompt": dict(add_generation_prompt=True),
    "no generation prompt": dict(add_generation_prompt=False),
    "thinking off": dict(add_generation_prompt=True, enable_thinking=False),
    "thinking on": dict(add_generation_prompt=True, enable_thinking=True),
    "tools": dict(add_generation_prompt=True, tools=[WEATHER]),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def render_both(hf_tokenizer, source: str, messages, kwargs):
    def run(fn):
        try:
            return fn()
        except Exception as e:  # the same failure on both sides (a template may reject a conversation)
            return ("error", type(e.__cause__ or e).__name__)

    theirs = run(lambda: hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs))
    ours = run(
        lambda: ChatTemplate(source, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}).render(
            messages, **kwargs
        )
    )
    return ours, theirs


@pytest.mark.parametrize("template", TEMPLATES)
def test_renders_like_transformers(hf_tokenizer, template):
    source = TEMPLATES[template].read_text()
    rendered = 0
    for conversation, messages in CONVERSATIONS.items():
        for variant, kwargs in VARIANTS.items():
            ours, theirs = render_both(hf_tokenizer, source, messages, kwargs)
            assert ours == theirs, f"{template}: {conversation}, {variant}"
            rendered += isinstance(ours, str)
    assert rendered >= 20


def test_thinking_switch_in_qwen35_template():
    template = Tokenizer.from_dir(TOKENIZER_DIR).chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages).endswith("<|im_start|>assistant\n<think>\n")
    assert template.render(messages, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


def test_loading_places(tmp_path):
    source = (TOKENIZER_DIR / "templates" / "qwen3.jinja").read_text()
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "hi"}]

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).chat_template is None  # a base model

    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools: {{ tools[0].x }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    template = Tokenizer.from_dir(tmp_path).chat_template
    assert template.render(messages) == "plain"
    assert template.render(messages, tools=[{"x": 1}]) == "tools: 1"

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}))
    assert Tokenizer.from_dir(tmp_path).chat_template.render(messages).endswith("<|im_start|>assistant\n")

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ eos_token }}"}))
    assert Tokenizer.from_dir(tmp_path).chat_template.render(messages) == "<|im_end|>"

    (tmp_path / "chat_template.jinja").write_text("{{ bos_token is defined }} {{ custom }}")
    assert Tokenizer.from_dir(tmp_path).chat_template.render(messages, custom="passed") == "False passed"

    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ModelLoadError, match="chat_template.jinja"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(_hidden=1) %}",
    ],
)
def test_sandbox(source):
    with pytest.raises(ChatTemplateError, match="^chat template: template error") as info:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


QWEN38_STYLE = TOKENIZER_DIR.parent / "qwen3.8-style" / "chat_template.jinja"


def test_thinking_levels_of_a_qwen38_style_template():
    template = ChatTemplate(QWEN38_STYLE.read_text())
    assert template.thinking_levels == ("low", "medium", "xhigh")
    question = [{"role": "user", "content": "2+2?"}]
    assert template.render(question).endswith("<think>\nReasoning effort: xhigh\n")  # the default
    for level in template.thinking_levels:
        variables = template.thinking_vars(level)
        assert variables == {"enable_thinking": True, "reasoning_effort": level}
        assert template.render(question, **variables).endswith(f"Reasoning effort: {level}\n")
    assert template.render(question, **template.thinking_vars(False)).endswith("<think>\n\n</think>\n\n")
    assert template.thinking_vars(None) == {}
    with pytest.raises(ValueError, match=r"^think='high': this model's thinking levels are low, medium, xhigh$"):
        template.thinking_vars("high")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_on_off_templates_have_no_thinking_levels(name):
    template = ChatTemplate(TEMPLATES[name].read_text())
    assert template.thinking_levels == ()
    assert template.thinking_vars(True) == {"enable_thinking": True}
    with pytest.raises(ValueError, match="no thinking levels; think takes true or false"):
        template.thinking_vars("low")


ESCAPE = "{{ messages[0].content.__class__.__mro__[1].__subclasses__() }}"
# renders the probe conversation, fails on a message that says "boom"
LATE_ESCAPE = "{% for m in messages %}{% if 'boom' in m.content %}" + ESCAPE + "{% endif %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from checkpoints import build_reference, save_checkpoint

    return save_checkpoint(build_reference("qwen3", vocab_size=151936), tmp_path_factory.mktemp("tiny"))


def with_template(tiny_dir, tmp_path, source: str):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_dir.iterdir():
        (model / f.name).symlink_to(f)
    (model / "chat_template.jinja").unlink()
    (model / "chat_template.jinja").write_text(source)
    return model


def test_a_template_escaping_the_sandbox_is_refused_at_load(tiny_dir, tmp_path, capsys):
    import mlxqwen
    from mlxqwen.cli import main

    model = with_template(tiny_dir, tmp_path, ESCAPE)
    expected = f"{model / 'chat_template.jinja'}: template error on a probe conversation (access to attribute"
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        mlxqwen.load(model)
    assert main(["generate", str(model), "-p", "Hello", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mlxqwen generate: error: {expected}") and "Traceback" not in err


def test_a_template_failing_later_is_one_line_at_generate(tiny_dir, tmp_path, capsys):
    import mlxqwen
    from mlxqwen.cli import main

    model = with_template(tiny_dir, tmp_path, LATE_ESCAPE)
    llm = mlxqwen.load(model)  # the probe conversation renders
    with pytest.raises(ChatTemplateError, match="chat_template.jinja: template error"):
        llm.generate("boom")
    assert main(["generate", str(model), "-p", "boom", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat_template.jinja: template error (access to attribute" in err


def test_a_gguf_template_is_checked_at_load(tiny_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from checkpoints import to_gguf

    import mlxqwen

    gguf = to_gguf(with_template(tiny_dir, tmp_path, ESCAPE), tmp_path / "m.gguf", "F32")
    with pytest.raises(ModelLoadError, match=re.escape(f"{gguf} (tokenizer.chat_template): template error on a probe")):
        mlxqwen.load(gguf)
