"""The chunked Gated DeltaNet recurrence equals the token-by-token one, including strong decay."""

import mlx.core as mx
import numpy as np
import pytest

from mlxqwen.models.gated_delta import _chunked, _recurrent


@pytest.mark.parametrize("length,decay", [(64, 1.0), (130, 0.1), (200, 8.0)])
def test_chunked_equals_recurrent(length, decay):
    mx.random.seed(length)
    B, H, Dk, Dv = 2, 3, 32, 16

    def unit(x):
        return x / mx.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(mx.random.normal((B, length, H, Dk))) * Dk**-0.5
    k = unit(mx.random.normal((B, length, H, Dk)))
    v = mx.random.normal((B, length, H, Dv))
    g = -mx.random.uniform(0, decay, (B, length, H))
    beta = mx.random.uniform(shape=(B, length, H))
    state = mx.random.normal((B, H, Dk, Dv)) * 0.1
    out_a, (state_a,) = _recurrent(q, k, v, g, beta, state)
    out_b, state_b = _chunked(q, k, v, g, beta, state)
    np.testing.assert_allclose(np.array(out_b), np.array(out_a), atol=1e-5 * float(mx.abs(out_a).max()))
    np.testing.assert_allclose(np.array(state_b), np.array(state_a), atol=1e-5 * float(mx.abs(state_a).max()))
