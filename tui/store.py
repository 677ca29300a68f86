"""Chats on disk: a SQLite database in the user data directory.

Every change is committed at once (WAL journal), and a reply being generated is saved
as it grows with status "streaming", so a chat survives the app being killed in the
middle of an answer: the reply comes back marked as interrupted. Messages are kept in
chat-template form (`role`, `content`, `reasoning_content`, `tool_calls`), so a stored
chat is the history a `ChatSession` resumes from."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT,
    settings TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    message TEXT NOT NULL,
    status TEXT NOT NULL,
    stats TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

NEW_CHAT_TITLE = "New chat"


@dataclass
class ChatSettings:
    """Per-chat generation settings; None means the model's recommended value."""

    system: str = ""
    think: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The sampling fields to pass to a generation."""
        values = dict(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_json(cls, text: str) -> ChatSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass
class Chat:
    id: int
    title: str
    model: str | None
    settings: ChatSettings
    created: float
    updated: float


@dataclass
class StoredMessage:
    """status: "done", "stopped" (by the user), "streaming" (being written, or interrupted
    when read back after the app was killed)."""

    id: int
    message: dict[str, Any]
    status: str = "done"
    stats: dict[str, Any] | None = field(default=None)

    @property
    def role(self) -> str:
        return self.message["role"]


class ChatStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: every write is durable at once
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- chats ------------------------------------------------------------------------

    def new_chat(self, settings: ChatSettings | None = None, model: str | None = None) -> Chat:
        now = self.clock()
        settings = settings or ChatSettings()
        cur = self.db.execute(
            "INSERT INTO chats (title, model, settings, created, updated) VALUES (?, ?, ?, ?, ?)",
            (NEW_CHAT_TITLE, model, json.dumps(asdict(settings)), now, now),
        )
        return Chat(cur.lastrowid, NEW_CHAT_TITLE, model, settings, now, now)

    def chats(self) -> list[Chat]:
        """All chats, most recently updated first."""
        rows = self.db.execute("SELECT * FROM chats ORDER BY updated DESC, id DESC").fetchall()
        return [_chat(row) for row in rows]

    def chat(self, chat_id: int) -> Chat | None:
        row = self.db.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        return _chat(row) if row else None

    def rename(self, chat_id: int, title: str) -> None:
        self.db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def delete(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def save_settings(self, chat_id: int, settings: ChatSettings) -> None:
        self.db.execute("UPDATE chats SET settings = ? WHERE id = ?", (json.dumps(asdict(settings)), chat_id))

    def set_model(self, chat_id: int, model: str) -> None:
        self.db.execute("UPDATE chats SET model = ? WHERE id = ?", (model, chat_id))

    # --- messages -----------------------------------------------------------------------

    def messages(self, chat_id: int) -> list[StoredMessage]:
        rows = self.db.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,)).fetchall()
        return [
            StoredMessage(r["id"], json.loads(r["message"]), r["status"], r["stats"] and json.loads(r["stats"]))
            for r in rows
        ]

    def add_message(
        self, chat_id: int, message: dict[str, Any], status: str = "done", stats: dict[str, Any] | None = None
    ) -> StoredMessage:
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO messages (chat_id, message, status, stats) VALUES (?, ?, ?, ?)",
                (chat_id, json.dumps(message, ensure_ascii=False), status, json.dumps(stats) if stats else None),
            )
            self._touch(chat_id)
        return StoredMessage(cur.lastrowid, message, status, stats)

    def update_message(self, stored: StoredMessage) -> None:
        with self._transaction():
            self.db.execute(
                "UPDATE messages SET message = ?, status = ?, stats = ? WHERE id = ?",
                (
                    json.dumps(stored.message, ensure_ascii=False),
                    stored.status,
                    json.dumps(stored.stats) if stored.stats else None,
                    stored.id,
                ),
            )
            row = self.db.execute("SELECT chat_id FROM messages WHERE id = ?", (stored.id,)).fetchone()
            self._touch(row["chat_id"])

    def delete_messages(self, chat_id: int, first_id: int = 0) -> None:
        """Delete the chat's messages from `first_id` on (all of them by default)."""
        with self._transaction():
            self.db.execute("DELETE FROM messages WHERE chat_id = ? AND id >= ?", (chat_id, first_id))
            self._touch(chat_id)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _touch(self, chat_id: int) -> None:
        self.db.execute("UPDATE chats SET updated = ? WHERE id = ?", (self.clock(), chat_id))

    # --- app state ----------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))


def _chat(row: sqlite3.Row) -> Chat:
    return Chat(
        row["id"], row["title"], row["model"], ChatSettings.from_json(row["settings"]), row["created"], row["updated"]
    )


def to_markdown(chat: Chat, messages: list[StoredMessage]) -> str:
    """The chat as a Markdown document: thinking in a folded <details>, tool calls as JSON."""
    parts = [f"# {chat.title}\n"]
    if chat.model:
        parts.append(f"Model: `{chat.model}`\n")
    if chat.settings.system:
        parts.append(f"**System:** {chat.settings.system}\n")
    for stored in messages:
        m = stored.message
        if m["role"] == "user":
            parts.append(f"## You\n\n{m['content']}\n")
        elif m["role"] == "assistant":
            parts.append("## Assistant\n")
            if m.get("reasoning_content"):
                parts.append(f"<details><summary>Thinking</summary>\n\n{m['reasoning_content']}\n\n</details>\n")
            if m["content"]:
                parts.append(f"{m['content']}\n")
            for call in m.get("tool_calls", ()):
                call_json = json.dumps(call["function"], indent=2, ensure_ascii=False)
                parts.append(f"Tool call:\n\n```json\n{call_json}\n```\n")
            if stored.status != "done":
                parts.append(f"*({status_label(stored.status)})*\n")
        else:
            parts.append(f"## {m['role'].capitalize()}\n\n{m['content']}\n")
    return "\n".join(parts)


def status_label(status: str) -> str:
    return {"stopped": "stopped", "streaming": "interrupted"}.get(status, status)
