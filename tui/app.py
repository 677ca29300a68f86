"""`mlxqwen chat`: a Textual chat app on the public engine API (`load`, `LLM.chat`,
`ChatSession`), so every backend behind that API works the same.

The UI is up at once; the model loads behind it on the engine thread (`EngineThread`),
and a message sent meanwhile is answered once it is ready. A reply streams through a
`ChatSession`, which keeps the model's cache between turns; regenerate and edit-last go
back to its snapshots. Each chat's session and store row live in its `ChatController`
(`tui/chat.py`); every message is saved to the chat store as it is written."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

import mlxqwen
from mlxqwen import Done, PrefillProgress, TextDelta, ThinkingDelta, ToolCall
from mlxqwen.display import format_stats
from mlxqwen.errors import ModelNotFoundError
from mlxqwen.events import reply_message
from mlxqwen.library import data_dir, default_model, model_name, resolve_model
from mlxqwen.notes import collect, first_time

from .chat import ChatController
from .commands import COMMANDS, SLASH, Command, bindings, palette_help
from .engine import EngineThread
from .fit import memory_plan
from .screens import ChatList, HelpScreen, ModelPicker, SettingsScreen
from .store import ChatSettings, ChatStore, StoredMessage, to_markdown
from .widgets import AssistantMessage, ChatInput, CopyableFence, StatusLine, UserMessage, copy_code

SAVE_EVERY = 0.5  # seconds between saves of a reply being generated
SPEED_EVERY = 0.5  # seconds between updates of the speed shown while generating
THEMES = {"dark": "textual-dark", "light": "textual-light"}


class ChatApp(App):
    CSS = """
    #chat { height: 1fr; padding: 0 1; }
    #chat:focus { background-tint: $foreground 0%; }
    #empty { color: $text-muted; width: 100%; content-align: center middle; height: 1fr; }
    ChatInput { margin: 0 1; }
    """
    BINDINGS = bindings()

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        store: ChatStore | None = None,
        loader: Callable[[Path], Any] = mlxqwen.load,
        resume: bool = False,
    ):
        """model: a model's path (default: the last one used, else `mlxqwen.library.default_model`).
        store: where chats live (default: chats.sqlite in the user data directory).
        loader: path -> a backend with the public API (default: mlxqwen.load).
        resume: open the most recent chat instead of a new one."""
        super().__init__()
        self.store = store or ChatStore(data_dir() / "chats.sqlite")
        self.loader = loader
        self.requested_model = Path(model).expanduser() if model else None
        self.resume = resume
        self.engine = EngineThread()
        self.engine_stopped = False
        self.llm: Any = None
        self.model_path: Path | None = None
        self.model_name = ""  # as `mlxqwen list` names it
        self.loading = False
        self.load_error: str | None = None
        self.chat = ChatController.new(self.store)
        self.generating = False
        self.stopping = False
        self.prefill: PrefillProgress | None = None
        self.speed: float | None = None  # tokens/s of the reply being generated, so far
        self.pending: tuple[Callable[[], None], str] | None = None  # a turn waiting for the model, its text
        self.editing = False

    # --- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        yield VerticalScroll(id="chat")
        yield ChatInput(id="input")
        yield StatusLine()
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        self.theme = THEMES.get(self.store.get("theme", "dark"), THEMES["dark"])
        chats = self.store.chats()
        if self.resume and chats:
            await self.open_chat(chats[0].id)
        else:
            await self.show_chat()
        self.query_one(ChatInput).focus()
        self.query_one("#chat", VerticalScroll).anchor()
        self.choose_first_model()

    @property
    def chat_view(self) -> VerticalScroll:
        return self.query_one("#chat", VerticalScroll)

    async def show_chat(self) -> None:
        """Rebuild the message view from the chat's messages."""
        self.title = self.chat.title
        view = self.chat_view
        await view.remove_children()
        widgets = [UserMessage(m) if m.role == "user" else AssistantMessage(m) for m in self.chat.messages]
        await view.mount_all(widgets or [Static(_EMPTY, id="empty")])
        view.scroll_end(animate=False)
        self.update_status()

    def update_status(self) -> None:
        status = self.query_one(StatusLine)
        if self.loading:
            status.show(f"Loading {self.model_name}…", loading=True)
            return
        if self.model_path is None or self.llm is None:
            status.show(self.load_error or "No model · Ctrl+L chooses one", error=bool(self.load_error))
            return
        session = self.chat.session
        used = f"{session.tokens:,}" if session is not None else "—"
        parts = [self.model_name, self.llm.name, f"ctx {used}/{self.llm.max_context:,}"]
        if self.generating:
            if self.stopping:
                parts.append("stopping…")
            elif self.prefill is not None:
                parts.append(f"reading prompt {self.prefill.done:,}/{self.prefill.total:,}")
            else:
                parts.append("generating" + (f" {self.speed:.1f} tok/s" if self.speed else "…"))
        else:
            last = next((m for m in reversed(self.chat.messages) if m.role == "assistant"), None)
            if last is not None and last.stats:
                parts.append(format_stats(last.stats))
        if not self.chat.settings.think:
            parts.append("thinking off")
        status.show(" · ".join(parts))

    # --- models -------------------------------------------------------------------------

    @work(exclusive=True, group="discover", exit_on_error=False)
    async def choose_first_model(self) -> None:
        """The model asked for, else the last one used, else `mlxqwen.library.default_model`."""
        last = self.store.get("last_model")
        if self.requested_model is not None:
            self.load_model(self.requested_model)
        elif last and Path(last).exists():
            self.load_model(Path(last))
        else:
            try:
                model = await asyncio.to_thread(default_model)
            except ModelNotFoundError:
                self.update_status()
                self.action_model()
                return
            self.load_model(model.path)

    @work(exclusive=True, group="load", exit_on_error=False)
    async def load_model(self, path: Path) -> None:
        await self.stop_generation()
        self.llm, self.chat.session = None, None  # release the old model before reading the new one
        self.model_path, self.model_name, self.loading, self.load_error = path, path.name, True, None
        self.update_status()
        self.model_name = await asyncio.to_thread(model_name, path)  # the library's name: a cache entry's repo id
        self.update_status()

        def load() -> tuple[Any, list[str]]:
            with collect() as notes:
                return self.loader(path), notes

        try:
            llm, notes = await self.engine.run(load)
        except Exception as e:
            self.loading, self.load_error = False, f"Could not load {self.model_name}: {e}"
            self.notify(str(e), title=f"Could not load {self.model_name}", severity="error", timeout=10, markup=False)
            self.update_status()
            return
        for note in notes:
            if first_time(note):
                self.notify(note, title=self.model_name, timeout=15, markup=False)
        self.llm, self.loading = llm, False
        self.store.put("last_model", str(path))
        if self.chat.id:
            self.store.set_model(self.chat.id, str(path))
        self.update_status()
        if self.pending is not None:
            run, _ = self.pending
            self.pending = None
            run()

    async def estimate_memory(self, path: Path):
        return await self.engine.run(lambda: memory_plan(path))

    # --- chats --------------------------------------------------------------------------

    async def wait_idle(self) -> None:
        """Withdraw a turn still waiting for the model, stop the reply being generated, and
        wait until it is saved."""
        await self.withdraw_pending()
        await self.stop_generation()

    async def stop_generation(self) -> None:
        if self.generating:
            await self.action_stop()
        for worker in self.workers:
            if worker.group == "generate" and worker.is_running:
                await worker.wait()

    async def withdraw_pending(self) -> None:
        """Take back a message not answered yet because the model is not ready: it returns
        to the input."""
        if self.pending is not None:
            _, text = self.pending
            self.pending = None
            await self._drop_messages(len(self.chat.messages) - 2)
            box = self.query_one(ChatInput)
            if not box.text:
                box.text = text

    async def open_chat(self, chat_id: int) -> None:
        await self.wait_idle()
        self.chat, self.editing = ChatController.open(self.store, chat_id), False
        await self.show_chat()

    async def new_chat(self) -> None:
        await self.wait_idle()
        settings = ChatSettings(think=self.chat.settings.think)  # thinking carries over, the rest is per chat
        self.chat, self.editing = ChatController.new(self.store, settings), False
        await self.show_chat()

    # --- turns --------------------------------------------------------------------------

    @on(ChatInput.Submitted)
    async def submitted(self, event: ChatInput.Submitted) -> None:
        text = event.text.strip()
        name, _, argument = text[1:].partition(" ")
        if text.startswith("/") and name in SLASH:
            self.query_one(ChatInput).clear()
            await self.run_command(SLASH[name], argument.strip())
            return
        if self.generating or self.pending is not None:
            self.notify("Wait for the answer, or press Esc to stop it", severity="warning")
            return
        self.query_one(ChatInput).clear()
        if self.editing:
            self.editing = False
            await self.edit_last(text)
        else:
            await self.send(text)

    async def _add_turn(self, text: str) -> tuple[StoredMessage, AssistantMessage]:
        """Save and show the user's message and an empty reply to stream into."""
        user, reply = self.chat.add_turn(text, str(self.model_path) if self.model_path else None)
        self.title = self.chat.title
        widget = AssistantMessage(reply, live=True)
        for empty in self.query("#empty"):
            await empty.remove()
        await self.chat_view.mount_all([UserMessage(user), widget])
        self.chat_view.anchor()
        return reply, widget

    async def send(self, text: str) -> None:
        reply, widget = await self._add_turn(text)
        chat, base = self.chat, self.chat.history(-2)
        self.start_turn(lambda: chat.send(self.llm, base, text), base, text, reply, widget)

    async def regenerate(self) -> None:
        chat = self.chat
        last_user = chat.last_user_index()
        if last_user is None:
            self.notify("No message to answer yet")
            return
        user = chat.messages[last_user].message
        await self._drop_messages(last_user + 1)
        reply = chat.add_reply()
        widget = AssistantMessage(reply, live=True)
        await self.chat_view.mount(widget)
        self.chat_view.anchor()
        base = chat.history(last_user)
        self.start_turn(lambda: chat.regenerate(self.llm, base, user), base, user["content"], reply, widget)

    async def edit_last(self, text: str) -> None:
        chat = self.chat
        last_user = chat.last_user_index()
        if last_user is None:
            await self.send(text)
            return
        old = chat.history()[last_user:]
        await self._drop_messages(last_user)
        reply, widget = await self._add_turn(text)
        base = chat.history(-2)
        self.start_turn(lambda: chat.edit_last(self.llm, base, old, text), base, text, reply, widget)

    async def _drop_messages(self, start: int) -> None:
        """Remove messages from index `start` on, from the view and the store."""
        dropped = self.chat.drop(start)
        for widget in list(self.chat_view.children):
            if getattr(widget, "stored", None) is not None and widget.stored.id in dropped:
                await widget.remove()

    def start_turn(
        self,
        events: Callable[[], Iterator],
        base: list[dict[str, Any]],
        text: str,
        reply: StoredMessage,
        widget: AssistantMessage,
    ) -> None:
        """Generate `reply` once the model is ready. events() starts the generation, on the
        engine thread; `base` is the conversation before `text`."""

        def run() -> None:
            self.generate(events, base, text, reply, widget)

        if self.llm is None:
            self.pending = (run, text)
            widget.meta.update("waiting for the model…")
        else:
            run()

    @work(exclusive=True, group="generate", exit_on_error=False)
    async def generate(
        self,
        events: Callable[[], Iterator],
        base: list[dict[str, Any]],
        text: str,
        reply: StoredMessage,
        widget: AssistantMessage,
    ) -> None:
        self.generating, self.stopping, self.prefill, self.speed = True, False, None, None
        self.refresh_bindings()
        self.update_status()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            # runs on the engine thread; hands every event to the UI loop, then None
            try:
                for event in events():
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        job = self.engine.submit(produce)
        parts: list[ThinkingDelta | TextDelta | ToolCall] = []
        saved = shown = time.monotonic()
        first: float | None = None  # when the first piece came; each piece is about one token
        done: Done | None = None
        while (event := await queue.get()) is not None:
            if isinstance(event, (ThinkingDelta, TextDelta, ToolCall)):
                parts.append(event)
                await widget.add(event)
                now = time.monotonic()
                first = first or now
                if now - shown > SPEED_EVERY and now > first:
                    self.speed, shown = (len(parts) - 1) / (now - first), now
                    self.update_status()
                if now - saved > SAVE_EVERY:
                    reply.message = reply_message(parts)
                    self.store.update_message(reply)
                    saved = now
            elif isinstance(event, PrefillProgress):
                self.prefill = event
                self.update_status()
            elif isinstance(event, Done):
                done = event
        try:
            await asyncio.wrap_future(job)
            error = None
        except Exception as e:  # shown to the user; the session has dropped the turn
            error = e
        self.generating, self.stopping, self.prefill = False, False, None
        self.refresh_bindings()
        if done is None or not self.chat.answered(base):
            # the session dropped the turn (stopped or failed while reading the prompt)
            await self._drop_messages(len(self.chat.messages) - 2)
            input_box = self.query_one(ChatInput)
            if not input_box.text:
                input_box.text = text
            if error is not None:
                self.notify(str(error), title="Could not answer", severity="error", timeout=10, markup=False)
        else:
            self.chat.finish(reply, done)
            await widget.finish(reply.status, reply.stats)
        self.update_status()

    async def action_stop(self) -> None:
        if self.pending is not None:
            await self.withdraw_pending()
            return
        if self.editing and not self.generating:
            self.editing = False
            self.query_one(ChatInput).clear()
            return
        if self.generating and self.chat.session is not None:
            self.chat.session.cancel()
            self.stopping = True
            self.update_status()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if len(self.screen_stack) > 1 and action in _CHAT_ACTIONS:
            return False  # a dialog is open: the chat's keys wait
        if action == "stop":
            return self.generating or self.editing or self.pending is not None
        return True

    # --- actions ------------------------------------------------------------------------

    async def action_new_chat(self) -> None:
        await self.new_chat()

    def action_chats(self) -> None:
        async def chosen(result: tuple[str, int | None] | None) -> None:
            if result is not None and result[0] == "open":
                await self.open_chat(result[1])
            elif result is not None:
                await self.new_chat()
            elif self.chat.id and self.store.chat(self.chat.id) is None:
                await self.new_chat()  # the open chat was deleted
            elif self.chat.id:
                self.chat.row = self.store.chat(self.chat.id)  # renamed there, perhaps
                self.title = self.chat.title

        self.push_screen(ChatList(self.store, self.chat.id), chosen)

    def action_model(self, name: str = "") -> None:
        """Open the model named (a name from `mlxqwen list` or a path), else the model picker."""
        if name:
            try:
                self.load_model(resolve_model(name))
            except ModelNotFoundError as e:
                self.notify(str(e), severity="error", markup=False)
            return

        def chosen(path: Path | None) -> None:
            if path is not None and path != self.model_path:
                self.load_model(path)

        picker = ModelPicker(self.model_path, self.estimate_memory)
        self.push_screen(picker, chosen)

    def action_settings(self) -> None:
        defaults = {}
        if self.llm is not None:
            defaults = {k: getattr(self.llm.defaults, k) for k in ("temperature", "top_p", "max_tokens")}

        def chosen(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.apply_settings(settings)

        self.push_screen(SettingsScreen(self.chat.settings, defaults), chosen)

    def apply_settings(self, settings: ChatSettings) -> None:
        self.chat.apply(settings)
        self.update_status()

    def action_system(self, text: str = "") -> None:
        if not text:
            self.action_settings()
            return
        self.apply_settings(ChatSettings(**{**vars(self.chat.settings), "system": text}))
        self.notify("System prompt set", timeout=2)

    def action_think(self, switch: str = "") -> None:
        """Thinking on or off ("on", "off"; nothing: the other way round)."""
        if switch not in ("", "on", "off"):
            self.notify("/think takes on or off", severity="error")
            return
        on = switch == "on" if switch else not self.chat.settings.think
        self.apply_settings(ChatSettings(**{**vars(self.chat.settings), "think": on}))
        self.notify(f"Thinking {'on' if on else 'off'}", timeout=2)

    async def action_regenerate(self) -> None:
        if self.generating or self.pending is not None:
            return
        await self.regenerate()

    def action_edit_last(self) -> None:
        if self.generating or self.pending is not None:
            return
        user = next((m for m in reversed(self.chat.messages) if m.role == "user"), None)
        if user is None:
            self.notify("No message to edit yet")
            return
        self.editing = True
        box = self.query_one(ChatInput)
        box.text = user.message["content"]
        box.move_cursor(box.document.end)
        box.focus()
        self.refresh_bindings()
        self.notify("Editing your last message: Enter sends it again, Esc cancels", timeout=4)

    @on(ChatInput.EditLast)
    def edit_last_requested(self) -> None:
        self.action_edit_last()

    def action_copy_code(self) -> None:
        fences = self.chat_view.query(CopyableFence)
        if not fences:
            self.notify("No code block in this chat yet")
            return
        copy_code(fences.last())

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = THEMES["light"] if self.current_theme.dark else THEMES["dark"]

    def watch_theme(self, theme: str) -> None:
        name = next((k for k, v in THEMES.items() if v == theme), None)
        if name is not None:
            self.store.put("theme", name)

    def action_rename(self, title: str = "") -> None:
        if not title:
            self.notify("/rename takes the new title", severity="error")
        else:
            self.chat.rename(title)
            self.title = self.chat.title

    async def action_clear(self) -> None:
        await self.wait_idle()
        self.chat.clear()
        if self.chat.session is not None:
            await self.engine.run(self.chat.session.reset)
        await self.show_chat()

    def action_export(self, target: str = "") -> None:
        """Save the chat as Markdown: to `target` (a file, or a folder), else into the working folder."""
        if not self.chat.id:
            self.notify("Nothing to export yet")
            return
        slug = re.sub(r"[^\w-]+", "-", self.chat.title.lower()).strip("-") or "chat"
        path = Path(target).expanduser() if target else Path.cwd() / f"{slug}.md"
        if path.is_dir():
            path = path / f"{slug}.md"
        tmp = path.with_name(f".{path.name}.partial")
        try:
            tmp.write_text(to_markdown(self.chat.row, self.chat.messages), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            self.notify(f"{path}: {e.strerror}", title="Could not export", severity="error", markup=False)
            return
        self.notify(f"Saved to {path}", title="Exported", markup=False)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for command in COMMANDS:
            if command.name not in ("stop", "quit"):  # Textual's palette has its own Quit
                yield SystemCommand(command.title, palette_help(command), lambda c=command: self.run_command(c))

    async def run_command(self, command: Command, argument: str = "") -> None:
        """Run a command of `COMMANDS`, with the argument its slash command was given."""
        action = getattr(self, f"action_{command.action}")
        result = action(argument) if command.argument else action()
        if inspect.isawaitable(result):
            await result

    # --- exit ---------------------------------------------------------------------------

    async def action_quit(self) -> None:
        if self.pending is not None:  # the message stays in the chat, unanswered
            self.pending = None
            await self._drop_messages(len(self.chat.messages) - 1)
        await self.stop_generation()
        self.exit()

    async def on_unmount(self) -> None:
        self.engine_stopped = self.engine.close()
        self.store.close()


_CHAT_ACTIONS = {b.action for b in ChatApp.BINDINGS} - {"quit"}

_EMPTY = (
    "Ask anything.\n\n"
    "Enter sends · Shift+Enter new line · Esc stops an answer\n"
    "/help lists the commands · Ctrl+P opens the command palette · Ctrl+Q quits"
)
