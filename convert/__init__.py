"""The converter: Hugging Face Qwen checkpoints to MLX (mlx-lm's format, quantized) or to GGUF
(llama.cpp), streaming tensor by tensor. One entry point, `convert`, and one error type,
`ConvertError`:

from mlxqwen.convert import convert
convert("Qwen/Qwen3.6-27B", "Qwen3.6-27B-4bit", recipe="4bit", eval=True)
convert("Qwen/Qwen3.6-27B", to="gguf", quant="Q4_K_M")
"""

from mlxqwen.errors import ConvertError

from .api import FORMATS, convert
from .batch import run_batch
from .format import ConvertResult
from .quality import Quality
from .recipes import RECIPES

__all__ = ["FORMATS", "RECIPES", "ConvertError", "ConvertResult", "Quality", "convert", "run_batch"]
