"""Conversion speed and peak memory: `mlxqwen convert` against `mlx_lm.convert` on the same input.

Builds a synthetic Qwen3-shaped bf16 checkpoint of a few GB (random weights, written shard by
shard so that building it never holds the whole model), converts it to 4-bit (group 64) with
both tools, each in its own process, and reports wall time, throughput (source GB / s) and
peak RSS, plus whether the two outputs hold the same quantized tensors. A second mlxqwen run
with small output shards shows what bounds its memory: one output shard plus the tensor being
converted, whatever the model's size.

    python benchmarks/bench_convert.py [--layers 20] [--shard-gb 0.7] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.table import Table

TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"

# Qwen3-1.7B's shapes (tied embeddings); the layer count sets the size.
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, i, d = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["head_dim"]
    q, kv = CONFIG["num_attention_heads"] * d, CONFIG["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (CONFIG["vocab_size"], h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def build_checkpoint(path: Path, layers: int, shard_bytes: int) -> None:
    """Write a random bf16 checkpoint one shard at a time."""
    path.mkdir(parents=True)
    shard: dict[str, mx.array] = {}
    weight_map: dict[str, str] = {}
    total = 0

    def write() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for key, shape in tensor_shapes(layers).items():
        value = mx.random.normal(shape) * (1.0 if len(shape) == 1 else 0.02)
        value = value.astype(mx.bfloat16)
        mx.eval(value)
        if shard and sum(v.nbytes for v in shard.values()) + value.nbytes > shard_bytes:
            write()
        shard[key] = value
        total += value.nbytes
    write()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, path / name)


def measure(command: list[str]) -> tuple[float, int]:
    """Wall time (s) and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command[2]} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors equal, tensors compared) over the names both outputs hold."""
    equal = compared = 0
    theirs: dict[str, mx.array] = {}
    for file in b.glob("*.safetensors"):
        theirs |= mx.load(str(file))
    for file in sorted(a.glob("*.safetensors")):
        ours = mx.load(str(file))
        for name in ours.keys() & theirs.keys():
            compared += 1
            equal += bool(mx.array_equal(ours[name], theirs[name]))
    return equal, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20: 2.6 GB bf16)")
    parser.add_argument("--shard-gb", type=float, default=0.7, help="input shard size, GB")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # internal: write the checkpoint
    args = parser.parse_args()
    if args.build:
        build_checkpoint(Path(args.build), args.layers, int(args.shard_gb * 1e9))
        return
    console = Console()

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        src = tmp / "hf"
        console.print(f"building a {args.layers}-layer Qwen3-shaped bf16 checkpoint in {src} ...")
        # in a child process: a child forked from a big parent would report the parent's RSS
        build = [
            sys.executable,
            __file__,
            "--build",
            str(src),
            "--layers",
            str(args.layers),
            "--shard-gb",
            str(args.shard_gb),
        ]
        subprocess.run(build, check=True)
        source_bytes = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        largest_shard = max(f.stat().st_size for f in src.glob("*.safetensors"))
        for file in src.glob("*.safetensors"):  # same page-cache state for both runs
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass

        python = sys.executable
        ours = [python, "-m", "mlxqwen.cli", "convert", str(src)]
        runs = {
            "mlxqwen convert": (ours + ["-o", str(tmp / "ours")], tmp / "ours"),
            "mlxqwen convert --shard-size 0.25": (
                ours + ["-o", str(tmp / "small"), "--shard-size", "0.25"],
                tmp / "small",
            ),
            "mlx_lm.convert": (
                [python, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(tmp / "theirs"), "-q"],
                tmp / "theirs",
            ),
        }
        results = {}
        for name, (command, out) in runs.items():
            console.print(f"running {name} ...")
            results[name] = (*measure(command), directory_bytes(out))
        equal, compared = same_tensors(tmp / "ours", tmp / "theirs")

        title = f"4-bit g64 conversion of {source_bytes / 1e9:.2f} GB bf16"
        table = Table(title=f"{title} (largest input shard {largest_shard / 1e9:.2f} GB)")
        for column in ("converter", "wall s", "GB/s", "peak RSS GB", "output GB"):
            table.add_column(column, justify="left" if column == "converter" else "right")
        for name, (seconds, rss, size) in results.items():
            table.add_row(
                name, f"{seconds:.1f}", f"{source_bytes / seconds / 1e9:.3f}", f"{rss / 1e9:.2f}", f"{size / 1e9:.2f}"
            )
        t_ours, rss_ours, _ = results["mlxqwen convert"]
        t_theirs, rss_theirs, _ = results["mlx_lm.convert"]
        ratios = f"{t_ours / t_theirs:.2f}", f"{t_theirs / t_ours:.2f}", f"{rss_ours / rss_theirs:.2f}"
        table.add_row("ratio mlxqwen / mlx-lm (defaults)", *ratios, "")
        console.print(table)
        console.print(f"quantized tensors identical to mlx-lm's: {equal}/{compared}")


if __name__ == "__main__":
    main()
