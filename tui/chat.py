"""One chat of the app: its row in the store, its messages, and the `ChatSession` that holds its
conversation in the model.

The session owns the turns: it sends a message, draws the last reply again or replaces the last
message, going back to the model states it keeps. The controller keeps the store in step with
it, and starts a new session (which reads the conversation once) when the one it has holds
another conversation: a turn dropped when stopped early or on an error, another model, another
system prompt. The app keeps the widgets and the wiring (`tui/app.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mlxqwen import ChatSession
from mlxqwen.events import Done, Event, assistant_message

from .store import NEW_CHAT_TITLE, Chat, ChatSettings, ChatStore, StoredMessage


def _title(text: str) -> str:
    line = text.strip().splitlines()[0].strip()
    return line if len(line) <= 48 else line[:47] + "…"


class ChatController:
    def __init__(self, store: ChatStore, row: Chat, messages: list[StoredMessage] | None = None):
        self.store = store
        self.row = row  # id 0: not saved yet (a chat is saved with its first message)
        self.messages = messages or []
        self.session: ChatSession | None = None

    @classmethod
    def open(cls, store: ChatStore, chat_id: int) -> ChatController:
        return cls(store, store.chat(chat_id), store.messages(chat_id))

    @classmethod
    def new(cls, store: ChatStore, settings: ChatSettings | None = None) -> ChatController:
        return cls(store, Chat(0, NEW_CHAT_TITLE, None, settings or ChatSettings(), 0.0, 0.0))

    @property
    def id(self) -> int:
        return self.row.id

    @property
    def title(self) -> str:
        return self.row.title

    @property
    def settings(self) -> ChatSettings:
        return self.row.settings

    # --- the store ------------------------------------------------------------------------

    def add_turn(self, text: str, model: str | None) -> tuple[StoredMessage, StoredMessage]:
        """Save the user's message and an empty reply to stream into (and the chat itself, titled
        after its first message, with the model it talks to)."""
        if not self.row.id:
            row = self.store.new_chat(self.row.settings, model)
            self.store.rename(row.id, _title(text))
            self.row = self.store.chat(row.id)
        user = self.store.add_message(self.row.id, {"role": "user", "content": text})
        self.messages.append(user)
        return user, self.add_reply()

    def add_reply(self) -> StoredMessage:
        reply = self.store.add_message(self.row.id, assistant_message("", "", ()), status="streaming")
        self.messages.append(reply)
        return reply

    def drop(self, start: int) -> set[int]:
        """Remove the messages from index `start` on; returns their ids."""
        if start >= len(self.messages):
            return set()
        self.store.delete_messages(self.row.id, self.messages[start].id)
        dropped = {m.id for m in self.messages[start:]}
        del self.messages[start:]
        return dropped

    def clear(self) -> None:
        if self.row.id:
            self.store.delete_messages(self.row.id)
        self.messages = []

    def last_user_index(self) -> int | None:
        return next((i for i in range(len(self.messages) - 1, -1, -1) if self.messages[i].role == "user"), None)

    def history(self, end: int | None = None) -> list[dict[str, Any]]:
        """The stored conversation up to message `end`, in chat-template form."""
        return [m.message for m in self.messages[:end]]

    def apply(self, settings: ChatSettings) -> None:
        if settings.system != self.row.settings.system:
            self.session = None  # the system message starts the conversation: read it all again
        self.row.settings = settings
        if self.row.id:
            self.store.save_settings(self.row.id, settings)

    def rename(self, title: str) -> None:
        if self.row.id:
            self.store.rename(self.row.id, title)
            self.row.title = title

    def finish(self, reply: StoredMessage, done: Done) -> None:
        """Save the reply as generated (or as far as it got, when stopped)."""
        reply.message, reply.stats = done.to_message(), vars(done.stats)
        reply.status = "stopped" if done.finish_reason == "cancelled" else "done"
        self.store.update_message(reply)

    # --- turns: each returns the events of a reply and runs on the engine thread -------------

    def options(self) -> dict[str, Any]:
        return dict(think=self.row.settings.think, **self.row.settings.overrides())

    def _session(self, llm: Any, conversation: list[dict[str, Any]]) -> ChatSession:
        """The session, if it holds `conversation`, else a new one that resumes it."""
        if self.session is None or self.session.conversation != conversation:
            settings = self.row.settings
            self.session = llm.chat(system=settings.system or None, think=settings.think, history=conversation)
        return self.session

    def send(self, llm: Any, base: list[dict[str, Any]], text: str) -> Iterator[Event]:
        """`text` sent after the conversation `base`."""
        return self._session(llm, base).stream(text, **self.options())

    def regenerate(self, llm: Any, base: list[dict[str, Any]], user: dict[str, Any]) -> Iterator[Event]:
        """The reply to `user` (sent after `base`) drawn again: from the session's own state when
        its last turn is that message, with the thinking setting of now."""
        if self.session is not None and self.session.conversation[:-1] == [*base, user]:
            try:
                return self.session.stream_regenerate(**self.options())
            except RuntimeError:  # no turn to go back to
                pass
        return self.send(llm, base, user["content"])

    def edit_last(self, llm: Any, base: list[dict[str, Any]], old: list[dict[str, Any]], text: str) -> Iterator[Event]:
        """`text` in place of the last turn `old` (a message and its reply, after `base`)."""
        if self.session is not None and len(old) == 2 and self.session.conversation == [*base, *old]:
            try:
                return self.session.stream_edit_last(text, **self.options())
            except RuntimeError:  # no turn to go back to
                pass
        return self.send(llm, base, text)

    def answered(self, base: list[dict[str, Any]]) -> bool:
        """Whether the session kept the turn sent after `base` (it drops one stopped or failed
        while the prompt was read)."""
        return self.session is not None and len(self.session.conversation) >= len(base) + 2
