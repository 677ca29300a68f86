"""Bad input, interruptions and full disks: a clear one-line error, a non-zero exit, and no
output that looks finished. Hub sources without the network (HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import pytest
from checkpoints import build_reference, save_checkpoint
from mlxqwen.convert import ConvertError, convert
from mlxqwen.convert import output as output_module
from mlxqwen.convert.shards import ShardWriter
from test_convert import TOKENS

import mlxqwen
from mlxqwen.cli import main
from mlxqwen.errors import ModelLoadError

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_checkpoint(build_reference("qwen3"), tmp_path_factory.mktemp("convert-safety") / "hf", shards=2)


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*partial*")) + sorted(directory.glob(".*old*"))


def test_existing_output_needs_force(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="already exists; pass force=True"):
        convert(source, out)
    assert (out / "mine.txt").read_text() == "keep me"
    convert(source, out, force=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(tmp_path, source, monkeypatch):
    flush = ShardWriter.flush

    def interrupted(self):
        flush(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "flush", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(source, out, shard_size=20_000 / 2**30)
    assert not out.exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(ShardWriter, "flush", flush)
    convert(source, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(ShardWriter, "flush", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(source, out, recipe="8bit", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old output is untouched
    assert leftovers(tmp_path) == []


def test_killed_conversion_leaves_no_finished_output(tmp_path, source):
    out = tmp_path / "out"
    script = f"""
import os, signal
from mlxqwen.convert import convert
from mlxqwen.convert.shards import ShardWriter
flush = ShardWriter.flush
def killed(self):
    flush(self)
    os.kill(os.getpid(), signal.SIGKILL)
ShardWriter.flush = killed
convert({str(source)!r}, {str(out)!r}, shard_size=20_000 / 2**30)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=REPO)
    assert run.returncode == -9
    assert not out.exists()
    (partial,) = leftovers(tmp_path)  # hidden, named partial, and not loadable
    assert partial.name.startswith(".out.partial-")
    with pytest.raises(ModelLoadError):
        mlxqwen.load(partial)


def test_truncated_shard(tmp_path, source, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["convert", str(broken), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert shard.name in err and "truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unknown_architecture(tmp_path, source, capsys):
    other = tmp_path / "llama"
    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert main(["convert", str(other), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "'llama' is not supported" in err
    assert not (tmp_path / "out").exists()


def test_already_quantized_source(tmp_path, source):
    convert(source, tmp_path / "q4")
    with pytest.raises(ConvertError, match="already quantized"):
        convert(tmp_path / "q4", tmp_path / "again")


def test_output_inside_source(tmp_path, source):
    with pytest.raises(ConvertError, match="must not be, contain, or lie inside the source"):
        convert(source, source / "mlx")
    with pytest.raises(ConvertError, match="must not be, contain, or lie inside the source"):
        convert(source, source, force=True)
    assert (source / "config.json").is_file()


def test_not_enough_disk_space(tmp_path, source, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(output_module.shutil, "disk_usage", lambda _: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConvertError, match="not enough free disk space"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_disk_full_while_writing(tmp_path, source, monkeypatch):
    """The disk fills up during the conversion (after the free-space check passed)."""
    from mlxqwen.convert import mlx, shards

    def full(file, *_, **__):
        Path(file).write_bytes(b"\0" * 100)  # what a full disk leaves: a short file
        raise RuntimeError("[write] Unable to write 3145824 bytes to file.")

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(mlx, "check_free_space", lambda *_: None)
    monkeypatch.setattr(shards.shutil, "disk_usage", lambda _: Usage(10**9, 10**9, 0))
    with pytest.raises(ConvertError, match="disk full"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_local_source(tmp_path):
    with pytest.raises(ConvertError, match="no such directory"):
        convert(tmp_path / "nope", tmp_path / "out")


def _cli(args: list[str], hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mlxqwen.cli", "convert", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_hub_source_offline(tmp_path, source):
    """A repo id resolves through the Hugging Face cache (HF_HOME); offline and not cached, the
    error says so. Nothing here touches the network."""
    run = _cli(["acme/not-cached", "-o", "out"], tmp_path / "hf-home", tmp_path)
    assert run.returncode == 1
    assert "acme/not-cached" in run.stderr and "HF_HUB_OFFLINE is set" in run.stderr
    assert not (tmp_path / "out").exists()

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--acme--tiny-qwen"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    run = _cli(["acme/tiny-qwen", "--recipe", "8bit"], tmp_path / "hf-home", tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "tiny-qwen-8bit"  # the default output name
    card = (out / "README.md").read_text()
    assert "base_model: acme/tiny-qwen" in card and commit in card
    model = mlxqwen.load(out, dtype=mx.float32).model
    assert model(mx.array([TOKENS])).shape == (1, len(TOKENS), 512)


def test_download_progress_draws_into_rich():
    """huggingface_hub reports downloads through a tqdm class; ours feeds the shared rich display."""
    from mlxqwen.convert.progress import make_progress, tqdm_class

    with make_progress() as progress:
        bar = tqdm_class(progress)(desc="Downloading", total=0, unit="B", unit_scale=True)
        bar.total = 2 * 10**9  # the Hub sets the total once it knows the files
        bar.update(10**9)
        bar.update(10**9)
        bar.close()
    (task,) = progress.tasks
    assert (task.description, task.completed, task.total) == ("Downloading", 2 * 10**9, 2 * 10**9)
    assert task.fields["info"] == "2.0 GB/2.0 GB"  # as format_size writes sizes


def test_eval_checks_the_tokenizer_before_converting(tmp_path, source, monkeypatch):
    """The fixture's real Qwen tokenizer has ids past this tiny model's 512-token vocabulary."""
    monkeypatch.setattr(ShardWriter, "add", lambda *_: pytest.fail("converted before checking"))
    with pytest.raises(ConvertError, match="outside the model's vocabulary"):
        convert(source, tmp_path / "out", eval=True)
    assert not (tmp_path / "out").exists()
