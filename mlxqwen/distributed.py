"""One model across several processes (several Macs), with MLX's distributed backend.

Started by MLX's launcher (`mlx.launch --hosts a,b -- $(which mlxqwen) generate MODEL ...`), every
process (rank) loads its part of the model:
- pipeline parallelism: each rank holds a contiguous run of layers, about its share of the memory
  of all ranks (`split`); the first also holds the embeddings, the last the final norm and the
  head. A step's activations go from rank to rank (`mx.distributed.send` / `recv`) and the last
  rank sends the logits to rank 0;
- tensor parallelism: every rank holds all layers with a share of their attention heads, MLP
  columns, Gated DeltaNet heads and experts' columns; the partial outputs are summed across ranks
  (`all_sum`, MLX's sharded linear layers), so every rank computes the logits.
Each rank reads only the tensors of its part (the checkpoint's tensors are loaded lazily). Rank 0
runs the engine and talks to the user; it tells the others each call it makes on the model
(`tell` / `hear`), which they make on their part (`backends.mlx.DistributedRuntime`). A rank that
stops ends the run on every rank: a step's collective that fails, or waits past
`MLXQWEN_DISTRIBUTED_TIMEOUT` seconds (default 60), ends its process with one line, and the
launcher ends the others."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .config import ModelConfig
from .errors import ModelLoadError

PARALLEL = ("pipeline", "tensor")
TIMEOUT_ENV = "MLXQWEN_DISTRIBUTED_TIMEOUT"


def launched() -> bool:
    """Whether MLX's launcher started this process (it sets MLX_RANK)."""
    return "MLX_RANK" in os.environ


@cache
def group() -> mx.distributed.Group | None:
    """The processes `mlx.launch` started, or None for a process alone."""
    if not launched():
        return None
    g = mx.distributed.init()
    return g if g.size() > 1 else None


def rank() -> int:
    g = group()
    return g.rank() if g is not None else 0


# A follower that fails waits this long before saying why: when rank 0 fails the same way (a bad
# argument) it says so first and the launcher ends the others, so the user reads one line; when
# the follower fails alone (its part does not load), its line comes after the wait.
FOLLOWER_GRACE_S = 3.0


@contextlib.contextmanager
def quiet_followers() -> Iterator[io.StringIO | None]:
    """Rank 0 alone talks to the user: the others' output is dropped while this runs, except what
    they write to stderr, held (yielded; None on rank 0) for `report_follower_failure`."""
    if rank() == 0:
        yield None
        return
    held = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(held):
        yield held


def report_follower_failure(held: io.StringIO) -> None:
    """Say on stderr why this follower failed, after FOLLOWER_GRACE_S (it ends sooner, quietly, when
    the launcher ends it because rank 0 failed first)."""
    time.sleep(FOLLOWER_GRACE_S)
    sys.stderr.write(held.getvalue())
    sys.stderr.flush()


