"""Run under `mlx.launch` (or alone, for the reference), one of:
- `logits MODEL OUT PARALLEL`: a model's logits through the MLX runtime as the engine drives it (two
  prompts read, one past Gated DeltaNet's 64-token chunks, then one-token steps of both at once),
  written by rank 0 to OUT (.npy); each rank writes its peak memory and weight bytes to OUT.RANK.json;
- `forever MODEL DIR`: each rank writes its pid to DIR/RANK.pid, then rank 0 decodes one token after
  another (touching DIR/decoding first) until it is stopped."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxqwen import distributed, memory
from mlxqwen.backends import mlx

TOKENS = [int(t) for t in np.random.RandomState(5).randint(0, 512, 80)]


def logits(model: str, out: str, parallel: str) -> None:
    runtime = mlx.load(Path(model), dtype=mx.float32, parallel=parallel)
    if distributed.rank() > 0:  # as mlxqwen.load does on the other ranks
        runtime.follow()
        report(runtime, out, parallel)
        return
    a, b = runtime.new_sequence(), runtime.new_sequence()
    runtime.prefill(a, TOKENS[:70])
    runtime.prefill(b, TOKENS[:30])
    rows = []
    for i in range(70, 76):
        step = runtime.decode([a, b], mx.array([TOKENS[i], TOKENS[i - 40]]))
        rows.append(np.array(step.astype(mx.float32)))
    np.save(out, np.stack(rows))
    runtime.close()
    report(runtime, out, parallel)


def report(runtime: mlx.MLXRuntime, out: str, parallel: str) -> None:
    """At the end of each rank: its peak memory, weight bytes and (pipeline) layers, to OUT.RANK.json."""
    info = {"peak": mx.get_peak_memory(), "weights": memory.weight_bytes(runtime.model)}
    if isinstance(runtime, mlx.DistributedRuntime) and parallel == "pipeline":
        info["layers"] = [runtime.placement.start, runtime.placement.end]
    Path(f"{out}.{distributed.rank()}.json").write_text(json.dumps(info))


def forever(model: str, directory: str) -> None:
    Path(directory, f"{distributed.rank()}.pid").write_text(str(os.getpid()))
    runtime = mlx.load(Path(model), dtype=mx.float32)
    if distributed.rank() > 0:
        runtime.follow()
        return
    seq = runtime.new_sequence()
    runtime.prefill(seq, TOKENS[:8])
    token = mx.array([TOKENS[8]])
    Path(directory, "decoding").touch()
    while True:
        if seq.length > 200:
            seq = runtime.new_sequence()
            runtime.prefill(seq, TOKENS[:8])
        token = mx.argmax(runtime.decode([seq], token), axis=-1)


if __name__ == "__main__":
    {"logits": logits, "forever": forever}[sys.argv[1]](*sys.argv[2:])
