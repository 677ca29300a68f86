import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
mx.random.seed(0)

try:  # llama-cpp-python's own `Llama` (a reference in tests) loads with mlxqwen's model parameters
    import llama_cpp.llama_cpp

    from mlxqwen.backends.llama_cpp import model_params

    llama_cpp.llama_cpp.llama_model_default_params = model_params
except ImportError:
    pass


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (a tiny random Hugging Face checkpoint with the real tokenizer, its F32 GGUF)."""
    pytest.importorskip("gguf")
    from checkpoints import ARCHS, build_reference, save_checkpoint, to_gguf
    from test_gguf import _LINEAR, VOCAB

    out = {}
    for arch in ARCHS:
        tmp = tmp_path_factory.mktemp(arch)
        overrides = _LINEAR if arch.startswith("qwen3_5") else {}
        src = save_checkpoint(build_reference(arch, vocab_size=VOCAB, **overrides), tmp / "hf")
        out[arch] = src, to_gguf(src, tmp / "model-F32.gguf", "F32")
    return out
