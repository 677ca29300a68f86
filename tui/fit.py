"""Will a local model fit in this machine's memory? The estimate `mlxqwen.load` checks."""

from __future__ import annotations

from pathlib import Path

from mlxqwen import memory


def memory_plan(path: Path, context: int = memory.MIN_CONTEXT) -> memory.MemoryEstimate:
    """The estimate for the model in `path` (a directory or a GGUF file), on the runtime
    `mlxqwen.load` would choose, at `context` tokens (at most the model's own). The model is
    described without reading a weight; as any MLX work of the app, run it on the engine thread."""
    from mlxqwen.backends import sizing

    plan = sizing(path)[1]
    return plan.estimate(min(context, plan.limit))
