"""Dialogs: the model picker, the chat list, per-chat settings, help, and small prompts."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Markdown, Static, Switch, TextArea

from mlxqwen.display import format_size
from mlxqwen.library import FORMAT_LABELS, LocalModel, local_models

from .commands import help_markdown
from .store import ChatSettings, ChatStore

_DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} > .dialog {{
    width: 90%; max-width: 120; height: auto; max-height: 90%;
    border: thick $primary; background: $surface; padding: 1 2;
}}
{name} .title {{ text-style: bold; margin-bottom: 1; }}
{name} .hint {{ color: $text-muted; margin-top: 1; }}
{name} DataTable {{ height: auto; max-height: 20; }}
"""


def dialog_css(name: str) -> str:
    return _DIALOG_CSS.format(name=name)


class ModelPicker(ModalScreen[Path | None]):
    """The local models (`mlxqwen.library`) with their size and whether they fit in this
    machine's memory."""

    DEFAULT_CSS = dialog_css("ModelPicker")
    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, current: Path | None, estimate: Callable[[Path], Awaitable[Any]]) -> None:
        super().__init__()
        self.current = current
        self.estimate = estimate
        self.models: list[LocalModel] = []
        # Held here: the model search may finish before or after the children are mounted.
        self.table = DataTable(cursor_type="row", zebra_stripes=True)
        self.hint = Static("Looking for models…", id="picker-hint", classes="hint")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Choose a model", classes="title")
            yield self.table
            yield self.hint

    def on_mount(self) -> None:
        table = self.table
        table.add_column("Model", key="name")
        table.add_column("Format", key="format")
        table.add_column("Weights", key="weights")
        table.add_column("Size", key="size")
        table.add_column("Memory at 4k", key="fit", width=20)
        table.add_column("Found in", key="where")
        self.find_models()

    @work(thread=True, exit_on_error=False)
    def find_models(self) -> None:
        models = local_models()
        self.app.call_from_thread(self.show_models, models)

    def show_models(self, models: list[LocalModel]) -> None:
        self.models = models
        table = self.table
        for m in models:
            mark = "● " if self.current is not None and m.path.resolve() == self.current.resolve() else ""
            table.add_row(
                Text(mark + m.name),
                FORMAT_LABELS[m.format],
                m.weights,
                format_size(m.size_bytes),
                "llama.cpp" if m.format == "gguf" else "…",
                _WHERE.get(m.where, m.where),
                key=str(m.path),
            )
        hint = self.hint
        if models:
            hint.update("Enter opens the model · Esc closes · /model PATH opens any other")
            self.estimate_all()
        else:
            hint.update(
                "No local model found. Get one with `mlxqwen pull Qwen/Qwen3.6-27B`, "
                "or open a model directory with /model PATH."
            )
        table.focus()

    @work(exclusive=True, group="estimate")
    async def estimate_all(self) -> None:
        table = self.table
        for m in self.models:
            try:
                plan = await self.estimate(m.path)
                need = f"{format_size(plan.total, binary=True)}/{format_size(plan.budget, binary=True)}"
                verdict = f"[green]✓[/] {need}" if plan.fits else f"[red]✗ {need}[/]"
            except Exception:  # a model the loader refuses: opening it shows why
                verdict = "[red]unreadable[/]"
            table.update_cell(str(m.path), "fit", verdict)

    @on(DataTable.RowSelected)
    def choose(self, event: DataTable.RowSelected) -> None:
        self.dismiss(Path(event.row_key.value))


_WHERE = {"library": "library", "hf-cache": "HF cache", "demo": "built in"}


