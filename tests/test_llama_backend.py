"""The llama.cpp backend behind the same API, CLI and TUI: tiny random models of every
architecture converted to GGUF compute what the MLX backend computes; a chat on it never
makes llama.cpp re-read its history (counted by llama.cpp itself), on a hybrid model too;
quantized files run; the backend is chosen as documented."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference, save_checkpoint, to_gguf

import mlxqwen
from mlxqwen import InsufficientMemoryError, ModelLoadError, PrefillProgress, TextDelta, ThinkingDelta, memory
from mlxqwen.llm import last

llama_cpp = pytest.importorskip("llama_cpp")

from mlxqwen.convert import gguf_mapping  # noqa: E402
from mlxqwen.tui.app import ChatApp  # noqa: E402
from mlxqwen.tui.store import ChatSettings, ChatStore  # noqa: E402
from test_gguf import QUANT_CASES, VOCAB, min_cosine, rel_err  # noqa: E402
from test_tui import SIZE, answered, anyio_backend, conversation, isolated, ready, send  # noqa: E402,F401

from mlxqwen import backends  # noqa: E402
from mlxqwen.backends import llama_cpp as llama_cpp_backend  # noqa: E402
from mlxqwen.backends import sizing  # noqa: E402

ARCHS = ["qwen2", "qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text"]
TOKENS = [int(t) for t in np.random.RandomState(2).randint(0, 151_600, 24)]
# Both backends in float32 (llama.cpp with an F32 K/V cache and float32 attention) differ only by
# the order of float32 sums: measured <= 5e-7 relative to the largest logit on every architecture.
F32_TOL = 1e-5
REPLY = 5


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, tuple[Path, Path]]:
    return tiny_models


def load_f32(path: Path, **kwargs):
    return mlxqwen.load(path, backend="llama.cpp", dtype=mx.float32, **kwargs)


def step_logits(llm, tokens: list[int]) -> np.ndarray:
    """The runtime's logits after each token, fed one at a time."""
    runtime = llm.runtime
    seq = runtime.new_sequence()
    try:
        return np.stack([np.array(runtime.decode([seq], mx.array([t]))[0]) for t in tokens])
    finally:
        runtime.release(seq)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_matches_the_mlx_backend(models, arch):
    src, gguf = models[arch]
    llm, reference = load_f32(gguf), mlxqwen.load(src, backend="mlx", dtype=mx.float32)
    assert (llm.name, reference.name) == ("llama.cpp", "MLX")
    assert llm.tokenizer.eos_token_ids >= reference.tokenizer.eos_token_ids
    assert rel_err(step_logits(llm, TOKENS), step_logits(reference, TOKENS)) < F32_TOL

    prompt = "Write a short poem about the sea."
    assert llm.tokenizer.encode(llm.prompt_text(prompt)) == reference.tokenizer.encode(reference.prompt_text(prompt))
    got, expected = (last(m.stream(prompt, temperature=0, max_tokens=12, logprobs=0)) for m in (llm, reference))
    assert [t.token for t in got.logprobs] == [t.token for t in expected.logprobs]
    assert (got.text, got.thinking) == (expected.text, expected.thinking)
    np.testing.assert_allclose([t.logprob for t in got.logprobs], [t.logprob for t in expected.logprobs], atol=1e-4)
    llm.close()


# --- chats: only new tokens reach llama.cpp ---------------------------------------------


@pytest.fixture(scope="module", params=["qwen3_5_text", "qwen3"], ids=["hybrid", "kv-only"])
def llm(request, models):
    llm = load_f32(models[request.param][1])
    llm.generate("Warm up the counters", raw=True, max_tokens=2)  # llama.cpp reports 0 as 1
    yield llm
    llm.close()


def evaluated(llm) -> int:
    """Tokens llama.cpp has evaluated in this context, by its own count."""
    perf = llama_cpp.llama_perf_context(llm.runtime.ctx)
    return perf.n_p_eval + perf.n_eval


