"""The README's Python examples run as pasted: every one that needs no download (they use the
demo model) runs, in order, in a fresh interpreter; the ones that talk to `mlxqwen serve` run
against a real server serving the demo model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from serving import running, serve_command

README = Path(__file__).parent.parent / "README.md"
SERVER = ":11434"  # the examples that talk to `mlxqwen serve` on its default port


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_python(code: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )


def fresh_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLXQWEN_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf")}


def test_python_examples_run_as_pasted(tmp_path):
    needs_a_real_model = ("Qwen/", ".gguf", "~/models/")
    runnable = [b for b in python_blocks() if SERVER not in b and not any(s in b for s in needs_a_real_model)]
    assert len(runnable) >= 6 and all("mlxqwen-demo" in b or "llm" in b for b in runnable)
    run = run_python("\n".join(runnable), tmp_path, fresh_env(tmp_path))
    assert run.returncode == 0, run.stderr
    thinking, answer = run.stdout.index("--- thinking ---"), run.stdout.index("--- answer ---")
    assert thinking < answer  # the streaming example tells the reasoning and the answer apart


def test_server_examples_run_against_mlxqwen_serve(tmp_path):
    examples = [b for b in python_blocks() if SERVER in b]
    assert len(examples) >= 2 and all("mlxqwen-demo" in b for b in examples)
    env = fresh_env(tmp_path)
    with running(serve_command("mlxqwen-demo"), tmp_path / "serve.log", env) as server:
        port = server.url.rsplit(":", 1)[1]
        run = run_python("\n".join(b.replace(SERVER, f":{port}") for b in examples), tmp_path, env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "12 + 30 = 42."  # as the first example's comment says
