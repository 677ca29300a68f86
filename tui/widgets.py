"""The chat's widgets: the message input, messages as they stream in, and the status line."""

from __future__ import annotations

import json
from dataclasses import dataclass

from textual import events
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.highlight import highlight
from textual.message import Message
from textual.widgets import Collapsible, Markdown, ProgressBar, Static, TextArea
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from mlxqwen import TextDelta, ThinkingDelta, ToolCall
from mlxqwen.display import format_stats

from .store import StoredMessage, status_label


class ChatInput(TextArea):
    """Multi-line message input: Enter sends, Shift+Enter (or Ctrl+J) starts a new line,
    Up in an empty input edits the last message."""

    DEFAULT_CSS = """
    ChatInput { height: auto; max-height: 12; min-height: 3; }
    """

    @dataclass
    class Submitted(Message):
        text: str

    class EditLast(Message):
        pass

    def __init__(self, **kwargs) -> None:
        super().__init__(
            soft_wrap=True,
            show_line_numbers=False,
            highlight_cursor_line=False,
            placeholder="Message (Enter sends · Shift+Enter new line · / commands)",
            **kwargs,
        )

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
        elif event.key in ("shift+enter", "alt+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
        elif event.key == "up" and not self.text:
            event.stop()
            event.prevent_default()
            self.post_message(self.EditLast())
        else:
            await super()._on_key(event)


class CopyableFence(MarkdownFence):
    """A code block that copies itself to the clipboard when clicked."""

    def on_mount(self) -> None:
        self.tooltip = "Click to copy"

    def on_click(self) -> None:
        copy_code(self)


def copy_code(fence: MarkdownFence) -> None:
    fence.app.copy_to_clipboard(fence.code)
    lines = fence.code.count("\n") + 1
    fence.app.notify(f"Copied {lines} line{'s' if lines > 1 else ''} of code", timeout=2)


class ChatMarkdown(Markdown):
    BLOCKS = {**Markdown.BLOCKS, "fence": CopyableFence, "code_block": CopyableFence}


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        margin: 1 0 0 0; padding: 0 1;
        border-left: thick $primary; background: $boost;
    }
    """

    def __init__(self, stored: StoredMessage) -> None:
        super().__init__(Content(stored.message["content"]))
        self.stored = stored


class ToolCallBlock(Static):
    DEFAULT_CSS = """
    ToolCallBlock {
        margin: 1 0 0 0; padding: 0 1;
        border: round $accent; border-title-color: $accent;
    }
    """

    def __init__(self, name: str, arguments: dict) -> None:
        super().__init__(highlight(json.dumps(arguments, indent=2, ensure_ascii=False), language="json"))
        self.call_name = name
        self.border_title = f"tool call: {name}"


class AssistantMessage(Vertical):
    """A reply: its thinking (shown live, folded once the answer starts), then its answer
    text and tool calls in the order they came, then a line with its status and stats.
    Text streams through Textual's MarkdownStream: only the last block is parsed again."""

    DEFAULT_CSS = """
    AssistantMessage { height: auto; margin: 1 0 0 0; }
    AssistantMessage Collapsible { margin: 0; padding: 0; border: none; }
    AssistantMessage Collapsible Markdown { color: $text-muted; }
    AssistantMessage ChatMarkdown { margin: 0; padding: 0 1; }
    AssistantMessage .meta { color: $text-muted; padding: 0 1; }
    AssistantMessage .meta.stopped { color: $warning; }
    """

    def __init__(self, stored: StoredMessage, live: bool = False) -> None:
        """live: the reply is being generated; its parts come through `add`."""
        super().__init__()
        self.stored = stored
        self.live = live
        self.thinking: Collapsible | None = None
        self.streams: dict[Markdown, MarkdownStream] = {}
        self.segment: Markdown | None = None  # the answer text being streamed into
        self.meta = Static(classes="meta")

    def compose(self):
        if not self.live:
            m = self.stored.message
            if m.get("reasoning_content"):
                thinking = ChatMarkdown(_line_breaks(m["reasoning_content"]))
                yield Collapsible(thinking, title="Thinking", collapsed=True)
            if m["content"]:
                yield ChatMarkdown(m["content"])
            for call in m.get("tool_calls", ()):
                yield ToolCallBlock(call["function"]["name"], call["function"]["arguments"])
        yield self.meta

    def on_mount(self) -> None:
        if not self.live:
            self.show_meta(self.stored.status, self.stored.stats)

    def show_meta(self, status: str, stats: dict | None) -> None:
        parts = [] if status == "done" else [status_label(status)]
        if stats and stats.get("generated_tokens"):
            parts.append(format_stats(stats))
        self.meta.update(" · ".join(parts))
        self.meta.set_class(status != "done", "stopped")

    async def _mount_part(self, widget) -> None:
        await self.mount(widget, before=self.meta)

    async def _write(self, markdown: Markdown, text: str) -> None:
        if markdown not in self.streams:
            self.streams[markdown] = Markdown.get_stream(markdown)
        await self.streams[markdown].write(text)

    async def _end_stream(self, markdown: Markdown | None) -> None:
        if markdown is not None and markdown in self.streams:
            await self.streams.pop(markdown).stop()

    async def add(self, event: ThinkingDelta | TextDelta | ToolCall) -> None:
        if isinstance(event, ThinkingDelta):
            if self.thinking is None:
                self.thinking = Collapsible(ChatMarkdown(), title="Thinking…", collapsed=False)
                await self._mount_part(self.thinking)
            await self._write(self.thinking.query_one(ChatMarkdown), _line_breaks(event.text))
            return
        await self._fold_thinking()
        if isinstance(event, TextDelta):
            if self.segment is None:
                self.segment = ChatMarkdown()
                await self._mount_part(self.segment)
            await self._write(self.segment, event.text)
        else:
            await self._end_stream(self.segment)
            self.segment = None
            await self._mount_part(ToolCallBlock(event.name, event.arguments))

    async def _fold_thinking(self) -> None:
        if self.thinking is not None and not self.thinking.collapsed:
            await self._end_stream(self.thinking.query_one(ChatMarkdown))
            self.thinking.collapsed = True
            self.thinking.title = "Thinking"

    async def finish(self, status: str, stats: dict | None) -> None:
        for markdown in list(self.streams):
            await self._end_stream(markdown)
        if self.thinking is not None:
            self.thinking.title = "Thinking"
        self.show_meta(status, stats)


class StatusLine(Horizontal):
    """model · backend · context used/limit · tok/s · time to first token · peak memory."""

    DEFAULT_CSS = """
    StatusLine { height: 1; background: $panel; color: $text-muted; padding: 0 1; }
    StatusLine ProgressBar { width: 16; display: none; }
    StatusLine.loading ProgressBar { display: block; }
    StatusLine ProgressBar Bar { width: 14; }
    StatusLine #status-text { width: 1fr; }
    StatusLine.error #status-text { color: $error; }
    """

    def compose(self):
        yield ProgressBar(total=None, show_percentage=False, show_eta=False)
        yield Static(id="status-text", markup=False)

    def show(self, text: str, *, loading: bool = False, error: bool = False) -> None:
        self.set_class(loading, "loading")
        self.set_class(error, "error")
        self.query_one("#status-text", Static).update(text)


def _line_breaks(thinking: str) -> str:
    """Thinking as Markdown that keeps its lines: a model thinks in lines (steps, sums), which
    Markdown would join into one paragraph; a line ending in two spaces breaks there."""
    return thinking.replace("\n", "  \n")
