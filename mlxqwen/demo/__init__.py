"""The demo model that ships with mlxqwen: a tiny Qwen3.5 (Gated DeltaNet + gated attention,
MTP head) trained by `python -m mlxqwen.demo.train` on arithmetic, unit conversions and a
table of facts, in two forms made by the converter: MLX 4-bit and GGUF. It lets a new user,
and every test, chat at once without a download."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent
NAME = "mlxqwen-demo"
GGUF_QUANT = "Q4_K_M"
_FILES = {"mlx": "model-mlx-4bit", "gguf": "model.gguf"}


def model_path(kind: str = "mlx") -> Path:
    """The shipped demo model: the MLX 4-bit directory (kind="mlx") or the GGUF file (kind="gguf")."""
    if kind not in _FILES:
        raise ValueError(f"kind={kind!r}: the demo model comes as 'mlx' or 'gguf'")
    path = DEMO_DIR / _FILES[kind]
    if not path.exists():
        raise FileNotFoundError(f"{path}: the demo model is missing; rebuild it with python -m mlxqwen.demo.train")
    return path
