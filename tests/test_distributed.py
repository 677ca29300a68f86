"""One model across several processes with MLX's ring backend on loopback (`mlx.launch -n N`):
logits equal to one process for a dense, an MoE and a hybrid model, split by layers (pipeline) and
within layers (tensor), on 2 and 4 ranks; each rank holding only its part; greedy text through
`mlxqwen generate` equal to one process, rank 0 alone printing; a rank killed or stopped ending the
run with one line naming it; the layer split in proportion to memory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference, save_checkpoint
from serving import running, serve_command

from mlxqwen import distributed
from mlxqwen.backends.mlx import split_sizing
from mlxqwen.cli import main
from mlxqwen.distributed import pipeline_layers, split

WORKER = str(Path(__file__).parent / "distributed_worker.py")
MLXQWEN = str(Path(sys.executable).parent / "mlxqwen")
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
ARCHS = ("qwen3", "qwen3_moe", "qwen3_5_text")
# heads and columns that 4 ranks divide (the default tiny configs have 2 KV and 2 Gated DeltaNet key heads)
FOUR_WAY = dict(num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=8)


def free_ports(n: int) -> int:
    """The first of n consecutive free loopback ports (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65536 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch(n: int, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    return [LAUNCH, "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n)),
            "--python", sys.executable, "--", *argv]  # fmt: skip


def run(argv: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("distributed")
    out = {arch: save_checkpoint(build_reference(arch), tmp / arch) for arch in ARCHS}
    out["four-way"] = save_checkpoint(build_reference("qwen3_5_moe_text", **FOUR_WAY), tmp / "four")
    # the tokenizer's ids need the full vocabulary; a tied head lives on the first and the last rank
    out["chat"] = save_checkpoint(build_reference("qwen3", vocab_size=151936, tie_word_embeddings=True), tmp / "chat")
    return out


def logits(model: Path, out: Path, ranks: int, parallel: str) -> tuple[np.ndarray, list[dict]]:
    argv = [WORKER, "logits", str(model), str(out), parallel]
    done = run(launch(ranks, *argv) if ranks > 1 else [sys.executable, *argv])
    assert done.returncode == 0 and out.with_suffix(".npy").exists(), done.stderr[-3000:]
    return np.load(out.with_suffix(".npy")), [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("parallel", ["pipeline", "tensor"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_one_process(models, tmp_path, arch, parallel):
    expected, (alone,) = logits(models[arch], tmp_path / "one", 1, parallel)
    got, ranks = logits(models[arch], tmp_path / "two", 2, parallel)
    assert np.abs(got - expected).max() < 1e-5
    # each rank holds its part of the weights, not the whole model, as `fit --hosts` plans it
    assert all(r["weights"] < 0.8 * alone["weights"] for r in ranks)
    assert sum(r["weights"] for r in ranks) >= alone["weights"]
    planned = split_sizing(models[arch], ["a", "b"], [1, 1], parallel, dtype=mx.float32)
    assert [r["weights"] for r in ranks] == pytest.approx([part.weights for part, _ in planned], rel=0.01)
    if parallel == "pipeline":
        assert [r["layers"] for r in ranks] == [[0, 2], [2, 4]]
        assert [part.what for part, _ in planned] == ["layers 0-1", "layers 2-3"]


@pytest.mark.parametrize("parallel", ["pipeline", "tensor"])
def test_four_ranks(models, tmp_path, parallel):
    expected, (alone,) = logits(models["four-way"], tmp_path / "one", 1, parallel)
    got, ranks = logits(models["four-way"], tmp_path / "four", 4, parallel)
    assert np.abs(got - expected).max() < 1e-5
    assert all(r["weights"] < 0.6 * alone["weights"] for r in ranks)


def test_tensor_parallelism_refuses_heads_it_cannot_divide(models, tmp_path):
    done = run(launch(4, WORKER, "logits", str(models["qwen3"]), str(tmp_path / "x"), "tensor"))
    assert "num_key_value_heads (2) to be a multiple of 4: use --parallel pipeline" in done.stderr


@pytest.mark.parametrize(
    "parallel, sampling", [("pipeline", ["--temp", "0"]), ("tensor", ["--temp", "0"]), ("pipeline", ["--seed", "3"])]
)
def test_generate_text_equal_one_process(models, parallel, sampling):
    argv = [MLXQWEN, "generate", str(models["chat"]), "-p", "Hello there", "--max-tokens", "24", *sampling,
            "--no-think", "--backend", "mlx"]  # fmt: skip
    alone = run(argv)
    assert alone.returncode == 0, alone.stderr
    split_run = run(launch(2, *argv, "--parallel", parallel))
    assert split_run.stdout == alone.stdout  # rank 0 alone prints the answer
    assert split_run.stderr.count("MLX · prompt") == 1, split_run.stderr  # and the stats line


def _start_forever(models, tmp_path: Path, **env: str) -> tuple[subprocess.Popen, list[int]]:
    argv = launch(2, WORKER, "forever", str(models["qwen3"]), str(tmp_path))
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "decoding").exists():
        assert time.monotonic() < deadline and process.poll() is None, "the ranks did not start"
        time.sleep(0.2)
    time.sleep(0.5)
    return process, [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen, pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.kill()
    process.wait()


def test_a_killed_rank_ends_the_run_naming_it(models, tmp_path):
    process, pids = _start_forever(models, tmp_path)
    try:
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        out, _ = process.communicate(timeout=30)
        assert time.monotonic() - start < 10
        # the launcher names the rank that ended and ends the others; rank 0, when it notices first, says so once
        assert "Node with rank 1 exited with code -9" in out, out
        ours = [line for line in out.splitlines() if line.startswith("mlxqwen: rank")]
        assert len(ours) <= 1, out
        assert all(line.startswith("mlxqwen: rank 0 of 2: ") and "to rank 1 was lost" in line for line in ours)
    finally:
        _stop(process, pids)


def test_a_rank_that_stops_answering_ends_the_run(models, tmp_path):
    process, pids = _start_forever(models, tmp_path, MLXQWEN_DISTRIBUTED_TIMEOUT="3")
    try:
        os.kill(pids[1], signal.SIGSTOP)  # alive, but it answers nothing: as a host cut off
        deadline = time.monotonic() + 20
        while _alive(pids[0]):  # rank 0 gives up on it (the launcher can only end a stopped process by force)
            assert time.monotonic() < deadline, "rank 0 still waits"
            time.sleep(0.2)
        os.kill(pids[1], signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
        ours = [line for line in out.splitlines() if line.startswith("mlxqwen: rank")]
        assert len(ours) == 1 and ours[0].startswith("mlxqwen: rank 0 of 2: "), out
        assert ours[0].endswith("rank 1 did not answer in 3 s; it stopped or cannot be reached: ending the run")
    finally:
        _stop(process, pids)


def test_layers_split_in_proportion_to_memory():
    assert split([1] * 8, [1, 1]) == [(0, 4), (4, 8)]
    assert split([1] * 8, [3, 1]) == [(0, 6), (6, 8)]
    assert split([1] * 3, [100, 1, 1]) == [(0, 1), (1, 2), (2, 3)]  # every rank gets at least one
    # embeddings + 4 layers + head: the first rank keeps the embeddings, the last the head
    assert pipeline_layers([10, 5, 5, 5, 5, 10], [1, 1]) == [(0, 2), (2, 4)]
    assert pipeline_layers([10, 5, 5, 5, 5, 10], [1, 2]) == [(0, 1), (1, 4)]


def test_fit_says_how_a_model_splits_across_hosts_before_loading(models, tmp_path, capsys):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "mac-a", "memory_gb": 16}, {"ssh": "mac-b", "memory_gb": 48}]))
    assert main(["fit", str(models["qwen3_5_text"]), "--hostfile", str(hostfile), "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "across 2 hosts (pipeline) with 4,096 tokens" in out and "fits on every host" in out
    assert "mac-a" in out and "layer 0 " in out and "layers 1-3" in out  # the larger host holds more layers
    hostfile.write_text(json.dumps([{"ssh": "mac-a", "memory_gb": 0.0001}, {"ssh": "mac-b"}]))
    assert main(["fit", str(models["qwen3_5_text"]), "--hostfile", str(hostfile), "--parallel", "tensor"]) == 1
    out = capsys.readouterr().out
    assert "1/2 of every layer" in out and "does not fit on every host" in out
    assert main(["fit", str(models["qwen3"]), "--hosts", "a"]) == 1
    assert "--hosts 'a': name two hosts or more" in capsys.readouterr().err


def _answer(server, name: str) -> str:
    body = {"model": name, "prompt": "Hello there", "stream": False, "think": False,
            "options": {"temperature": 0, "num_predict": 24}}  # fmt: skip
    reply = httpx.post(f"{server.url}/api/generate", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["response"]


def test_serve_under_mlx_launch_answers_as_one_process(models, tmp_path):
    model = models["chat"]
    with running(serve_command(str(model), "--backend", "mlx"), tmp_path / "one.log") as server:
        expected = [_answer(server, model.name) for _ in range(2)]
    argv = launch(2, MLXQWEN, "serve", str(model), "--port", "{port}", "--backend", "mlx", "--parallel", "tensor")
    with running(argv, tmp_path / "two.log") as server:
        # rank 0 serves; each request's steps run on both ranks (the second request resumes from the prefix cache)
        assert [_answer(server, model.name) for _ in range(2)] == expected
        assert server.log_text().count("mlxqwen serve: http://") == 1  # rank 0 alone listens and talks


def test_serve_under_mlx_launch_serves_one_model(models):
    done = run(launch(2, MLXQWEN, "serve", str(models["chat"]), str(models["qwen3"]), "--port", "0"))
    assert "mlxqwen serve: error: under mlx.launch, serve one MODEL" in done.stderr


def test_a_follower_that_fails_alone_says_why(monkeypatch, capsys):
    # rank 0 failing the same way would have said it first and ended this process during the wait
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "FOLLOWER_GRACE_S", 0)
    assert main(["generate", "no-such-model", "-p", "hi"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("mlxqwen generate: error: ") and out.err.count("\n") == 1
