"""The shipped demo model end to end: it stays within its size budget; both forms load through
`mlxqwen.load` (MLX 4-bit on MLX, GGUF on llama.cpp) and chat (thinking and answer parsed,
two turns); both carry Qwen3.5's MTP head and guess with it; the GGUF gives the same tokens and
reply in llama-cpp-python's own API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from demo import data
from demo.evaluate import accuracy, engine_answers, questions, split_reply
from mlxqwen import load
from mlxqwen.demo import DEMO_DIR, model_path
from mlxqwen.tokenizer import Tokenizer

QUESTION = "What is 37 + 48?"
THINKING = "7 + 8 = 15, carry 1\n3 + 4 + 1 = 8\n37 + 48 = 85"


def test_shipped_files_stay_under_40_mb():
    files = list(DEMO_DIR.iterdir())
    assert model_path("gguf") in files and sum(f.stat().st_size for f in files) < 40e6
    assert not (DEMO_DIR / "README.md").exists()  # the model card would name the build path


def test_the_demo_model_is_not_trained_by_the_installed_package():
    """torch-based training and evaluation live in the source checkout's demo/, not in mlxqwen."""
    import mlxqwen.demo

    package = Path(mlxqwen.demo.__file__).parent
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py"]


@pytest.mark.parametrize("form, backend", [("mlx", "mlx"), ("gguf", "llama.cpp")])
def test_shipped_forms_chat_with_thinking(form, backend):
    if backend == "llama.cpp":
        pytest.importorskip("llama_cpp")
    llm = load(model_path(form), backend=backend)
    assert llm.defaults.temperature == 0.0  # the shipped generation_config: greedy
    if form == "mlx":
        assert llm.config.model_type == "qwen3_5" and llm.config.quantization["bits"] == 4
    chat = llm.chat(max_tokens=120)
    done = chat.send(QUESTION)
    assert (done.thinking.strip(), done.text) == (THINKING, "37 + 48 = 85.")
    assert done.finish_reason == "stop"
    done = chat.send("What is the capital of Peru?")  # second turn: the cache holds the first
    assert done.text == "The capital of Peru is Lima."
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.history[1]["reasoning_content"].strip() == THINKING
    assert llm.chat(max_tokens=120).send("Write a poem about the sea.").text == data.OUT_OF_SCOPE


def test_mlx_form_keeps_the_mtp_head():
    index = json.loads((model_path("mlx") / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = {k for k in index if k.startswith("mtp.")}
    assert {"mtp.fc.weight", "mtp.fc.scales", "mtp.pre_fc_norm_embedding.weight", "mtp.norm.weight"} <= mtp
    assert "mtp.layers.0.self_attn.q_proj.weight" in mtp


@pytest.mark.parametrize("form, backend", [("mlx", "mlx"), ("gguf", "llama.cpp")])
def test_both_forms_guess_with_the_mtp_head(form, backend):
    """The GGUF carries the head as llama.cpp's nextn tensors; on either runtime it guesses most
    tokens right, and the answers are those of plain decoding."""
    if backend == "llama.cpp":
        pytest.importorskip("llama_cpp")
        reader = gguf.GGUFReader(model_path("gguf"))
        assert reader.fields["qwen35.nextn_predict_layers"].contents() == 1
        assert "blk.6.nextn.eh_proj.weight" in {t.name for t in reader.tensors}
    plain = load(model_path(form), backend=backend, mtp=False)
    llm = load(model_path(form), backend=backend, mtp_depth=3)
    assert llm.runtime.mtp and not plain.runtime.mtp
    chat, reference = llm.chat(max_tokens=200), plain.chat(max_tokens=200)
    for question in (QUESTION, "What is the capital of Peru?", "What is 87 × 6?"):
        done, expected = chat.send(question), reference.send(question)
        assert (done.thinking, done.text) == (expected.thinking, expected.text)
        assert done.stats.accepted_tokens > 0.5 * done.stats.draft_tokens > 0


def test_gguf_form_runs_in_llama_cpp_itself():
    """Independent of our backend: llama-cpp-python's own API tokenizes as our tokenizer does
    and gives the same reply."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(model_path("gguf")), n_ctx=512, verbose=False)
    assert llm.metadata["general.architecture"] == "qwen35"
    tokenizer = Tokenizer.from_dir(model_path("mlx"))
    prompt = tokenizer.chat_template.render([{"role": "user", "content": QUESTION}])
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == tokenizer.encode(prompt)
    out = llm.create_completion(prompt, max_tokens=120, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert split_reply(out["choices"][0]["text"]) == (THINKING, "37 + 48 = 85.")


@pytest.mark.parametrize("think", [True, False], ids=["thinking", "no-thinking"])
@pytest.mark.parametrize("form, backend", [("mlx", "mlx"), ("gguf", "llama.cpp")])
def test_shipped_forms_answer_held_out_questions(form, backend, think):
    """A sample of the evaluation (python -m demo.evaluate --shipped runs all of it)."""
    if backend == "llama.cpp":
        pytest.importorskip("llama_cpp")
    scores = accuracy(engine_answers(model_path(form), backend), questions(6), think)
    assert scores["all"] >= 90 and scores["glued"] >= 80, scores


@pytest.mark.parametrize(
    "question, flags, answer",
    [
        ("What is 98765 × 7?", [], data.TOO_LARGE),
        ("What is 98765 × 7?", ["--no-think"], data.TOO_LARGE),
        ("What is 37 + 48?", ["--no-think"], "7 + 8 = 15, carry 1\n3 + 4 + 1 = 8\n37 + 48 = 85."),
        ("capital ofJapan?", [], "The capital of Japan is Tokyo."),
        ("capital ofJapan?", ["--no-think"], "The capital of Japan is Tokyo."),
    ],
)
def test_what_broke_the_demo_through_the_cli(question, flags, answer):
    """The cases a new user hit (issue 11): a number too large is declined, a sum without thinking
    shows its steps and is right, careless typing still finds the fact."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mlxqwen"), "generate", "mlxqwen-demo", "-p", question, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == answer
