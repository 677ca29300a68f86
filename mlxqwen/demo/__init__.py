"""The demo model that ships with mlxqwen: a tiny Qwen3.5 (Gated DeltaNet + gated attention,
MTP head) trained on arithmetic, unit conversions and a table of facts. One directory holds
both forms the converter made: MLX 4-bit (the directory itself) and GGUF (`model.gguf`, which
llama.cpp runs), so `mlxqwen.load` picks the one that runs best here. It lets a new user, and
every test, chat at once without a download. The script that rebuilds it lives in the source
checkout, outside the package: `python -m demo.train`."""

from __future__ import annotations

from pathlib import Path

NAME = "mlxqwen-demo"
DEMO_DIR = Path(__file__).parent / NAME
GGUF_QUANT = "Q4_K_M"
_FILES = {"mlx": ".", "gguf": "model.gguf"}


def model_path(kind: str = "mlx") -> Path:
    """The shipped demo model: its directory (kind="mlx", the MLX 4-bit form, which also holds
    the GGUF) or the GGUF file (kind="gguf")."""
    if kind not in _FILES:
        raise ValueError(f"kind={kind!r}: the demo model comes as 'mlx' or 'gguf'")
    path = (DEMO_DIR / _FILES[kind]).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: the demo model is missing; rebuild it with python -m demo.train")
    return path
