"""`pull`: a Hugging Face Qwen model into the library, ready to run.

1. Read the model's config.json (a few KB) and check that the model, as converted (or as
   published, for an MLX repo), will fit in this machine's memory, before downloading
   gigabytes (`--force` skips the refusal).
2. Download and convert it with the converter (`mlxqwen.convert`, which also says how
   it would convert the model: `planned_model`) into the library
   (`mlxqwen.library.models_dir()`), as NAME-RECIPE. A repo that is already MLX-quantized
   (e.g. mlx-community's) is downloaded into the Hugging Face cache and used as it is.
3. Report how much context fits, measured on the converted model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from . import memory
from .backends.mlx import model_sizing
from .checkpoint import read_json
from .config import ModelConfig, parse_config
from .errors import ModelLoadError, option
from .hub import REPO_ID, snapshot
from .library import models_dir
from .loader import load_model


class PullError(ModelLoadError):
    pass


@dataclass(frozen=True)
class Pulled:
    path: Path
    name: str  # as `mlxqwen list` shows it
    action: str  # what pull did: "converted", "already in the library", "downloaded" (an MLX repo)
    plan: memory.MemoryEstimate  # at the longest context that fits (or 4096 tokens if none does)


def _fit(model: nn.Module, cfg: ModelConfig) -> tuple[memory.MemoryEstimate, bool]:
    """The estimate at the longest context that fits, and whether the least context worth running fits."""
    sizing = model_sizing(model, cfg)
    longest, least = memory.largest_context(sizing), memory.minimum_context(sizing)
    return sizing.estimate(max(longest, least)), longest >= least


def pull(
    source: str,
    *,
    recipe: str = "4bit",
    revision: str | None = None,
    force: bool = False,
    progress=None,
) -> Pulled:
    """Download (a Hub repo id) or read (a local Hugging Face directory) `source`, convert it
    into the library and check it fits. Raises PullError / ConvertError / ModelLoadError with
    a one-line message."""
    from mlxqwen.convert import convert
    from mlxqwen.convert.api import default_output, format_options
    from mlxqwen.convert.mlx import planned_model
    from mlxqwen.convert.source import resolve_source

    format_options("mlx", {"recipe": recipe})  # an unknown recipe fails before any download
    local = Path(source).expanduser()
    is_local = local.is_dir()
    if not is_local and not REPO_ID.match(source):
        raise PullError(f"{source}: no such directory, and not a Hub repo id (like Qwen/Qwen3.6-27B)")
    config_file = (local if is_local else snapshot(source, ["config.json"], revision)) / "config.json"
    raw = read_json(config_file)
    if not raw:
        raise PullError(f"{config_file}: missing or empty; pull takes Hugging Face Qwen model directories")
    cfg = parse_config(raw, str(config_file))

    quantized = cfg.mlx_quantization  # an MLX repo: used as it is, its own bits give the size
    if quantized and is_local:
        raise PullError(f"{local}: already an MLX model; run it directly (mlxqwen chat {local})")
    # the model as the converter would write it (as published, for an MLX repo), from its config alone
    bits = f"{quantized['bits']}bit" if quantized else recipe
    plan, fits = _fit(planned_model(cfg, bits, quantized.get("group_size", 64) if quantized else 64), cfg)
    if not fits and not force:
        how = "as published" if quantized else f"converted with recipe {recipe}"
        raise PullError(
            f"{source}: {how} the model {plan.verdict}; choose a smaller model or recipe "
            f"({option('recipe', '3bit')}), or pass {option('force')} to pull it anyway"
        )
    if quantized:
        path = resolve_source(source, revision, progress).path
        model, cfg = load_model(path, lazy=True)
        return Pulled(path, source, "downloaded", _fit(model, cfg)[0])
    output = models_dir() / default_output(local if is_local else source, "mlx", recipe=recipe).name
    if output.exists() and not force:
        model, cfg = load_model(output, lazy=True)
        return Pulled(output, output.name, "already in the library", _fit(model, cfg)[0])
    result = convert(str(local) if is_local else source, output, recipe=recipe, revision=revision, force=force,
                     progress=progress)  # fmt: skip
    model, cfg = load_model(result.output, lazy=True)
    return Pulled(result.output, result.output.name, "converted", _fit(model, cfg)[0])
