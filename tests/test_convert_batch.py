"""`mlxqwen convert` on the command line, and batches from a TOML manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoints import build_reference, save_checkpoint
from mlxqwen.convert import ConvertError, run_batch
from mlxqwen.convert.batch import load_manifest
from mlxqwen.convert.progress import make_progress
from test_convert import small_tokenizer

from mlxqwen.cli import main


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert-batch")
    for arch in ("qwen3", "qwen3_5_text"):
        small_tokenizer(save_checkpoint(build_reference(arch), root / arch))
    shutil.copytree(root / "qwen3", root / "broken")
    shard = root / "broken" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    return root


MANIFEST = """
[defaults]
output_dir = "out"
group_size = 32

[[convert]]
source = "qwen3"
recipe = "4bit"

[[convert]]
source = "broken"

[[convert]]
source = "qwen3_5_text"
recipe = "mixed_4_8"
eval = false

[[convert]]
source = "qwen3"
recipe = "8bit"
output = "custom/q8"
"""


def test_batch_continues_past_a_failure_and_skips_finished_outputs(sources, monkeypatch, capsys):
    manifest = sources / "batch.toml"
    manifest.write_text(MANIFEST)
    with make_progress() as progress:
        outcomes = run_batch(manifest, progress)
    assert [o.status for o in outcomes] == ["converted", "failed", "converted", "converted"]
    assert "model.safetensors: truncated" in outcomes[1].error
    q4, _, mixed, q8 = (o.entry.output for o in outcomes)
    assert q4 == sources / "out" / "qwen3-4bit-g32" and q8 == sources / "custom" / "q8"
    assert not (sources / "out" / "broken-4bit-g32").exists()
    assert json.loads((mixed / "config.json").read_text())["quantization"]["bits"] == 4
    assert outcomes[0].result.quality is not None  # eval is on by default in a batch
    assert "KL divergence" in (q4 / "README.md").read_text()
    assert outcomes[2].result.quality is None and "KL divergence" not in (mixed / "README.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (q4, mixed, q8)}

    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert main(["convert", "--batch", str(manifest)]) == 1  # the broken entry fails again
    table = capsys.readouterr().out
    assert table.count("skipped (exists)") == 3 and table.count("failed:") == 1
    assert "qwen3_5_text" in table and "mixed_4_8-g32" in table
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[convert]]\nsource = 'qwen3'\nrecipie = '4bit'\n", "entry 1: recipie: not an option of the mlx format"),
        ("[[convert]]\nrecipe = '4bit'\n", "entry 1: missing 'source'"),
        ("[[convert]]\nsource = 'qwen3'\nrecipe = '7bit'\n", "entry 1: recipe = '7bit': expected one of none, 2bit"),
        ("[defaults]\ngroup_size = 48\n[[convert]]\nsource = 'qwen3'\n", "entry 1: group_size = 48"),
        ("[[convert]]\nsource = 'qwen3'\nto = 'onnx'\n", "entry 1: to = 'onnx': unknown output format"),
        ("[[convert]\n", "invalid TOML"),
        ("[defaults]\n", "no [[convert]] entries"),
    ],
)
def test_manifest_errors(sources, tmp_path, text, message):
    manifest = tmp_path / "bad.toml"
    manifest.write_text(text.replace("'qwen3'", repr(str(sources / "qwen3"))))
    with pytest.raises(ConvertError, match=message.replace("[", r"\[")):
        load_manifest(manifest)


def test_defaults_apply_to_the_entries_of_their_format(sources, tmp_path):
    """`[defaults]` holds options of several formats (the README's example has an MLX one); each
    entry takes those of its own format."""
    pytest.importorskip("gguf")
    manifest = tmp_path / "mixed.toml"
    manifest.write_text(
        f"[defaults]\noutput_dir = 'out'\ngroup_size = 32\nquant = 'F16'\n"
        f"[[convert]]\nsource = {str(sources / 'qwen3')!r}\n"
        f"[[convert]]\nsource = {str(sources / 'qwen3')!r}\nto = 'gguf'\n"
    )
    mlx, gguf = load_manifest(manifest)
    assert mlx.options["group_size"] == 32 and "quant" not in mlx.options
    assert gguf.options == {"quant": "F16"} and gguf.output == tmp_path / "out" / "qwen3-F16.gguf"
    manifest.write_text(f"[defaults]\ngrup_size = 32\n[[convert]]\nsource = {str(sources / 'qwen3')!r}\n")
    with pytest.raises(ConvertError, match=r"\[defaults\]: unknown option 'grup_size'"):
        load_manifest(manifest)


def test_cli_single_conversion(sources, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["convert", str(sources / "qwen3"), "-o", str(out), "--recipe", "8bit", "--group-size", "32"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": 8,
        "mode": "affine",
    }
    assert main(["convert", str(sources / "qwen3"), "-o", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["convert", "--batch", "x.toml", "--recipe", "8bit"]) == 1
    assert "put options in the manifest" in capsys.readouterr().err
    assert main(["convert"]) == 2
