"""The README's Python examples run as pasted: every one that needs no download (they use the
demo model) runs, in order, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_python_examples_run_as_pasted(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "Qwen/" not in b and ".gguf" not in b]  # these need a real model
    assert len(runnable) >= 6 and all("mlxqwen-demo" in b or "llm" in b for b in runnable)
    env = {**os.environ, "MLXQWEN_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-c", "\n".join(runnable)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr
    thinking, answer = run.stdout.index("--- thinking ---"), run.stdout.index("--- answer ---")
    assert thinking < answer  # the streaming example tells the reasoning and the answer apart
