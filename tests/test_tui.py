"""The chat app driven like a person would (Textual pilot), through the real engine.

Two models: a tiny random Qwen3.5 checkpoint loaded with `mlxqwen.load` (real weights, real
cache, real snapshots), and a scripted backend whose replies are fixed text (the real
tokenizer, chat template, engine and parser), for what a random model cannot show:
thinking that ends, Markdown, code blocks and tool calls. Snapshot tests capture the main
screens."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.numpy
from checkpoints import TOKENIZER_DIR, build_reference, save_checkpoint
from mlxqwen.tui.app import ChatApp
from mlxqwen.tui.chat import ChatController
from mlxqwen.tui.commands import COMMANDS, help_markdown
from mlxqwen.tui.fit import memory_plan
from mlxqwen.tui.screens import ChatList, HelpScreen, ModelPicker, SettingsScreen
from mlxqwen.tui.store import ChatSettings, ChatStore
from mlxqwen.tui.widgets import AssistantMessage, ChatInput, ChatMarkdown, CopyableFence, ToolCallBlock, UserMessage
from scripted import ScriptedRuntime, scripted_llm
from textual.widgets import Markdown
from textual.widgets._footer import FooterKey
from textual.widgets.markdown import MarkdownBlock

import mlxqwen.demo
import mlxqwen.memory
from mlxqwen.display import format_size
from mlxqwen.llm import last
from mlxqwen.tokenizer import Tokenizer

GiB = 1024**3
SIZE = (100, 32)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    model = build_reference(
        "qwen3_5_text",
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    return save_checkpoint(model, tmp_path_factory.mktemp("models") / "tiny-qwen3.5")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's data, models, Hugging Face cache or the shipped demo model."""
    monkeypatch.setenv("MLXQWEN_DATA_DIR", str(tmp_path / "data"))
    hf_cache = str(tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hf_cache)
    # scan_cache_dir() without an argument reads a copy bound when huggingface_hub first imported it
    monkeypatch.setattr("huggingface_hub.utils._cache_manager.HF_HUB_CACHE", hf_cache)

    def no_demo(kind: str = "mlx"):
        raise FileNotFoundError("no demo model in these tests")

    monkeypatch.setattr(mlxqwen.demo, "model_path", no_demo)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "data" / "chats.sqlite"


def ScriptedReplies(replies: list[str], gates: dict[int, threading.Event] | None = None) -> ScriptedRuntime:
    """A model that writes fixed replies, one per generation, in turn; `gates` hold a generation
    before the token at that index until they are set."""
    return ScriptedRuntime(Tokenizer.from_dir(TOKENIZER_DIR), replies, max_context=4096, gates=gates)


ANSWER = (
    "Let me add 2 and 2.\n</think>\n\n"
    "The answer is **4**:\n\n```python\nprint(2 + 2)\n```\n"
    "<tool_call>\n<function=calc>\n<parameter=expr>\n2+2\n</parameter>\n</function>\n</tool_call>"
)


def scripted_app(store_path: Path, backend: ScriptedRuntime, **kwargs) -> ChatApp:
    model_dir = store_path.parent / "models" / "qwen-scripted"
    model_dir.mkdir(parents=True, exist_ok=True)
    return ChatApp(model_dir, store=ChatStore(store_path), loader=lambda path: scripted_llm(backend), **kwargs)


