"""`mlxqwen convert --batch FILE.toml`: many conversions, one manifest entry per output.

    [defaults]               # applies to every entry whose output format takes the option
    output_dir = "models"    # entries without `output` write output_dir/NAME-RECIPE
    group_size = 64          # MLX entries only: GGUF has no group size

    [[convert]]
    source = "Qwen/Qwen3.6-27B"
    recipe = "4bit"

    [[convert]]
    source = "Qwen/Qwen3.6-27B"
    recipe = "mixed_4_8"

Entry keys: `source` (required), `output`, `to`, `revision`, `force`, and the options of the
output format (`mlxqwen convert --help` lists them); the quality report (`eval`) is on unless
an entry turns it off. Relative paths are relative to the manifest. An output that exists is
complete, since outputs are renamed into place only when finished: it is skipped unless its
entry sets `force = true`. A failed entry does not stop the others."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from mlxqwen.display import format_size
from mlxqwen.errors import ConvertError
from mlxqwen.library import disk_size

from .api import convert, default_output, format_options, label, output_format
from .format import ConvertResult
from .progress import add_task

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

_ENTRY_KEYS = ("source", "output", "output_dir", "to", "revision", "force")


@dataclass
class Entry:
    name: str  # the source as the manifest writes it
    source: str
    output: Path
    to: str = "mlx"
    revision: str | None = None
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    entry: Entry
    status: str  # converted, skipped or failed
    result: ConvertResult | None = None
    error: str = ""
    seconds: float = 0.0


def load_manifest(path: Path) -> list[Entry]:
    try:
        manifest = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConvertError(f"{path}: cannot be read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConvertError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(set(manifest) - {"defaults", "convert"})
    if unknown:
        raise ConvertError(f"{path}: unknown table {unknown[0]!r} (expected [defaults] and [[convert]] entries)")
    raw_entries = manifest.get("convert")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ConvertError(f"{path}: no [[convert]] entries")
    defaults = manifest.get("defaults", {})
    entries, used = [], set(_ENTRY_KEYS)
    for i, raw in enumerate(raw_entries):
        # a default applies to the entries whose format takes it (group_size: MLX, quant: GGUF)
        to = raw.get("to", defaults.get("to", "mlx"))
        takes = set(_ENTRY_KEYS) | set(output_format(to, f"{path}: entry {i + 1}").options)
        used |= takes
        entries.append(_entry(path, i + 1, {**{k: v for k, v in defaults.items() if k in takes}, **raw}))
    unknown = sorted(set(defaults) - used)
    if unknown:
        raise ConvertError(f"{path}: [defaults]: unknown option {unknown[0]!r} (no entry's output format takes it)")
    return entries


def _entry(manifest: Path, number: int, raw: dict[str, Any]) -> Entry:
    where = f"{manifest}: entry {number}"
    if not raw.get("source"):
        raise ConvertError(f"{where}: missing 'source'")
    base = manifest.parent
    name = source = str(raw["source"])
    if (base / source).expanduser().is_dir():
        source = str(base / source)
    to = raw.get("to", "mlx")
    options = {k: v for k, v in raw.items() if k not in _ENTRY_KEYS}
    if "eval" in output_format(to, where).options:
        options.setdefault("eval", True)
    format_options(to, options, where)  # reject bad options before anything runs
    if raw.get("output"):
        output = base / Path(raw["output"]).expanduser()
    else:
        output = base / Path(raw.get("output_dir", ".")).expanduser() / default_output(source, to, **options)
    return Entry(name, source, output, to, raw.get("revision"), bool(raw.get("force", False)), options)


def run_batch(manifest: Path, progress: Progress) -> list[Outcome]:
    entries = load_manifest(manifest)
    overall = add_task(progress, f"batch {manifest.name}", len(entries))
    outcomes = []
    for i, entry in enumerate(entries):
        progress.update(overall, info=f"{i}/{len(entries)}: {entry.output.name}")
        outcomes.append(_run(entry, progress))
        progress.advance(overall)
    progress.update(overall, info=f"{len(entries)}/{len(entries)}")
    return outcomes


def _run(entry: Entry, progress: Progress) -> Outcome:
    if entry.output.exists() and not entry.force:
        return Outcome(entry, "skipped")
    before = set(progress.task_ids)
    start = time.perf_counter()
    try:
        result = convert(
            entry.source,
            entry.output,
            to=entry.to,
            revision=entry.revision,
            force=entry.force,
            progress=progress,
            **entry.options,
        )
        return Outcome(entry, "converted", result, seconds=result.seconds)
    except ConvertError as e:
        return Outcome(entry, "failed", error=str(e), seconds=time.perf_counter() - start)
    except Exception as e:  # an unexpected failure of one entry must not stop the others
        return Outcome(entry, "failed", error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
    finally:
        for task in set(progress.task_ids) - before:
            progress.remove_task(task)


def summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="conversions")
    for column in ("source", "recipe", "output", "size", "bits/weight", "KL", "top-1", "time", "status"):
        table.add_column(
            column, justify="right" if column in ("size", "bits/weight", "KL", "top-1", "time") else "left"
        )
    for o in outcomes:
        r, q = o.result, o.result.quality if o.result else None
        recipe = r.recipe if r else label(o.entry.to, **o.entry.options)
        size = r.size_bytes if r else disk_size(o.entry.output) if o.status == "skipped" else None
        status = {"converted": Text("ok", "green"), "skipped": Text("skipped (exists)", "yellow")}.get(
            o.status, Text(f"failed: {o.error}", "red")
        )
        table.add_row(
            o.entry.name,
            recipe,
            _shown(o.entry.output),
            format_size(size) if size is not None else "-",
            f"{r.bits_per_weight:.2f}" if r else "-",
            f"{q.kl:.4f}" if q else "-",
            f"{q.top1:.1%}" if q else "-",
            f"{o.seconds:.0f} s" if o.status != "skipped" else "-",
            status,
        )
    return table


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
