"""Run in a fresh process by test_memory: load a model with `mlxqwen.load(PATH, backend=BACKEND,
max_context=CONTEXT)`, fill the whole context (a prompt of CONTEXT - 1 tokens, then one
more), and print the growth of the process's peak resident memory over what it held before
loading (with the runtime's library imported: the process, not the model), in bytes. A fresh
process, so that nothing freed by an earlier load is reused."""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import numpy as np

import mlxqwen
from mlxqwen.backends import sizing


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident() -> int:
    """VmHWM: the peak of this process image (getrusage's ru_maxrss also counts the parent's
    memory, which a forked child holds until it executes Python)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main(path: str, backend: str, context: int) -> None:
    sizing(path, backend)  # imports the runtime
    before = resident()
    runtime = mlxqwen.load(path, backend=backend, max_context=context).runtime
    seq = runtime.new_sequence()
    tokens = [int(t) for t in np.random.RandomState(0).randint(0, 1000, context)]
    for i in range(0, context - 1, runtime.prefill_chunk):
        runtime.prefill(seq, tokens[i : min(i + runtime.prefill_chunk, context - 1)])
    mx.eval(runtime.decode([seq], mx.array(tokens[-1:])))
    print(peak_resident() - before)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
