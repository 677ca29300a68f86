"""The model card (README.md) of a converted directory: where it came from, how it was made,
its size, and the quality report when one was run."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from mlxqwen import __version__
from mlxqwen.display import format_size

from .quality import Quality
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