def check_against_scratch(llm, chat, message: str) -> None:
    """The next reply from the chat's state equals a greedy loop over the same tokens from an
    empty sequence."""
    done = chat.send(message, temperature=0, max_tokens=REPLY, logprobs=0)
    tokens, runtime = chat._tokens, llm.runtime
    seq = runtime.new_sequence()
    runtime.prefill(seq, tokens[: len(tokens) - REPLY - 1])
    logits = runtime.decode([seq], mx.array(tokens[len(tokens) - REPLY - 1 : len(tokens) - REPLY]))[0]
    expected, logprobs = [], []
    for _ in range(REPLY):
        expected.append(int(mx.argmax(logits)))
        logprobs.append(float(logits[expected[-1]] - mx.logsumexp(logits)))
        logits = runtime.decode([seq], mx.array(expected[-1:]))[0]
    runtime.release(seq)
    assert [t.token for t in done.logprobs] == expected
    np.testing.assert_allclose([t.logprob for t in done.logprobs], logprobs, atol=1e-4)


def test_chat_feeds_only_new_tokens(llm):
    chat = llm.chat(system="You are terse.", temperature=0, max_tokens=REPLY)
    start = evaluated(llm)
    for turn in range(4):
        before, cached = evaluated(llm), chat.tokens
        done = chat.send(f"Question {turn}: what is {turn} times {turn + 3}?")
        new = done.stats.prompt_tokens
        assert done.stats.cached_tokens == cached and 0 < new < 60
        assert evaluated(llm) - before == new + REPLY
    assert evaluated(llm) - start == chat.tokens  # every token of the conversation went through once
    check_against_scratch(llm, chat, "And the next one?")


def test_regenerate_and_edit_last_roll_back(llm):
    chat = llm.chat(temperature=0, max_tokens=REPLY)
    chat.send("First question")
    second = chat.send("Second question", logprobs=0)
    tokens = chat.tokens

    before = evaluated(llm)
    again = chat.regenerate(logprobs=0)
    assert evaluated(llm) - before == 1 + REPLY  # the prompt's last token, then the reply
    assert [t.token for t in again.logprobs] == [t.token for t in second.logprobs] and chat.tokens == tokens
    chat.regenerate(temperature=1.0, seed=3)
    check_against_scratch(llm, chat, "Third question")

    before = evaluated(llm)
    done = chat.edit_last("A different third question")
    assert evaluated(llm) - before == done.stats.prompt_tokens + REPLY
    assert 0 < done.stats.cached_tokens < tokens + 2 * REPLY + 20
    assert [m["content"] for m in chat.history if m["role"] == "user"][-1] == "A different third question"
    check_against_scratch(llm, chat, "Fourth question")


def test_cancel_threads_and_other_generations_keep_the_chat(llm):
    chat = llm.chat(temperature=0)
    chat.send("Start", max_tokens=REPLY)

    seen = 0
    for event in chat.stream("Tell me a long story", max_tokens=300):
        if isinstance(event, (TextDelta, ThinkingDelta)):
            seen += 1
            if seen == 2:
                threading.Thread(target=chat.cancel).start()
    assert event.finish_reason == "cancelled" and event.stats.generated_tokens < 30

    # stopped while the prompt is read: the message is dropped, the cache rolled back
    history, tokens = chat.history, chat.tokens
    chunk = llm.runtime.prefill_chunk
    llm.runtime.prefill_chunk = 4
    try:
        for event in chat.stream("A long message " * 40):  # 30 chunks: cancelled well before the last
            if isinstance(event, PrefillProgress):
                chat.cancel()
    finally:
        llm.runtime.prefill_chunk = chunk
    assert event.finish_reason == "cancelled" and (chat.history, chat.tokens) == (history, tokens)

    # another generation in between, and the next turns in other threads
    assert llm.generate("Something else entirely", raw=True, temperature=0, max_tokens=3) is not None
    errors = []

    def turn():
        try:
            chat.send("Go on", max_tokens=3, temperature=0)
        except Exception as e:  # re-raised in the test's thread
            errors.append(e)

    worker = threading.Thread(target=turn)
    worker.start()
    worker.join()
    assert not errors
    check_against_scratch(llm, chat, "Shorter please")


def test_stop_strings_and_thinking(llm):
    thinking = [e for e in llm.stream("Hello", think=True, temperature=0, max_tokens=8) if isinstance(e, ThinkingDelta)]
    assert thinking  # the template opened <think>: the reply streams as thinking
    text = llm.generate("Hi", raw=True, temperature=0, max_tokens=12)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    done = last(llm.stream("Hi", raw=True, temperature=0, max_tokens=12, stop=[stop]))
    assert done.finish_reason == "stop" and done.text == text[: text.index(stop)]