async def until(pilot, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    await until(pilot, lambda: pilot.app.llm is not None)


async def answered(pilot) -> None:
    await pilot.pause(0.05)
    await until(pilot, lambda: not pilot.app.generating and pilot.app.pending is None)


async def send(pilot, text: str) -> None:
    pilot.app.query_one(ChatInput).text = text
    await pilot.press("enter")
    await answered(pilot)


def stored(app: ChatApp) -> list[tuple[dict, str]]:
    return [(m.message, m.status) for m in app.store.messages(app.chat.id)]


def conversation(app: ChatApp) -> list[dict]:
    return app.chat.session.conversation


# --- real model -----------------------------------------------------------------------


async def test_send_streams_answer_saved_and_shown(tiny_model, store_path):
    app = ChatApp(tiny_model, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(think=False, temperature=1.0, max_tokens=8))
        await send(pilot, "Hello there")
        reply = conversation(app)[-1]
        assert reply["role"] == "assistant" and reply["content"]
        assert stored(app) == [({"role": "user", "content": "Hello there"}, "done"), (reply, "done")]
        shown = app.query_one(AssistantMessage).query_one(ChatMarkdown)
        assert shown.source == reply["content"]
        stats = app.store.messages(app.chat.id)[-1].stats
        assert stats["generated_tokens"] == 8 and stats["finish_reason"] == "length"
        assert app.title == "Hello there"
        assert f"ctx {app.chat.session.tokens:,}/4,096" in str(app.query_one("#status-text").render())
    assert app.engine_stopped


async def test_escape_stops_at_once_and_keeps_the_partial_answer(tiny_model, store_path):
    app = ChatApp(tiny_model, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(think=True, temperature=1.0, max_tokens=3000))
        app.query_one(ChatInput).text = "Think about it"
        await pilot.press("enter")
        widget = app.query_one(AssistantMessage)
        await until(pilot, lambda: widget.thinking is not None and widget.thinking.query_one(ChatMarkdown).source)
        await pilot.press("escape")
        await answered(pilot)
        (user, _), (reply, status) = stored(app)
        assert status == "stopped" and reply["reasoning_content"]
        assert reply == conversation(app)[-1]
        stats = app.store.messages(app.chat.id)[-1].stats
        assert stats["finish_reason"] == "cancelled" and stats["generated_tokens"] < 3000
        assert "stopped" in str(widget.meta.render())
        # the chat goes on from the stopped reply
        app.apply_settings(ChatSettings(think=False, temperature=1.0, max_tokens=4))
        await send(pilot, "Go on")
        assert len(conversation(app)) == 4 and stored(app)[-1] == (conversation(app)[-1], "done")


async def test_view_follows_the_answer_until_the_user_scrolls_up(tiny_model, store_path):
    app = ChatApp(tiny_model, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(think=True, temperature=1.0, max_tokens=3000))
        app.query_one(ChatInput).text = "Write a lot"
        await pilot.press("enter")
        view = app.chat_view
        await until(pilot, lambda: view.max_scroll_y > 10)
        await until(pilot, lambda: view.scroll_y == view.max_scroll_y)  # following
        view.scroll_to(y=0, animate=False)  # the user reads from the top
        await until(pilot, lambda: view.max_scroll_y > 20)
        assert view.scroll_y == 0
        await pilot.press("escape")
        await answered(pilot)


async def test_regenerate_and_edit_use_the_session_snapshots(tiny_model, store_path):
    app = ChatApp(tiny_model, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(think=False, temperature=1.0, max_tokens=6))
        await send(pilot, "First question")
        await send(pilot, "Second question")
        cached = app.chat.session.tokens

        await pilot.press("ctrl+r")
        await answered(pilot)
        stats = app.store.messages(app.chat.id)[-1].stats
        assert stats["prompt_tokens"] == 1  # only the prompt's last token is fed again
        assert len(stored(app)) == 4 and [m for m, _ in stored(app)] == conversation(app)
        assert len(app.query(AssistantMessage)) == 2

        await pilot.press("up")  # in the empty input: edit the last message
        assert app.query_one(ChatInput).text == "Second question"
        app.query_one(ChatInput).text = "Second question, edited"
        await pilot.press("enter")
        await answered(pilot)
        stats = app.store.messages(app.chat.id)[-1].stats
        assert 0 < stats["cached_tokens"] < cached  # back to before the message, not to the start
        assert [m["content"] for m, _ in stored(app)][::2] == ["First question", "Second question, edited"]
        assert [m for m, _ in stored(app)] == conversation(app)
        assert [w.stored.message["content"] for w in app.query(UserMessage)] == [
            "First question",
            "Second question, edited",
        ]


async def test_chat_persists_and_reopens(tiny_model, store_path):
    app = ChatApp(tiny_model, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(system="Be brief.", think=False, temperature=1.0, max_tokens=5))
        await send(pilot, "Remember me")
        first = stored(app)

    app = ChatApp(store=ChatStore(store_path), resume=True)  # no model given: the last one used
    async with app.run_test(size=SIZE) as pilot:
        assert stored(app) == first
        assert app.chat.settings.system == "Be brief." and app.chat.settings.max_tokens == 5
        assert [w.stored.message for w in app.query("UserMessage, AssistantMessage")] == [m for m, _ in first]
        await ready(pilot)
        assert app.model_path == tiny_model
        await send(pilot, "Do you?")
        assert app.chat.session.history[0] == {"role": "system", "content": "Be brief."}
        assert [m for m, _ in stored(app)] == conversation(app)
        assert conversation(app)[:2] == [m for m, _ in first]


async def test_partial_answer_survives_a_kill(tiny_model, store_path):
    app = ChatApp(tiny_model, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(think=True, temperature=1.0, max_tokens=3000))
        app.query_one(ChatInput).text = "A long answer please"
        await pilot.press("enter")

        def on_disk() -> list:
            # what another process sees: what is left if this one is killed now
            with sqlite3.connect(store_path) as db:
                return db.execute("SELECT message, status FROM messages ORDER BY id").fetchall()

        await until(pilot, lambda: len(on_disk()) == 2 and '"reasoning_content"' in on_disk()[1][0])
        assert on_disk()[1][1] == "streaming"
        reopened = ChatStore(store_path).messages(app.chat.id)
        assert reopened[1].status == "streaming" and reopened[1].message["reasoning_content"]
        await pilot.press("escape")
        await answered(pilot)


async def test_message_sent_while_loading_is_answered_when_ready(store_path):
    gate = threading.Event()
    backend = ScriptedReplies(["All good."])

    def slow_load(path):
        assert gate.wait(30)
        return scripted_llm(backend)

    model_dir = store_path.parent / "models" / "qwen-slow"
    model_dir.mkdir(parents=True)
    app = ChatApp(model_dir, store=ChatStore(store_path), loader=slow_load)
    started = time.monotonic()
    async with app.run_test(size=SIZE) as pilot:
        assert time.monotonic() - started < 5  # the UI does not wait for the model
        assert "Loading qwen-slow" in str(app.query_one("#status-text").render())
        app.apply_settings(ChatSettings(think=False))
        app.query_one(ChatInput).text = "Are you there?"
        await pilot.press("enter")
        assert app.pending is not None and "waiting for the model" in str(app.query_one(AssistantMessage).meta.render())
        gate.set()
        await ready(pilot)
        await answered(pilot)
        assert [m["content"] for m, _ in stored(app)] == ["Are you there?", "All good."]


async def test_quitting_while_loading_keeps_the_message_and_does_not_wait(store_path):
    gate = threading.Event()

    def slow_load(path):
        assert gate.wait(30)
        return ScriptedReplies(["Too late."])

    model_dir = store_path.parent / "models" / "qwen-slow"
    model_dir.mkdir(parents=True)
    app = ChatApp(model_dir, store=ChatStore(store_path), loader=slow_load)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(ChatInput).text = "Still there?"
        await pilot.press("enter")
        await pilot.press("ctrl+q")
    assert not app.engine_stopped  # the CLI then leaves with os._exit instead of waiting for the load
    gate.set()
    messages = ChatStore(store_path).messages(app.chat.id)
    assert [(m.role, m.message["content"]) for m in messages] == [("user", "Still there?")]


async def test_model_load_error_is_shown(tmp_path, store_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    app = ChatApp(broken, store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.load_error is not None)
        assert "broken-model" in str(app.query_one("#status-text").render())
        assert app.llm is None


# --- scripted model: thinking, Markdown, code, tool calls -------------------------------


async def test_thinking_folds_when_the_answer_starts(store_path):
    close = Tokenizer.from_dir(TOKENIZER_DIR).encode(ANSWER).index(151668)  # </think>
    in_thinking, in_answer = threading.Event(), threading.Event()
    backend = ScriptedReplies([ANSWER], gates={4: in_thinking, close + 6: in_answer})
    app = scripted_app(store_path, backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one(ChatInput).text = "What is 2+2?"
        await pilot.press("enter")
        widget = app.query_one(AssistantMessage)
        await until(pilot, lambda: widget.thinking is not None and widget.thinking.query_one(ChatMarkdown).source)
        assert not widget.thinking.collapsed and widget.thinking.title == "Thinking…"
        in_thinking.set()
        await until(pilot, lambda: widget.segment is not None and widget.segment.source)
        assert widget.thinking.collapsed
        in_answer.set()
        await answered(pilot)

        reply = stored(app)[-1][0]
        assert reply["reasoning_content"] == "Let me add 2 and 2."
        assert reply["content"] == "The answer is **4**:\n\n```python\nprint(2 + 2)\n```"
        assert reply["tool_calls"] == [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+2"}}}]
        call = widget.query_one(ToolCallBlock)
        assert call.call_name == "calc" and "2+2" in str(call.render())
        assert widget.query_one(CopyableFence).code == "print(2 + 2)"
        await pilot.press("ctrl+b")
        assert app.clipboard == "print(2 + 2)"


async def test_settings_screen_changes_the_chat(store_path):
    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature").value = "-1"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # refused: temperature must be 0 or more
        app.screen.query_one("#temperature").value = "0.7"
        app.screen.query_one("#max_tokens").value = "64"
        app.screen.query_one("#system").text = "You are terse."
        await pilot.click("#think")
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, SettingsScreen)
        expected = ChatSettings(system="You are terse.", think=False, temperature=0.7, top_p=None, max_tokens=64)
        assert app.chat.settings == expected
        assert app.store.chat(app.chat.id).settings == expected
        assert app.chat.session is None  # a new system prompt: the conversation is read again
        await send(pilot, "Again")
        assert app.chat.session.history[0] == {"role": "system", "content": "You are terse."}


async def test_slash_commands(store_path, tmp_path):
    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "/think off")
        assert app.chat.settings.think is False
        await send(pilot, "/system Answer in French.")
        assert app.chat.settings.system == "Answer in French."
        await send(pilot, "/usr/bin is a folder")  # not a command: sent as a message
        assert stored(app)[0][0]["content"] == "/usr/bin is a folder"
        await send(pilot, "/rename Folders")
        assert app.store.chat(app.chat.id).title == "Folders" and app.title == "Folders"
        await send(pilot, f"/export {tmp_path / 'out.md'}")
        exported = (tmp_path / "out.md").read_text()
        assert exported.startswith("# Folders") and "/usr/bin is a folder" in exported and "Hi." in exported
        await send(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await send(pilot, "/clear")
        assert stored(app) == [] and not app.query(AssistantMessage)
        chat_id = app.chat.id
        await send(pilot, "/new")
        assert app.chat.id == 0 and app.chat.settings.think is False
        assert app.store.chat(chat_id) is not None


async def test_chat_list_opens_renames_and_deletes(store_path):
    app = scripted_app(store_path, ScriptedReplies(["One.", "Two."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.apply_settings(ChatSettings(think=False))
        await send(pilot, "First chat")
        first = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, "Second chat")
        second = app.chat.id

        await pilot.press("ctrl+o")
        assert isinstance(app.screen, ChatList)
        await pilot.press("down", "enter")  # the older chat
        assert app.chat.id == first and [m["content"] for m, _ in stored(app)] == ["First chat", "One."]

        await pilot.press("ctrl+o")
        await pilot.press("r")
        app.screen.query_one("Input").value = "Renamed"
        await pilot.press("enter")
        assert app.store.chat(second).title == "Renamed"
        await pilot.press("down", "d", "y")  # delete the open chat
        assert app.store.chat(first) is None
        await pilot.press("escape")
        assert app.chat.id == 0 and not app.query(UserMessage)


async def test_model_picker_lists_local_models_with_a_memory_verdict(tiny_model, store_path, monkeypatch):
    models = Path(os.environ["MLXQWEN_DATA_DIR"]) / "models"
    models.mkdir(parents=True)
    (models / "tiny-qwen3.5").symlink_to(tiny_model)
    monkeypatch.setattr(mlxqwen.memory, "memory_budget", lambda: 16 * GiB)
    app = ChatApp(store=ChatStore(store_path))  # nothing used yet: the first local model
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.model_path == models / "tiny-qwen3.5"
        await pilot.press("ctrl+l")
        picker = app.screen
        assert isinstance(picker, ModelPicker)
        await until(pilot, lambda: picker.models and "✓" in str(picker.query_one("DataTable").get_row_at(0)[4]))
        row = picker.query_one("DataTable").get_row_at(0)
        size = format_size(sum(f.stat().st_size for f in tiny_model.iterdir()))  # as `mlxqwen list` says it
        assert [str(row[0]), row[1], row[3], row[5]] == ["● tiny-qwen3.5", "MLX", size, "library"]
        assert size.endswith(" MB") and "/16.0 GiB" in str(row[4])


async def test_without_any_model_the_picker_says_what_to_do(store_path):
    app = ChatApp(store=ChatStore(store_path))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ModelPicker))
        hint = app.screen.hint
        await until(pilot, lambda: "No local model found" in str(hint.render()))
        assert "mlxqwen pull" in str(hint.render())
        await pilot.press("escape")
        assert "No model" in str(app.query_one("#status-text").render())


async def test_command_palette_and_theme_persist(store_path):
    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await pilot.press("ctrl+p")
        await pilot.press(*"new chat")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.chat.id == 0)
        await pilot.press("ctrl+p", *"light/dark")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: not app.current_theme.dark)

    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        assert not app.current_theme.dark


async def test_engine_thread_is_gone_after_exit(store_path):
    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        thread = app.engine._thread
    assert app.engine_stopped and not thread.is_alive()
    assert not Path(f"/proc/self/task/{thread.native_id}").exists()


async def test_quitting_is_in_sight(store_path):
    """Ctrl+Q is in the footer (also over a dialog) and in /help, and /quit leaves."""
    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)

        def quit_shown() -> bool:
            return ("ctrl+q", "Quit") in {(k.key, k.description) for k in app.query(FooterKey)}

        await until(pilot, quit_shown)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await until(pilot, quit_shown)
        assert "`/quit` (**Ctrl+Q**)" in app.screen.query_one(Markdown).source
        await pilot.press("escape")
        app.query_one(ChatInput).text = "/quit"
        await pilot.press("enter")
        await until(pilot, lambda: app._exit)


