"""How figures are shown to people, the same in every command and in the chat app: sizes
(`format_size`) and a generation's statistics (`format_stats`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from .events import Stats


def format_size(n: float, binary: bool = False) -> str:
    """`2.1 MB`, `215 MB`, `15.5 GB`: decimal units, as disks count; binary=True gives MiB and
    GiB, as memory counts."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    value, unit = float(n), 0
    while value >= base and unit < len(units) - 1:
        value, unit = value / base, unit + 1
    if unit == 0:
        return f"{int(value)} B"
    return f"{value:.1f} {units[unit]}" if value < 100 else f"{value:.0f} {units[unit]}"


def format_stats(stats: Stats | Mapping[str, Any], detail: bool = False) -> str:
    """`49 tokens, 130.6 tok/s · TTFT 0.08 s · peak 2.1 MiB`, then `MTP 30/41 drafts accepted` when the
    model's MTP head guessed tokens; detail adds the prompt first
    (`prompt 20 tokens, 257.0 tok/s · reply 49 tokens, ...`) and why generation ended last (`stop`)."""
    s = asdict(stats) if isinstance(stats, Stats) else stats
    reply = f"{s['generated_tokens']} tokens, {s['generation_tps']:.1f} tok/s"
    parts = (
        [f"prompt {s['prompt_tokens']} tokens, {s['prompt_tps']:.1f} tok/s", f"reply {reply}"] if detail else [reply]
    )
    parts.append(f"TTFT {s['ttft']:.2f} s")
    if s.get("peak_memory"):
        parts.append(f"peak {format_size(s['peak_memory'], binary=True)}")
    if s.get("draft_tokens"):  # speculative decoding with the MTP head
        parts.append(f"MTP {s['accepted_tokens']}/{s['draft_tokens']} drafts accepted")
    if detail:
        parts.append(s["finish_reason"])
    return " · ".join(parts)
