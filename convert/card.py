"""The model card (README.md) of a converted directory: where it came from, how it was made,
its size, and the quality report when one was run."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from mlxqwen import __version__
from mlxqwen.display import format_size

from .quality import Quality
from .recipes import Quant
from .source import Source


def write_card(
    directory: Path,
    title: str,
    source: Source,
    recipe: str,
    size_bytes: int,
    shards: int,
    bits_per_weight: float,
    quality: Quality | None,
    sensitivity: dict[str, dict[Quant, float]] | None = None,
    quants: dict[str, Quant] | None = None,
) -> None:
    data = ModelCardData(
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=["mlx", "mlxqwen"],
        base_model=source.repo_id,
    )
    if source.repo_id:
        link = f"[{source.repo_id}](https://huggingface.co/{source.repo_id})"
        origin = f"{link} at revision `{source.revision}`" if source.revision else link
    else:
        origin = f"`{source.path}`"
    lines = [
        f"# {title}",
        "",
        f"Converted to MLX from {origin} with mlxqwen {__version__}.",
        "",
        "| | |",
        "|---|---|",
        f"| Recipe | {recipe} |",
        f"| Size | {format_size(size_bytes)} in {shards} shard{'s' if shards > 1 else ''} |",
        f"| Bits per weight | {bits_per_weight:.2f} |",
    ]
    if quality is not None:
        lines += [
            "",
            f"## Quality against the source ({quality.tokens} tokens of mlxqwen's calibration text)",
            "",
            "| KL divergence (nats/token) | Top-1 agreement | Perplexity: source | Perplexity: converted |",
            "|---|---|---|---|",
            f"| {quality.kl:.4f} | {quality.top1:.1%} | {quality.ppl_source:.3f} | {quality.ppl_converted:.3f} |",
        ]
    if sensitivity:
        lines += ["", *sensitivity_table(sensitivity, quants or {})]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import mlxqwen",
        "",
        'llm = mlxqwen.load("path/to/this/directory")',
        "```",
        "",
        "The directory is in mlx-lm's format, so `mlx_lm.load` reads it too.",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(directory / "README.md")


def sensitivity_table(
    sensitivity: dict[str, dict[Quant, float]], quants: dict[str, Quant], rows: int = 40
) -> list[str]:
    """Markdown: the tensors that quantization costs the most, most sensitive first: the setting each
    got and the KL (nats/token, estimated on the calibration text) it costs there and at 4-bit g64."""
    reference = (4, 64)
    order = sorted(sensitivity, key=lambda n: -max(sensitivity[n].get(reference, 0.0), sensitivity[n][quants[n]]))
    lines = [
        f"## Sensitivity ({min(rows, len(order))} most sensitive of {len(order)} tensors)",
        "",
        "| tensor | bits | group | KL at its setting | KL at 4-bit g64 |",
        "|---|---|---|---|---|",
    ]
    for name in order[:rows]:
        bits, group = quants[name]
        at_reference = sensitivity[name].get(reference)
        lines.append(
            f"| `{name.removesuffix('.weight')}` | {bits} | {group} | {sensitivity[name][quants[name]]:.2e} | "
            + (f"{at_reference:.2e} |" if at_reference is not None else "- |")
        )
    return lines
