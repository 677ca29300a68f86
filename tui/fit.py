"""Will a local model fit in this machine's memory? The estimate `mlxqwen.load` checks."""

from __future__ import annotations

from pathlib import Path

from mlxqwen import memory


def memory_plan(path: Path, context: int = 4096) -> memory.MemoryEstimate:
    """The estimate for the MLX model in `path` at `context` tokens (4096 is the least
    `mlxqwen.load` accepts). The model is built lazily, reading no weight; as any MLX work
    of the app, run it on the engine thread."""
    from mlxqwen.loader import default_dtype, load_model

    model, config = load_model(path, lazy=True)
    context = min(context, config.max_position_embeddings)
    return memory.estimate(config, context, weights=memory.weight_bytes(model), dtype=default_dtype())
