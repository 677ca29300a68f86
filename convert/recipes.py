"""Quantization recipes: which weights are quantized, and with how many bits.

Every recipe is affine quantization (mlx-lm's format) with one group size. Whatever the
recipe, these stay in the unquantized dtype:
- norms, biases, `A_log`, `dt_bias`, conv1d (not matrices a quantized layer can hold);
- any matrix whose input dimension the group size does not divide;
- MoE routers (`mlp.gate`), `shared_expert_gate`, and Gated DeltaNet's `in_proj_a` / `in_proj_b`,
  which produce the routing scores, the shared expert's gate and the decay / write strength of
  the recurrent state: small errors there flip experts or compound over the sequence, and
  together they are well under 1 % of the weights (mlx-lm keeps routers at 8 bits; our
  measurements are in the converter's README section).

Mixed recipes give more bits to the tensors llama.cpp's Q4_K_M (and mlx-lm's mixed_*
recipes) single out, plus the token embedding: embeddings and lm_head everywhere, and
the value path (`v_proj`, Gated DeltaNet's fused `in_proj_qkv`) and `down_proj` in the
first and last eighth of the layers and every third layer between them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
Quant = tuple[int, int]  # (bits, group size)
QUANTS: tuple[Quant, ...] = tuple((b, g) for b in BITS for g in GROUP_SIZES)

_KEEP = (".mlp.gate", ".shared_expert_gate", ".in_proj_a", ".in_proj_b", ".conv1d")
_ALWAYS_HIGH = ("embed_tokens", "lm_head")
_LAYER_HIGH = ("v_proj", "in_proj_qkv", "down_proj")
_DECODER_LAYER = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int  # 0: nothing is quantized
    high_bits: int = 0  # mixed recipes: bits of the sensitive tensors

    @property
    def description(self) -> str:
        if not self.bits:
            return "not quantized"
        if not self.high_bits:
            return f"{self.bits}-bit affine"
        sensitive = "embeddings, lm_head, v_proj/in_proj_qkv/down_proj of key layers"
        return f"{self.bits}-bit affine; {sensitive} {self.high_bits}-bit"

    def bits_for(self, name: str, shape: tuple[int, ...], group_size: int, num_layers: int) -> int:
        """Bits for the tensor `name` (a `.weight`), or 0 to leave it unquantized."""
        if not self.bits or not quantizable(name, shape, group_size):
            return 0
        if self.high_bits and _sensitive(name.removesuffix(".weight"), num_layers):
            return self.high_bits
        return self.bits


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether the tensor `name` may be quantized with `group_size` (see the module's docstring)."""
    path = name.removesuffix(".weight")
    return path != name and len(shape) >= 2 and shape[-1] % group_size == 0 and not path.endswith(_KEEP)


def _sensitive(path: str, num_layers: int) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in _ALWAYS_HIGH:
        return True
    layer = _DECODER_LAYER.search(path)
    if layer is None or leaf not in _LAYER_HIGH:
        return False
    i, eighth = int(layer.group(1)), num_layers // 8
    return i < eighth or i >= 7 * num_layers // 8 or (i - eighth) % 3 == 2


RECIPES: dict[str, Recipe] = {
    "none": Recipe("none", 0),
    **{f"{b}bit": Recipe(f"{b}bit", b) for b in BITS},
    **{f"mixed_{lo}_{hi}": Recipe(f"mixed_{lo}_{hi}", lo, hi) for lo, hi in ((2, 6), (3, 6), (4, 6), (4, 8))},
}
DEFAULT_RECIPE = "4bit"


def quants_for(name: str, shape: tuple[int, ...]) -> list[Quant]:
    """The settings the tensor `name` may take (empty: it stays unquantized)."""
    return [q for q in QUANTS if quantizable(name, shape, q[1])]


def quantized_bytes(shape: tuple[int, ...], quant: Quant, itemsize: int) -> int:
    """Bytes of mx.quantize's output: packed weights, then a scale and a bias per group."""
    size, (bits, group) = math.prod(shape), quant
    return size * bits // 8 + 2 * (size // group) * itemsize