async def test_every_command_from_one_table(store_path):
    """Keys, palette, slash commands and help all come from `COMMANDS`."""
    app = scripted_app(store_path, ScriptedReplies(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        keys = {b.key: b.action for b in app._bindings.key_to_bindings and app.BINDINGS}
        palette = {c.title for c in app.get_system_commands(app.screen)}
        for command in COMMANDS:
            assert callable(getattr(app, f"action_{command.action}")), command
            assert f"/{command.name}" in help_markdown()
            if command.key:
                assert keys[command.key] == command.action
            if command.name not in ("stop", "quit"):
                assert command.title in palette
        await send(pilot, "/think off")  # a slash command with an argument
        assert not app.chat.settings.think
        await pilot.press("ctrl+t")  # the same command from its key
        assert app.chat.settings.think


async def test_status_line_names_the_model_as_mlxqwen_list_does(tiny_model, store_path):
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--Qwen--Tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    backend = ScriptedReplies(["Hi."])
    app = ChatApp(snapshot, store=ChatStore(store_path), loader=lambda path: scripted_llm(backend))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert str(app.query_one("#status-text").render()).startswith("Qwen/Tiny · scripted · ")


async def test_speed_shows_while_generating_and_thinking_keeps_its_lines(store_path, monkeypatch):
    monkeypatch.setattr("mlxqwen.tui.app.SPEED_EVERY", 0.0)
    reply = "Step one: 7 + 8 = 15\nStep two: 3 + 4 + 1 = 8\n</think>\n\n85."
    gate = threading.Event()  # holds the reply at </think>
    backend = ScriptedReplies([reply], gates={Tokenizer.from_dir(TOKENIZER_DIR).encode(reply).index(151668): gate})
    app = scripted_app(store_path, backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one(ChatInput).text = "What is 37 + 48?"
        await pilot.press("enter")
        status = app.query_one("#status-text")
        await until(pilot, lambda: re.search(r"generating [\d.]+ tok/s", str(status.render())))
        thinking = app.query_one(AssistantMessage).thinking
        await until(pilot, lambda: any("Step two" in m.source for m in thinking.query(ChatMarkdown)))
        await pilot.pause(0.1)
        shown = "\n".join(str(p.render()) for p in thinking.query(MarkdownBlock))
        assert "7 + 8 = 15\nStep two" in shown  # one line each, as the model wrote them
        gate.set()
        await answered(pilot)
        await until(pilot, lambda: "generating" not in str(status.render()))
        assert " tok/s · TTFT " in str(status.render())


async def test_the_status_line_counts_the_mtp_heads_guesses(store_path):
    """The demo model on MLX guesses tokens with its MTP head; the status line says how many it kept."""
    loader = functools.partial(mlxqwen.load, backend="mlx", mtp_depth=2)
    app = ChatApp(mlxqwen.demo.DEMO_DIR, store=ChatStore(store_path), loader=loader)
    async with app.run_test(size=(160, 32)) as pilot:
        await ready(pilot)
        await send(pilot, "What is 37 + 48?")
        stats = app.chat.messages[-1].stats
        assert 0 < stats["accepted_tokens"] <= stats["draft_tokens"]
        status = str(app.query_one("#status-text").render())
        assert status.endswith(f" · MTP {stats['accepted_tokens']}/{stats['draft_tokens']} drafts accepted")


async def test_a_load_note_shows_once_on_this_machine(store_path):
    def noting_loader(path):
        logging.getLogger("mlxqwen").warning("this model would run faster on llama.cpp")
        return ScriptedReplies(["Hi."])

    for shown in (True, False):
        app = scripted_app(store_path, ScriptedReplies(["Hi."]))
        app.loader = noting_loader
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await ready(pilot)
            notes = [n.message for n in app._notifications]
            assert ("this model would run faster on llama.cpp" in notes) is shown


def test_a_chat_keeps_its_session_while_it_holds_the_conversation(store_path):
    """The controller resumes the chat's session turn after turn; once the store holds another
    conversation (a turn dropped), a new session reads it."""
    llm = scripted_llm(ScriptedReplies(["One.", "Two.", "Three."]))
    chat = ChatController.new(ChatStore(store_path), ChatSettings(system="Be brief.", think=False))
    sessions = []
    for text in ("First", "Second"):
        base = chat.history()
        _, reply = chat.add_turn(text, None)
        chat.finish(reply, last(chat.send(llm, base, text)))
        sessions.append(chat.session)
    session = sessions[0]
    assert sessions == [session, session] and session.conversation == chat.history()
    assert session.history[0] == {"role": "system", "content": "Be brief."}
    chat.drop(2)
    _, reply = chat.add_turn("Third", None)
    chat.finish(reply, last(chat.send(llm, chat.history(-2), "Third")))
    assert chat.session is not session and chat.session.conversation == chat.history()
    stored = [m.message["content"] for m in chat.store.messages(chat.id)]
    assert stored == ["First", "One.", "Third", "Three."] and chat.title == "First"


def test_cli_registers_chat(capsys):
    from mlxqwen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--help"])
    assert exit_.value.code == 0
    assert main(["chat", "no-such-model"]) == 1
    assert capsys.readouterr().err.startswith("mlxqwen chat: error: no-such-model: no such model directory")


def test_memory_plan_counts_the_weights(tiny_model, monkeypatch):
    monkeypatch.setattr(mlxqwen.memory, "memory_budget", lambda: 16 * GiB)
    plan = memory_plan(tiny_model, context=1024)
    params = sum(t.size for t in safetensors.numpy.load_file(tiny_model / "model.safetensors").values())
    assert plan.context == 1024 and plan.weights == params * 4  # fp32 on a CPU
    assert plan.fits and plan.budget == 16 * GiB


# --- snapshots of the main screens ------------------------------------------------------


def _seed_chat(store_path: Path) -> None:
    store = ChatStore(store_path, clock=lambda: 1_700_000_000.0)
    older = store.new_chat(ChatSettings(), "/models/qwen-scripted")
    store.rename(older.id, "Unit conversions")
    store.clock = lambda: 1_700_086_400.0  # a day later
    chat = store.new_chat(ChatSettings(system="You are a helpful assistant."), "/models/qwen-scripted")
    store.rename(chat.id, "Adding numbers")
    stats = dict(
        prompt_tokens=31,
        cached_tokens=0,
        prompt_tps=410.0,
        generated_tokens=54,
        generation_tps=24.6,
        ttft=0.41,
        peak_memory=int(15.8 * GiB),
        finish_reason="tool_calls",
    )
    store.add_message(chat.id, {"role": "user", "content": "How do I add 2 and 2 in Python?"})
    store.add_message(
        chat.id,
        {
            "role": "assistant",
            "content": "Use the `+` operator:\n\n```python\nprint(2 + 2)\n```",
            "reasoning_content": "The user wants a one-line example.",
            "tool_calls": [{"type": "function", "function": {"name": "run_python", "arguments": {"code": "2 + 2"}}}],
        },
        stats=stats,
    )
    store.add_message(chat.id, {"role": "user", "content": "And in Rust?"})
    store.add_message(
        chat.id, {"role": "assistant", "content": "In Rust, write"}, "stopped", {**stats, "generated_tokens": 3}
    )
    store.close()


@pytest.fixture
def snapshot_app(store_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    _seed_chat(store_path)
    return scripted_app(store_path, ScriptedReplies(["Hi."]), resume=True)


async def _ready_for_snapshot(pilot) -> None:
    await ready(pilot)
    pilot.app.query_one(ChatInput).cursor_blink = False
    await pilot.pause(0.1)


def test_snapshot_chat(snapshot_app, snap_compare):
    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=_ready_for_snapshot)


def test_snapshot_chat_light(snapshot_app, snap_compare):
    async def light(pilot):
        await _ready_for_snapshot(pilot)
        pilot.app.action_toggle_theme()
        await pilot.pause(0.1)

    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=light)


def test_snapshot_settings(snapshot_app, snap_compare):
    assert snap_compare(snapshot_app, terminal_size=SIZE, press=["ctrl+s"], run_before=_ready_for_snapshot)


def test_snapshot_chat_list(snapshot_app, snap_compare):
    assert snap_compare(snapshot_app, terminal_size=SIZE, press=["ctrl+o"], run_before=_ready_for_snapshot)


def test_snapshot_help(snapshot_app, snap_compare):
    assert snap_compare(snapshot_app, terminal_size=SIZE, press=["f1"], run_before=_ready_for_snapshot)


def test_snapshot_model_picker(snapshot_app, tiny_model, snap_compare, monkeypatch):
    models = Path(os.environ["MLXQWEN_DATA_DIR"]) / "models"
    (models / "tiny-qwen3.5").symlink_to(tiny_model)
    monkeypatch.setattr(mlxqwen.memory, "memory_budget", lambda: 16 * GiB)

    async def picker(pilot):
        await _ready_for_snapshot(pilot)
        await pilot.press("ctrl+l")
        screen = pilot.app.screen
        await until(pilot, lambda: screen.models and "…" not in str(screen.query_one("DataTable").get_row_at(0)[4]))

    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=picker)
