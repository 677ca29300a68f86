"""Every command of the chat app, declared once: its slash command, key, footer label, command
palette entry and help line all come from `COMMANDS`. A command runs the app's action of the
same purpose (`ChatApp.action_<action>`); one that takes an argument from its slash command
(`/think off`) gets it as a string, and runs without it from its key or the palette."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Command:
    name: str  # the slash command: /name
    title: str  # the command palette's entry
    help: str  # what it does, for /help and the palette
    action: str  # the app's action_<action>
    key: str | None = None  # its key binding, in Textual's names ("ctrl+n")
    footer: str | None = None  # its label in the footer; None: not shown there
    argument: str = ""  # what the slash command takes ("[on|off]"); empty: nothing

    @property
    def key_label(self) -> str:
        return "+".join(part.capitalize() if len(part) > 1 else part.upper() for part in self.key.split("+"))


COMMANDS: tuple[Command, ...] = (
    Command("stop", "Stop", "stop the answer (or cancel an edit)", "stop", "escape", "Stop"),
    Command("new", "New chat", "start a new chat", "new_chat", "ctrl+n", "New"),
    Command("chats", "Chats", "list, open, rename and delete chats", "chats", "ctrl+o", "Chats"),
    Command("model", "Model", "choose a model, or open the one named", "model", "ctrl+l", "Model", "[NAME or PATH]"),
    Command(
        "settings",
        "Settings",
        "system prompt, thinking, temperature, top-p, max tokens",
        "settings",
        "ctrl+s",
        "Settings",
    ),  # fmt: skip
    Command(
        "system",
        "System prompt",
        "set this chat's system prompt (no text: open the settings)",
        "system",
        argument="[TEXT]",
    ),  # fmt: skip
    Command("think", "Thinking on/off", "think before answering, or not", "think", "ctrl+t", "Think", "[on|off]"),
    Command("retry", "Regenerate", "draw the last answer again", "regenerate", "ctrl+r", "Retry"),
    Command("edit", "Edit last message", "change your last message (or press Up in an empty input)", "edit_last"),
    Command("copy", "Copy code", "copy the last code block (or click a code block)", "copy_code", "ctrl+b"),
    Command("rename", "Rename chat", "rename this chat", "rename", argument="TITLE"),
    Command("export", "Export to Markdown", "save this chat as a Markdown file", "export", argument="[FILE]"),
    Command("clear", "Clear chat", "remove this chat's messages", "clear"),
    Command("theme", "Light/dark theme", "switch between the light and dark theme", "toggle_theme"),
    Command("help", "Help", "the keys and commands", "help", "f1", "Help"),
    Command("quit", "Quit", "leave (chats are saved as you go)", "quit", "ctrl+q", "Quit"),
)

SLASH = {command.name: command for command in COMMANDS}


def bindings() -> list[Binding]:
    """The app's key bindings: every command that has a key; those with a footer label show there."""
    return [
        Binding(c.key, c.action, c.footer or c.title, show=c.footer is not None, priority=c.name == "quit")
        for c in COMMANDS
        if c.key
    ]


def palette_help(command: Command) -> str:
    return command.help[0].upper() + command.help[1:] + (f" ({command.key_label})" if command.key else "")


def help_markdown() -> str:
    lines = [
        "# mlxqwen chat",
        "",
        "Type a message and press **Enter**; **Shift+Enter** (or Ctrl+J) starts a new line.",
        "Answers stream in; **Esc** stops one and keeps what was written so far.",
        "",
    ]
    for c in COMMANDS:
        usage = f"`/{c.name}{' ' + c.argument if c.argument else ''}`"
        lines.append(f"- {usage}{f' (**{c.key_label}**)' if c.key else ''}: {c.help}")
    lines += ["", "**Ctrl+P** opens the command palette: every command, and the themes. Chats are saved as you go."]
    return "\n".join(lines)
