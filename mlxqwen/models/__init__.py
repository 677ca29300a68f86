from .model import CausalLM, Qwen3_5, build_model, fuse

__all__ = ["CausalLM", "Qwen3_5", "build_model", "fuse"]