class ChatList(ModalScreen[tuple[str, int | None] | None]):
    """Saved chats: open, rename, delete, new. Dismisses with ("open", id), ("new", None) or None."""

    DEFAULT_CSS = dialog_css("ChatList")
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
    ]

    def __init__(self, store: ChatStore, current: int | None) -> None:
        super().__init__()
        self.store = store
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Chats", classes="title")
            yield DataTable(cursor_type="row", zebra_stripes=True)
            yield Static("Enter opens · n new · r rename · d delete · Esc closes", classes="hint")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Chat", key="title")
        table.add_column("Model", key="model")
        table.add_column("Updated", key="updated")
        self.refresh_rows()
        table.focus()

    def refresh_rows(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for chat in self.store.chats():
            mark = "● " if chat.id == self.current else ""
            model = Path(chat.model).name if chat.model else ""
            updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.updated))
            table.add_row(Text(mark + chat.title), Text(model), updated, key=str(chat.id))

    def selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    @on(DataTable.RowSelected)
    def open_chat(self, event: DataTable.RowSelected) -> None:
        self.dismiss(("open", int(event.row_key.value)))

    def action_new(self) -> None:
        self.dismiss(("new", None))

    def action_rename(self) -> None:
        chat_id = self.selected()
        if chat_id is None:
            return
        chat = self.store.chat(chat_id)

        def rename(title: str | None) -> None:
            if title:
                self.store.rename(chat_id, title)
                self.refresh_rows()

        self.app.push_screen(TextPrompt("Rename chat", chat.title), rename)

    def action_delete(self) -> None:
        chat_id = self.selected()
        if chat_id is None:
            return

        def delete(yes: bool | None) -> None:
            if yes:
                self.store.delete(chat_id)
                self.refresh_rows()

        self.app.push_screen(Confirm(f"Delete “{self.store.chat(chat_id).title}”?"), delete)


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """This chat's system prompt, thinking and sampling."""

    DEFAULT_CSS = (
        dialog_css("SettingsScreen")
        + """
    SettingsScreen TextArea { height: 5; }
    SettingsScreen Horizontal { height: auto; margin-top: 1; }
    SettingsScreen Horizontal > Label { width: 14; }
    SettingsScreen #think-row > Label { padding: 1 0; }
    SettingsScreen Horizontal > Input { width: 1fr; }
    SettingsScreen #buttons { align-horizontal: right; }
    SettingsScreen Button { margin-left: 2; }
    """
    )
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, settings: ChatSettings, defaults: dict[str, Any]) -> None:
        super().__init__()
        self.settings = settings
        self.defaults = defaults

    def _number(self, name: str, kind: str) -> Input:
        value = getattr(self.settings, name)
        default = self.defaults.get(name)
        placeholder = f"model default ({default})" if default is not None else "model default"
        return Input("" if value is None else str(value), placeholder=placeholder, type=kind, id=name, compact=True)

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog"):
            yield Label("Chat settings", classes="title")
            yield Label("System prompt")
            yield TextArea(self.settings.system, id="system", soft_wrap=True)
            with Horizontal(id="think-row"):
                yield Label("Thinking")
                yield Switch(self.settings.think, id="think")
            with Horizontal():
                yield Label("Temperature")
                yield self._number("temperature", "number")
            with Horizontal():
                yield Label("Top-p")
                yield self._number("top_p", "number")
            with Horizontal():
                yield Label("Max tokens")
                yield self._number("max_tokens", "integer")
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Save (Ctrl+S)", variant="primary", id="save", compact=True)

    def _read(self) -> ChatSettings:
        def number(name: str, cast: type, ok: Callable[[Any], bool], rule: str) -> Any:
            text = self.query_one(f"#{name}", Input).value.strip()
            if not text:
                return None
            value = cast(text)
            if not ok(value):
                raise ValueError(f"{name.replace('_', '-')} must be {rule}")
            return value

        return ChatSettings(
            system=self.query_one("#system", TextArea).text.strip(),
            think=self.query_one("#think", Switch).value,
            temperature=number("temperature", float, lambda v: v >= 0, "0 or more"),
            top_p=number("top_p", float, lambda v: 0 < v <= 1, "above 0 and at most 1"),
            max_tokens=number("max_tokens", int, lambda v: v >= 1, "at least 1"),
        )

    def action_save(self) -> None:
        try:
            settings = self._read()
        except ValueError as e:
            self.notify(str(e), severity="error", markup=False)
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#save")
    def save_pressed(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def cancel_pressed(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = dialog_css("HelpScreen")
    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog"):
            yield Markdown(help_markdown())


class TextPrompt(ModalScreen[str | None]):
    DEFAULT_CSS = dialog_css("TextPrompt")
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield Input(self.value)

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class Confirm(ModalScreen[bool]):
    DEFAULT_CSS = dialog_css("Confirm") + "Confirm Horizontal { height: auto; align-horizontal: right; }"
    BINDINGS = [Binding("escape,n", "dismiss(False)", "No"), Binding("y", "dismiss(True)", "Yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="title")
            with Horizontal():
                yield Button("No", id="no")
                yield Button("Yes", variant="error", id="yes")

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")
