"""The command line as a new user meets it, with the demo model that ships in the package: names
from `mlxqwen list` work everywhere, errors are one line in one format (brackets intact, never
wrapped, never after a note), advice is said once, and nothing is printed without a reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from huggingface_hub import constants

import mlxqwen
from mlxqwen import backends, library
from mlxqwen.cli import main
from mlxqwen.demo import model_path

MLXQWEN = Path(sys.executable).parent / "mlxqwen"  # the installed command
QUESTION = "What is 37 + 48?"


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """An empty library, data folder and Hugging Face cache, offline; the environment for a subprocess."""
    monkeypatch.setenv(library.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, env=env, timeout=300)


def test_names_from_mlxqwen_list_work_in_every_command_and_the_api(env, tmp_path):
    generated = run(env, MLXQWEN, "generate", "mlxqwen-demo", "-p", QUESTION, "--backend", "mlx")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() and not generated.stdout.startswith("\n")
    (stats,) = generated.stderr.splitlines()  # piped: one line, however long, never wrapped at 80 columns
    assert stats.startswith("MLX · prompt ") and len(stats) > 80

    fit = run(env, MLXQWEN, "fit", "mlxqwen-demo")
    assert fit.returncode == 0 and "fits" in fit.stdout

    out = tmp_path / "demo.gguf"
    converted = run(env, MLXQWEN, "convert", "mlxqwen-demo", "--to", "gguf", "--quant", "F32", "-o", str(out))
    assert converted.returncode == 0, converted.stderr
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen35"

    script = "import mlxqwen; print(mlxqwen.load('mlxqwen-demo', backend='mlx').generate('What is 37 + 48?'))"
    api = run(env, sys.executable, "-c", script)
    assert api.returncode == 0 and api.stdout == generated.stdout
    assert api.stderr == ""  # the library prints nothing of its own


def test_the_process_ends_cleanly_when_a_model_is_dropped_on_the_way_out(env):
    """A model dropped as the program ends closes its engine; the engine thread once ended during
    the interpreter's shutdown, and MLX's thread-local compile cache, torn down with it, aborted
    the process ("terminate called without an active exception", exit status 134)."""
    question = ["-p", "The capital of Japan", "--raw", "--backend", "mlx", "--max-tokens", "8"]
    generated = run(env, MLXQWEN, "generate", "mlxqwen-demo", *question)
    assert generated.returncode == 0, generated.stderr
    script = (
        "import mlxqwen\n"
        "def ask():\n"
        "    llm = mlxqwen.load('mlxqwen-demo', backend='mlx')\n"
        "    return llm.generate('The capital of Japan', raw=True, max_tokens=8)\n"
        "print(ask() == ask())\n"
    )
    api = run(env, sys.executable, "-c", script)
    assert (api.returncode, api.stdout, api.stderr) == (0, "True\n", "")


def test_every_command_reports_an_error_in_one_line_and_one_format(env, capsys):
    long = "/no/such/place/" + "deep/" * 30 + "[model]"
    for args in (
        ["generate", long, "-p", "hi"],
        ["fit", long],
        ["chat", long],
        ["convert", long],
        ["pull", long],
        ["rm", "[model]"],
    ):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(f"mlxqwen {args[0]}: error: ") and err.count("\n") == 1, err
        assert "[model]" in err  # text in brackets is not taken for markup
    piped = run(env, MLXQWEN, "generate", long, "-p", "hi")
    assert piped.returncode == 1 and piped.stderr.count("\n") == 1 and piped.stdout == ""


def test_the_llama_install_hint_keeps_its_brackets(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backends, "llama_cpp_installed", lambda: False)
    assert main(["generate", str(model_path("gguf")), "-p", "hi"]) == 1
    assert capsys.readouterr().err.endswith("install it with pip install 'mlxqwen[llama]'\n")


def test_a_note_is_said_once_after_the_load_and_never_before_an_error(env, tmp_path, capsys, monkeypatch):
    """Off Apple Silicon without llama.cpp, the demo runs on MLX and says how it would run faster."""
    monkeypatch.setattr(backends, "apple_silicon", lambda: False)
    monkeypatch.setattr(backends, "llama_cpp_installed", lambda: False)
    broken = shutil.copytree(model_path(), tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert main(["generate", str(broken), "-p", QUESTION]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mlxqwen generate: error: ")  # the error alone

    note = (
        "mlxqwen generate: note: mlxqwen-demo: llama.cpp would run its model.gguf faster than MLX on this CPU; "
        "pip install 'mlxqwen[llama]'"
    )
    assert main(["generate", "mlxqwen-demo", "-p", QUESTION]) == 0
    assert capsys.readouterr().err.splitlines()[0] == note
    assert main(["generate", "mlxqwen-demo", "-p", QUESTION]) == 0
    assert "note:" not in capsys.readouterr().err  # said once on this machine


def test_demo_runs_its_gguf_where_llama_cpp_is_faster(env, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(backends, "apple_silicon", lambda: False)
    assert backends.choose(library.resolve_model("mlxqwen-demo")) == backends.Choice("llama.cpp", model_path("gguf"))
    monkeypatch.setattr(backends, "apple_silicon", lambda: True)
    assert backends.choose(library.resolve_model("mlxqwen-demo")) == backends.Choice("mlx", model_path())


def test_an_answer_lost_to_thinking_is_explained(env, capsys):
    assert main(["generate", "mlxqwen-demo", "-p", QUESTION, "--max-tokens", "3", "--backend", "mlx"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == (
        "mlxqwen generate: error: no answer: all 3 tokens went to thinking (--max-tokens reached); try more room "
        "with --max-tokens, an answer without thinking with --no-think, the thinking with --show-thinking"
    )


def test_gguf_export_on_the_base_install(env, tmp_path, capsys, monkeypatch):
    """Without llama-cpp-python, F32/F16/BF16/Q8_0 are written by gguf-py; Q4_K_M says what to install."""
    monkeypatch.setattr("mlxqwen.convert.gguf.llama_cpp_installed", lambda: False)
    out = tmp_path / "m.gguf"
    assert main(["convert", "mlxqwen-demo", "--to", "gguf", "--quant", "Q8_0", "-o", str(out)]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    capsys.readouterr()
    assert main(["convert", "mlxqwen-demo", "--to", "gguf", "--quant", "Q4_K_M", "-o", str(tmp_path / "k.gguf")]) == 1
    assert capsys.readouterr().err == (
        "mlxqwen convert: error: --quant Q4_K_M: K-quants come from llama.cpp's quantizer; install it with "
        "pip install 'mlxqwen[llama]', or choose F32, F16, BF16 or Q8_0\n"
    )
    assert not list(tmp_path.glob("*k.gguf*"))  # nothing written


def test_each_side_speaks_its_own_words(env, capsys):
    """The command line names flags, Python names keywords."""
    with pytest.raises(SystemExit):
        main(["generate", "mlxqwen-demo", "-p", "hi", "--max-tokens", "-5"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mlxqwen generate: error: argument --max-tokens: -5 must be at least 1"
    )
    llm = mlxqwen.load("mlxqwen-demo", backend="mlx")
    with pytest.raises(ValueError, match=r"^max_tokens=-5 must be at least 1$"):
        llm.generate("hi", max_tokens=-5)


def test_generate_counts_the_mtp_heads_guesses_and_no_mtp_turns_it_off(env, capsys):
    """On MLX the demo model's MTP head guesses tokens: --json and the stats line count them, and
    the answer is the one plain (greedy) decoding gives."""
    args = ["generate", "mlxqwen-demo", "-p", QUESTION, "--backend", "mlx", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    guessed = json.loads(out)
    stats = guessed["stats"]
    assert 0 < stats["accepted_tokens"] <= stats["draft_tokens"]
    assert f" · MTP {stats['accepted_tokens']}/{stats['draft_tokens']} drafts accepted · " in err.splitlines()[-1]

    assert main([*args, "--no-mtp"]) == 0
    out, err = capsys.readouterr()
    plain = json.loads(out)
    assert plain["stats"]["draft_tokens"] == plain["stats"]["accepted_tokens"] == 0
    assert "MTP" not in err
    assert (plain["thinking"], plain["text"]) == (guessed["thinking"], guessed["text"])


def test_chat_passes_no_mtp_to_the_load(env, monkeypatch):
    from mlxqwen.tui import app

    heads = []

    class App:
        def __init__(self, model, resume, loader):
            heads.append(loader(model).runtime.mtp)
            self.return_code, self.engine_stopped = 0, True

        def run(self):
            pass

    monkeypatch.setattr(app, "ChatApp", App)
    assert main(["chat", "mlxqwen-demo", "--backend", "mlx"]) == 0
    assert main(["chat", "mlxqwen-demo", "--backend", "mlx", "--no-mtp"]) == 0
    assert heads == [True, False]
