"""The chat store: chats, messages, settings, app state, Markdown export."""

from __future__ import annotations

import sqlite3

import pytest
from mlxqwen.tui.store import ChatSettings, ChatStore, to_markdown


@pytest.fixture
def store(tmp_path):
    ticks = iter(range(1000, 2000))
    store = ChatStore(tmp_path / "data" / "chats.sqlite", clock=lambda: float(next(ticks)))
    yield store
    store.close()


def test_settings_overrides_and_round_trip(store):
    settings = ChatSettings(system="Be brief.", think=False, temperature=0.2, max_tokens=99)
    assert settings.overrides() == {"temperature": 0.2, "max_tokens": 99}
    assert ChatSettings().overrides() == {}
    chat = store.new_chat(settings, "/models/a")
    assert store.chat(chat.id).settings == settings
    settings.top_p = 0.9
    store.save_settings(chat.id, settings)
    assert store.chat(chat.id).settings.top_p == 0.9
    assert ChatSettings.from_json('{"think": false, "removed_field": 1}') == ChatSettings(think=False)


def test_chats_newest_first_rename_delete(store):
    a = store.new_chat()
    b = store.new_chat()
    assert [c.id for c in store.chats()] == [b.id, a.id]
    store.add_message(a.id, {"role": "user", "content": "hi"})  # a is now the most recent
    assert [c.id for c in store.chats()] == [a.id, b.id]
    store.rename(a.id, "Greetings")
    store.set_model(a.id, "/models/x")
    assert (store.chat(a.id).title, store.chat(a.id).model) == ("Greetings", "/models/x")
    store.delete(a.id)
    assert store.chat(a.id) is None and [c.id for c in store.chats()] == [b.id]
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0  # its messages went with it


def test_messages_in_order_update_and_truncate(store):
    chat = store.new_chat()
    user = store.add_message(chat.id, {"role": "user", "content": "q1"})
    reply = store.add_message(chat.id, {"role": "assistant", "content": ""}, status="streaming")
    reply.message = {"role": "assistant", "content": "a1", "reasoning_content": "hm"}
    reply.status, reply.stats = "stopped", {"generated_tokens": 2}
    store.update_message(reply)
    later = store.add_message(chat.id, {"role": "user", "content": "q2"})
    assert [(m.message["content"], m.status, m.stats) for m in store.messages(chat.id)] == [
        ("q1", "done", None),
        ("a1", "stopped", {"generated_tokens": 2}),
        ("q2", "done", None),
    ]
    store.delete_messages(chat.id, reply.id)  # from the reply on
    assert [m.id for m in store.messages(chat.id)] == [user.id]
    assert later.id not in [m.id for m in store.messages(chat.id)]
    store.delete_messages(chat.id)
    assert store.messages(chat.id) == []


def test_every_write_is_on_disk_at_once(store):
    chat = store.new_chat()
    reply = store.add_message(chat.id, {"role": "assistant", "content": "par"}, status="streaming")
    reply.message = {"role": "assistant", "content": "partial answer"}
    store.update_message(reply)
    with sqlite3.connect(store.path) as other:  # another process, e.g. after this one is killed
        assert other.execute("SELECT status, message FROM messages").fetchall() == [
            ("streaming", '{"role": "assistant", "content": "partial answer"}')
        ]


def test_app_state(store):
    assert store.get("theme", "dark") == "dark"
    store.put("theme", "light")
    store.put("recent_models", ["/a", "/b"])
    assert store.get("theme") == "light" and store.get("recent_models") == ["/a", "/b"]


def test_markdown_export(store):
    chat = store.new_chat(ChatSettings(system="Be brief."), "/models/qwen")
    store.rename(chat.id, "Sums")
    store.add_message(chat.id, {"role": "user", "content": "2+2?"})
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+2"}}}
    store.add_message(
        chat.id, {"role": "assistant", "content": "**4**", "reasoning_content": "Easy.", "tool_calls": [call]}
    )
    store.add_message(chat.id, {"role": "user", "content": "3+3?"})
    store.add_message(chat.id, {"role": "assistant", "content": "6"}, status="streaming")
    text = to_markdown(store.chat(chat.id), store.messages(chat.id))
    assert text == (
        "# Sums\n\nModel: `/models/qwen`\n\n**System:** Be brief.\n\n## You\n\n2+2?\n\n## Assistant\n\n"
        "<details><summary>Thinking</summary>\n\nEasy.\n\n</details>\n\n**4**\n\n"
        'Tool call:\n\n```json\n{\n  "name": "calc",\n  "arguments": {\n    "expr": "2+2"\n  }\n}\n```\n\n'
        "## You\n\n3+3?\n\n## Assistant\n\n6\n\n*(interrupted)*\n"
    )