def split(costs: list[int], memories: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of `costs` (bytes per item, in order), one per rank, each about the rank's
    share of `memories`; every run holds at least one item."""
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    bounds = [0]
    for r in range(1, len(memories)):
        target = prefix[-1] * sum(memories[:r]) / sum(memories)
        lowest, highest = bounds[-1] + 1, len(costs) - (len(memories) - r)
        bounds.append(min(range(lowest, highest + 1), key=lambda b: abs(prefix[b] - target)))
    bounds.append(len(costs))
    return list(zip(bounds, bounds[1:], strict=False))


def layer_costs(model: nn.Module) -> list[int]:
    """Bytes of what a pipeline splits, in order: the embeddings, each layer, the final norm and head
    (a tied head is the embeddings again)."""
    from .memory import weight_bytes

    inner, outer = _decoder(model)
    embed = weight_bytes(inner.embed_tokens)
    head = weight_bytes(inner.norm) + (weight_bytes(outer.lm_head) if "lm_head" in outer else embed)
    return [embed, *(weight_bytes(layer) for layer in inner.layers), head]


def pipeline_layers(costs: list[int], memories: list[int]) -> list[tuple[int, int]]:
    """Each rank's layers [start, end) for `layer_costs` and each rank's memory: the embeddings
    count with the first layer, the head with the last."""
    layers = costs[1:-1]
    if len(layers) < len(memories):
        raise ModelLoadError(f"a pipeline over {len(memories)} ranks needs as many layers, not {len(layers)}")
    layers[0] += costs[0]
    layers[-1] += costs[-1]
    return split(layers, memories)


def _decoder(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (`QwenModel`) and the causal LM that holds it and the head."""
    outer = model.language_model if "language_model" in model else model
    return outer.model, outer


class Placement:
    """This rank's part of the model and how its steps meet the other ranks'."""

    parallel: str

    def __init__(self, g: mx.distributed.Group):
        self.group = g
        self.rank, self.size = g.rank(), g.size()
        self.timeout = float(os.environ.get(TIMEOUT_ENV, 60))
        self._since: float | None = None  # when the step being evaluated began
        self._what = ""
        threading.Thread(target=self._watch, name="mlxqwen-watchdog", daemon=True).start()

    def select(self, model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The checkpoint's (sanitized) tensors this rank holds; the model is cut to them."""
        return weights

    def shard(self, model: nn.Module) -> None:
        """Split the loaded (unfused) weights; the part of this rank stays."""

    def rank_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of what this rank holds, for its memory estimate."""
        return cfg

    def logits(self, model: nn.Module, hidden: mx.array) -> mx.array:
        """The logits for the model's output `hidden` (those rank 0 uses)."""
        return model.head(hidden)

    def gather(self, values: list[int], what: str) -> list[list[int]]:
        """Every rank's `values`, by rank."""
        gathered = mx.distributed.all_gather(mx.array([values], dtype=mx.int64), group=self.group)
        return self.evaluate(gathered, what).tolist()

    def agree(self, values: list[int]) -> list[int]:
        """The least of each value over all ranks (limits every rank must share)."""
        return [min(column) for column in zip(*self.gather(values, "agreeing on limits"), strict=True)]

    def tell(self, numbers: list[int]) -> None:
        """Rank 0: send `numbers` to every other rank (which `hear` them)."""
        self._broadcast(numbers)

    def hear(self) -> list[int]:
        """The other ranks: what rank 0 tells next (waiting for it as long as it takes)."""
        return self._broadcast(None)

    def _broadcast(self, numbers: list[int] | None) -> list[int]:
        # all_sum with zeros from every rank but 0: MLX's collectives have no broadcast
        count = mx.array([len(numbers) if numbers is not None else 0], dtype=mx.int32)
        count = mx.distributed.all_sum(count, group=self.group)
        if numbers is None:  # the wait for rank 0's next call: no timeout
            try:
                mx.eval(count)
            except RuntimeError as e:
                self._end(f"waiting for rank 0, the connection to it was lost ({e})")
        else:
            self.evaluate(count, "telling the other ranks")
        values = mx.array(numbers if numbers is not None else [0] * count.item(), dtype=mx.int32)
        return self.evaluate(mx.distributed.all_sum(values, group=self.group), "sharing rank 0's call").tolist()

    def evaluate(self, arrays, what: str):
        """Evaluate a step (which meets the other ranks); a peer lost or a wait past the timeout ends
        this process with one line."""
        self._since, self._what = time.monotonic(), what
        try:
            mx.eval(arrays)
        except RuntimeError as e:
            self._end(f"{what}, the connection to {self._peers()} was lost ({e})")
        finally:
            self._since = None
        return arrays

    def _peers(self) -> str:
        if self.size == 2:
            return f"rank {1 - self.rank}"
        return f"rank {(self.rank - 1) % self.size} or {(self.rank + 1) % self.size}"

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self._end(f"{self._what}, {self._peers()} did not answer in {self.timeout:g} s")

    def _end(self, why: str) -> None:
        line = f"mlxqwen: rank {self.rank} of {self.size}: {why}; it stopped or cannot be reached: ending the run\n"
        os.write(sys.__stderr__.fileno(), line.encode())
        os._exit(1)


class Pipeline(Placement):
    parallel = "pipeline"

    def __init__(self, g: mx.distributed.Group, dtype: mx.Dtype):
        super().__init__(g)
        self.dtype = dtype
        self.start = self.end = 0
        self.runs: list[tuple[int, int]] = []

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def select(self, model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        from .memory import memory_budget

        inner, outer = _decoder(model)
        memories = [m for (m,) in self.gather([memory_budget()], "sharing memory sizes")]
        self.runs = pipeline_layers(layer_costs(model), memories)
        self.start, self.end = self.runs[self.rank]
        prefix = next(path for path, m in model.named_modules() if m is inner) + "."
        tied = "lm_head" not in outer
        kept = {}
        for key, value in weights.items():
            if key.startswith(prefix + "layers."):
                index, rest = key[len(prefix + "layers.") :].split(".", 1)
                if self.start <= int(index) < self.end:
                    kept[f"{prefix}layers.{int(index) - self.start}.{rest}"] = value
            elif key.startswith(prefix + "embed_tokens."):
                if self.first or (self.last and tied):
                    kept[key] = value
            elif self.last:  # the final norm and the head
                kept[key] = value
        inner.layers = inner.layers[self.start : self.end]
        if not (self.first or (self.last and tied)):
            del inner.embed_tokens
        if not self.last:
            del inner.norm
            if not tied:
                del outer.lm_head
        inner.pipeline = self
        return kept

    def rank_config(self, cfg: ModelConfig) -> ModelConfig:
        return pipeline_config(cfg, self.start, self.end)

    def receive(self, tokens: mx.array, inner: nn.Module, hidden_size: int) -> mx.array:
        """The input of this rank's layers: the embeddings, or the previous rank's output."""
        if self.first:
            return inner.embed_tokens(tokens)
        return mx.distributed.recv((*tokens.shape, hidden_size), self.dtype, self.rank - 1, group=self.group)

    def send(self, h: mx.array, inner: nn.Module) -> mx.array:
        """The output of the model (the last rank), or this rank's output on its way to the next."""
        if self.last:
            return inner.norm(h)
        return mx.distributed.send(h, self.rank + 1, group=self.group)

    def logits(self, model: nn.Module, hidden: mx.array) -> mx.array:
        """On rank 0 the logits, which the last rank sends it; elsewhere what this rank sends."""
        if self.last:
            logits = model.head(hidden)
            return logits if self.first else mx.distributed.send(logits, 0, group=self.group)
        if not self.first:
            return hidden
        shape = (*hidden.shape[:-1], model.config.vocab_size)
        # once this rank's output is sent: the last rank's logits depend on it
        return mx.depends(mx.distributed.recv(shape, self.dtype, self.size - 1, group=self.group), hidden)


class Tensor(Placement):
    parallel = "tensor"

    def shard(self, model: nn.Module) -> None:
        from .models.moe import MLP, SparseMoeBlock

        cfg, n = model.config, self.size
        sizes = {
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
        }
        if cfg.layer_types:
            sizes["linear_num_key_heads"] = cfg.linear_num_key_heads
        if cfg.num_experts:
            sizes["moe_intermediate_size"] = cfg.moe_intermediate_size
            if cfg.shared_expert_intermediate_size:
                sizes["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        for name, value in sizes.items():
            if value % n:
                raise ModelLoadError(
                    f"tensor parallelism over {n} ranks needs {name} ({value}) to be a multiple of {n}: "
                    "use --parallel pipeline (parallel='pipeline')"
                )
        g = self.group
        for layer in model.layers:
            if layer.is_linear:
                _shard_gated_delta(layer.linear_attn, g)
            else:
                _shard_attention(layer.self_attn, g)
            mlp = layer.mlp
            if isinstance(mlp, MLP):
                _shard_mlp(mlp, g, gather=True)
            elif isinstance(mlp, SparseMoeBlock):
                for name in ("gate_proj", "up_proj"):
                    shard_inplace(mlp.switch_mlp[name], "all-to-sharded", group=g)
                shard_inplace(mlp.switch_mlp.down_proj, "sharded-to-all", group=g)
                hidden = mlp.switch_mlp._sizes[0] // n
                mlp.switch_mlp._sizes = (hidden, hidden)
                if "shared_expert" in mlp:
                    _shard_mlp(mlp.shared_expert, g, gather=False)
                mlp.sum_over = g  # one sum of the experts' and the shared expert's parts

    def rank_config(self, cfg: ModelConfig) -> ModelConfig:
        return tensor_config(cfg, self.size)


def pipeline_config(cfg: ModelConfig, start: int, end: int) -> ModelConfig:
    """The config of layers start..end-1 (for their memory estimate)."""
    return replace(cfg, num_hidden_layers=end - start, layer_types=cfg.layer_types[start:end])


def tensor_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """The config of 1/n of every layer's heads (for its memory estimate)."""
    return replace(
        cfg,
        num_attention_heads=max(cfg.num_attention_heads // n, 1),
        num_key_value_heads=max(cfg.num_key_value_heads // n, 1),
        linear_num_key_heads=cfg.linear_num_key_heads // n,
        linear_num_value_heads=cfg.linear_num_value_heads // n,
    )


@dataclass(frozen=True)
class Part:
    """What one host would hold of a model split across hosts."""

    host: str
    what: str  # "layers 0-31" or "1/2 of every layer"
    weights: int  # bytes
    config: ModelConfig  # of what it holds, for the memory estimate
    sent: int  # bytes it sends per token decoded (one sequence)


def plan(
    model: nn.Module, cfg: ModelConfig, hosts: list[str], memories: list[int], parallel: str, dtype: mx.Dtype
) -> list[Part]:
    """How `model` (built lazily, weights not read) would be split across `hosts` with these memories,
    computing in `dtype`."""
    costs, n = layer_costs(model), len(hosts)
    hidden = cfg.hidden_size * dtype.size
    if parallel == "pipeline":
        runs = pipeline_layers(costs, memories)
        layers = [costs[1 + i] for i in range(len(costs) - 2)]
        parts = []
        for r, (host, (a, b)) in enumerate(zip(hosts, runs, strict=True)):
            weights = sum(layers[a:b]) + (costs[0] if r == 0 else 0) + (costs[-1] if r == n - 1 else 0)
            what = f"layers {a}-{b - 1}" if b - a > 1 else f"layer {a}"
            sent = hidden if r < n - 1 else cfg.vocab_size * dtype.size  # to the next rank; the logits to rank 0
            parts.append(Part(host, what, weights, pipeline_config(cfg, a, b), sent))
        return parts
    shared = costs[0] + costs[-1]  # embeddings and head stay whole on every host
    weights = shared + sum(costs[1:-1]) // n
    # two sums per layer (the mixer's output, the MLP's), each sending 2 (n - 1) / n of it from every rank
    sent = 2 * cfg.num_hidden_layers * 2 * (n - 1) * hidden // n
    return [Part(host, f"1/{n} of every layer", weights, tensor_config(cfg, n), sent) for host in hosts]


def read_hosts(hosts: str | None, hostfile: str | None) -> list[tuple[str, float | None]]:
    """Host names and their memory in GB (None: unknown), from `--hosts a,b` or from mlx.launch's
    hostfile (a JSON list, or {"hosts": [...]}, of {"ssh": NAME, ...}) where each host may also
    give "memory_gb" (mlx.launch ignores it)."""
    if hostfile is None:
        names = [h.strip() for h in (hosts or "").split(",") if h.strip()]
        if len(names) < 2:
            raise ValueError(f"--hosts {hosts!r}: name two hosts or more, separated by commas")
        return [(name, None) for name in names]
    try:
        data = json.loads(Path(hostfile).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{hostfile}: not a readable JSON hostfile ({e})") from None
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or len(entries) < 2:
        raise ValueError(f"{hostfile}: expected a list of two hosts or more (as mlx.launch's --hostfile)")
    out = []
    for i, entry in enumerate(entries):
        name = entry.get("ssh") if isinstance(entry, dict) else None
        memory = entry.get("memory_gb") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not (memory is None or (isinstance(memory, (int, float)) and memory > 0)):
            raise ValueError(f'{hostfile}: host {i} needs an "ssh" name and, if any, a positive "memory_gb"')
        out.append((name, memory))
    return out


def _shard_attention(attn: nn.Module, g: mx.distributed.Group) -> None:
    n = g.size()
    for name in ("q_proj", "k_proj", "v_proj"):
        attn[name] = shard_linear(attn[name], "all-to-sharded", group=g)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=g)
    attn.n_heads //= n
    attn.n_kv_heads //= n
    attn._sizes = tuple(s // n for s in attn._sizes)


def _shard_mlp(mlp: nn.Module, g: mx.distributed.Group, gather: bool) -> None:
    """Columns of gate/up and rows of down; `gather`: down sums the parts across ranks itself."""
    for name in ("gate_proj", "up_proj"):
        mlp[name] = shard_linear(mlp[name], "all-to-sharded", group=g)
    if gather:
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=g)
    else:
        shard_inplace(mlp.down_proj, "sharded-to-all", group=g)
    mlp._sizes = tuple(s // g.size() for s in mlp._sizes)


def _shard_gated_delta(gdn: nn.Module, g: mx.distributed.Group) -> None:
    """Whole key heads, with the value heads they serve."""
    n, r = g.size(), g.rank()
    qkv = [gdn.key_size, 2 * gdn.key_size]  # q | k | v, each split
    shard_inplace(gdn.in_proj_qkv, "all-to-sharded", segments=qkv, group=g)
    shard_inplace(gdn.conv1d, lambda _path, _w: (0, qkv), group=g)
    for name in ("in_proj_z", "in_proj_b", "in_proj_a"):
        shard_inplace(gdn[name], "all-to-sharded", group=g)
    gdn.dt_bias = mx.contiguous(mx.split(gdn.dt_bias, n)[r])
    gdn.A_log = mx.contiguous(mx.split(gdn.A_log, n)[r])
    gdn.out_proj = shard_linear(gdn.out_proj, "sharded-to-all", group=g)
    gdn.n_k_heads //= n
    gdn.n_v_heads //= n
    gdn.key_size //= n
    gdn.value_size //= n
    gdn.conv_dim //= n
    gdn._in_sizes = tuple(s // n for s in gdn._in_sizes)


def placement(parallel: str, dtype: mx.Dtype) -> Placement | None:
    """This process's part when `mlx.launch` started several (None: it runs the whole model)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: choose {' or '.join(PARALLEL)}")
    g = group()
    if g is None:
        return None
    return Pipeline(g, dtype) if parallel == "pipeline" else Tensor(g)
