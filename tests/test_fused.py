"""Fused projections (q/k/v, gate/up, Gated DeltaNet's input projections) give the logits of the
separate ones, for every architecture, unquantized and quantized (whole runs and partial ones),
through prefill, one-token steps and few-token (verify) steps; files keep mlx-lm's layout."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import ARCHS, build_reference, save_checkpoint
from mlx.utils import tree_flatten
from mlxqwen.convert import convert

from mlxqwen import memory
from mlxqwen.checkpoint import read_weights
from mlxqwen.loader import load_model

TOKENS = [int(t) for t in np.random.RandomState(5).randint(0, 512, 80)]
# weights -> (converter recipe, compute dtype). mixed_4_8 gives v_proj / in_proj_qkv 8 bits in layers
# 2 and 3, so q and k fuse apart from v, and in_proj_qkv, in_proj_z and in_proj_a/b (never quantized)
# are three runs.
WEIGHTS = {"bf16": (None, mx.bfloat16), "4bit": ("4bit", mx.float32), "mixed": ("mixed_4_8", mx.float32)}


def run(model) -> np.ndarray:
    """Logits of a prefill longer than the fused-matmul limit, three one-token steps and a 3-token step."""
    cache = model.make_cache()
    parts = [TOKENS[:70], *[[t] for t in TOKENS[70:73]], TOKENS[73:76]]
    return np.concatenate([np.array(model(mx.array([p]), cache=cache)[0].astype(mx.float32)) for p in parts])


@pytest.fixture(scope="module", params=[(arch, w) for arch in ARCHS for w in WEIGHTS], ids=str)
def loaded(request, tmp_path_factory):
    arch, weights = request.param
    recipe, dtype = WEIGHTS[weights]
    if "moe" in arch and dtype == mx.bfloat16 and mx.default_device() == mx.cpu:
        dtype = mx.float32  # MLX's gather_mm takes float32 only on a CPU
    tmp = tmp_path_factory.mktemp(f"{arch}-{weights}")
    path = save_checkpoint(build_reference(arch), tmp / "hf")
    if recipe:
        path = convert(path, tmp / "mlx", recipe=recipe, group_size=32).output
    fused, _ = load_model(path, dtype=dtype)
    separate, _ = load_model(path, dtype=dtype, fused=False)
    return path, fused, separate, dtype


def test_fused_logits_equal_separate(loaded):
    _, fused, separate, dtype = loaded
    expected, got = run(separate), run(fused)
    tol = 1e-6 if dtype == mx.float32 else 1e-2  # equal here; a GPU may sum matmuls of other shapes in another order
    assert np.abs(got - expected).max() / np.abs(expected).max() < tol


def test_fusion_is_in_memory_only(loaded):
    path, fused, separate, _ = loaded
    names = {k for k, _ in tree_flatten(separate.parameters())}
    on_disk = set(separate.sanitize(read_weights(path)[0]))
    assert names == on_disk
    assert {k for k, _ in tree_flatten(fused.parameters())} < names  # each run kept under its first name
    assert memory.weight_bytes(fused) == memory.weight_bytes(separate)


def test_runs_of_alike_projections_fuse():
    """A run breaks where the storage changes: q and k fuse while v has more bits."""
    import mlx.nn as nn

    from mlxqwen.models.fused import fuse, project

    layer = nn.Module()
    layer.q_proj, layer.k_proj, layer.v_proj = (nn.Linear(64, n, bias=True) for n in (32, 16, 16))
    nn.quantize(layer, group_size=32, bits=4, class_predicate=lambda p, _: p != "v_proj")
    nn.quantize(layer, group_size=32, bits=8, class_predicate=lambda p, m: p == "v_proj")
    x = mx.random.normal((2, 3, 64))
    names = ("q_proj", "k_proj", "v_proj")
    expected = [layer[n](x) for n in names]
    fuse(layer, names)
    assert "k_proj" not in layer and layer.q_proj.weight.shape[0] == 48 and layer.v_proj.bits == 8
    for got, want in zip(project(layer, names, (32, 16, 16), x), expected, strict=True):
        assert mx.array_equal(got, want)
