import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
mx.random.seed(0)

try:  # llama-cpp-python's own `Llama` (a reference in tests) loads with mlxqwen's model parameters
    import llama_cpp.llama_cpp

    from mlxqwen.backends.llama_cpp import model_params

    llama_cpp.llama_cpp.llama_model_default_params = model_params
except ImportError:
    pass