# --- CLI and TUI -------------------------------------------------------------------------


def test_cli_generate_runs_on_llama_cpp(models, capsys):
    from mlxqwen.cli import main

    gguf = str(models["qwen3_5_text"][1])
    args = ["generate", gguf, "-p", "Hello", "--backend", "llama.cpp", "--max-tokens", "4", "--temp", "0", "--raw"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    llm = load_f32(models["qwen3_5_text"][1])
    assert out == llm.generate("Hello", raw=True, temperature=0, max_tokens=4) + "\n"
    assert err.startswith("llama.cpp · prompt 1 tokens, ") and "· reply 4 tokens, " in err
    llm.close()
    assert main(["generate", gguf, "-p", "Hello", "--backend", "mlx"]) == 1
    assert "run a GGUF file with backend 'llama.cpp'" in capsys.readouterr().err


@pytest.mark.anyio
async def test_tui_chats_on_llama_cpp(models, tmp_path):
    app = ChatApp(models["qwen3_5_text"][1], store=ChatStore(tmp_path / "chats.sqlite"))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.llm.name == "llama.cpp"
        app.apply_settings(ChatSettings(think=False, temperature=1.0, max_tokens=6))
        await send(pilot, "First question")
        await send(pilot, "Second question")
        assert "llama.cpp · ctx" in str(app.query_one("#status-text").render())
        reply = conversation(app)[-1]
        assert reply["role"] == "assistant" and len(conversation(app)) == 4
        await pilot.press("ctrl+r")
        await answered(pilot)
        stats = app.store.messages(app.chat.id)[-1].stats
        assert stats["prompt_tokens"] == 1 and stats["generated_tokens"] == 6  # nothing re-read
    assert app.engine_stopped


# --- quantized files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A checkpoint with rows of 256, so that llama.cpp's K-quants apply, and its MLX logits."""
    ref = build_reference("qwen3", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    src = save_checkpoint(ref, tmp_path_factory.mktemp("wide") / "hf")
    return src, step_logits(mlxqwen.load(src, backend="mlx", dtype=mx.float32), TOKENS)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_files_load_and_generate(wide, tmp_path, quant):
    src, expected = wide
    llm = mlxqwen.load(to_gguf(src, tmp_path / f"m-{quant}.gguf", quant))  # auto: a .gguf runs on llama.cpp
    assert llm.name == "llama.cpp"
    assert min_cosine(step_logits(llm, TOKENS), expected) > QUANT_CASES[quant][2]
    done = last(llm.stream("Hello", temperature=0.7, top_k=20, max_tokens=8, seed=1))
    assert done.stats.generated_tokens == 8 and done.finish_reason == "length"
    llm.close()


# --- choosing the backend, errors --------------------------------------------------------


def test_backend_choice(models, tmp_path, monkeypatch, caplog):
    src, gguf = models["qwen3"]
    monkeypatch.setattr(backends, "apple_silicon", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mlxqwen"):
        llm = mlxqwen.load(src)  # no GGUF weights: MLX on the CPU, and the command that writes them
    assert llm.name == "MLX" and backends.convert_command(src) in caplog.text
    with pytest.raises(ModelLoadError, match="no GGUF weights for llama.cpp; write them with: mlxqwen convert"):
        mlxqwen.load(src, backend="llama.cpp")

    both = tmp_path / "both"
    both.mkdir()
    for f in src.iterdir():
        (both / f.name).symlink_to(f)
    (both / "model-F32.gguf").symlink_to(gguf)
    (both / "mmproj-model-F16.gguf").write_bytes(b"not a model")
    assert backends.choose(both) == backends.Choice("llama.cpp", both / "model-F32.gguf")
    assert backends.choose(gguf, "auto").backend == "llama.cpp"
    assert backends.choose(both, "mlx") == backends.Choice("mlx", both)
    monkeypatch.setattr(backends, "apple_silicon", lambda: True)
    assert backends.choose(both) == backends.Choice("mlx", both)
    assert backends.choose(gguf).backend == "llama.cpp"  # a GGUF file runs on llama.cpp anywhere

    (both / "model-Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several GGUF models"):
        backends.choose(both, "llama.cpp")
    with pytest.raises(ValueError, match="auto, mlx, llama.cpp"):
        backends.choose(src, "torch")
    monkeypatch.setattr(backends, "llama_cpp_installed", lambda: False)
    with pytest.raises(ModelLoadError, match=r"install it with pip install 'mlxqwen\[llama\]'"):
        backends.choose(gguf)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_kv_cache(tmp_path, kv_bits):
    src = save_checkpoint(build_reference("qwen3", vocab_size=VOCAB, head_dim=32), tmp_path / "hf")
    gguf = to_gguf(src, tmp_path / "m.gguf", "F32")
    llm, reference = mlxqwen.load(gguf, kv_bits=kv_bits), load_f32(gguf)
    assert min_cosine(step_logits(llm, TOKENS), step_logits(reference, TOKENS)) > 0.99
    llm.close()
    reference.close()


def test_recommended_sampling(models, tmp_path, monkeypatch):
    src, gguf = models["qwen3"]
    beside = tmp_path / "model"
    beside.mkdir()
    (beside / "m.gguf").symlink_to(gguf)
    (beside / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_k": 20}')
    llm = mlxqwen.load(beside / "m.gguf")
    assert (llm.defaults.temperature, llm.defaults.top_k, llm.defaults.top_p) == (0.6, 20, 1.0)
    llm.close()

    write_metadata = gguf_mapping.write_metadata

    def with_sampling(w, *args):  # the keys llama.cpp reads as a model's recommended sampling
        write_metadata(w, *args)
        w.add_float32("general.sampling.temp", 0.7)
        w.add_int32("general.sampling.top_k", 40)
        w.add_float32("general.sampling.top_p", 0.8)

    monkeypatch.setattr(gguf_mapping, "write_metadata", with_sampling)
    llm = mlxqwen.load(to_gguf(src, beside / "s.gguf", "F32"))
    assert (llm.defaults.temperature, llm.defaults.top_k, llm.defaults.top_p) == pytest.approx((0.7, 40, 0.8))
    llm.close()


def test_load_errors_and_memory(models, tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ModelLoadError, match="fake.gguf: not a GGUF file"):
        mlxqwen.load(fake)
    data = models["qwen3"][1].read_bytes()
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:100_000])
    with pytest.raises(ModelLoadError, match="header.gguf: truncated GGUF header$"):
        mlxqwen.load(header)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:-100_000])
    with pytest.raises(ModelLoadError, match=r"broken.gguf: llama.cpp cannot load this model \(.+\)$") as info:
        mlxqwen.load(broken)
    assert "\n" not in str(info.value)

    gguf = models["qwen3_5_text"][1]
    llm = mlxqwen.load(gguf)
    assert llm.max_context == 4096  # the model's own, under the default cap
    llm.close()
    monkeypatch.setattr(llama_cpp_backend, "DEFAULT_CONTEXT", 1024)
    llm = mlxqwen.load(gguf)
    assert llm.max_context == 1024
    llm.close()
    with pytest.raises(ModelLoadError, match=r"context of 1024 tokens \(K cache type q8_0 .* n_embd_head_k=16\)$"):
        mlxqwen.load(gguf, kv_bits=8)
    with pytest.raises(ValueError, match="kv_bits=6"):
        mlxqwen.load(gguf, kv_bits=6)
    with pytest.raises(ModelLoadError, match="max_context=4000000 is past the 4,096 tokens this model handles"):
        mlxqwen.load(gguf, max_context=4_000_000)
    budget = memory.GiB + sizing(gguf)[1].estimate(0).runtime
    monkeypatch.setattr(memory, "memory_budget", lambda: budget)
    yarn = {"rope_type": "yarn", "factor": 1000}
    with pytest.raises(
        InsufficientMemoryError, match=r"max_context=4000000 the model does not fit.*; max_context=\d+ fits$"
    ):
        mlxqwen.load(gguf, max_context=4_000_000, rope_scaling=yarn)
    monkeypatch.setattr(memory, "memory_budget", lambda: memory.GiB // 2)
    with pytest.raises(InsufficientMemoryError, match="at 1024 tokens of context the model does not fit"):
        mlxqwen.load(gguf)
