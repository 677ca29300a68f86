"""The engine: requests run together get the tokens each gets alone (every architecture, MLX and
llama.cpp), bounded by sequences, queue and K/V; a conversation resent whole each turn (as HTTP
clients do) reads only the new turn; the prefix cache survives a restart and ignores a corrupt
file; verify then commit leaves a state equal to plain decoding."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import ARCHS

import mlxqwen
from mlxqwen import ContextLimitError, QueueFullError
from mlxqwen.backends import llama_cpp as llama_cpp_backend
from mlxqwen.engine import Request
from mlxqwen.llm import last

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and then",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24",
    "A",
    "Once upon a time, in a land far away, there lived a",
]
N = 32


def load(tiny_models, arch: str, backend: str, **kwargs) -> mlxqwen.LLM:
    hf, gguf = tiny_models[arch]
    return mlxqwen.load(hf if backend == "mlx" else gguf, backend=backend, dtype=mx.float32, **kwargs)


def greedy(llm, prompts: list[str], cancel: int | None = None, monkeypatch=None) -> list[list[int]]:
    """The greedy tokens of each prompt, all submitted at once; `cancel`: that one is stopped at
    the 4th decode step."""
    options = llm.options(temperature=0, max_tokens=N, logprobs=0)
    handles = [llm.engine.submit(Request(llm.tokenizer.encode(p), options)) for p in prompts]
    if cancel is not None:
        steps, decode = [], llm.runtime.decode

        def cancelling(seqs, tokens):
            steps.append(len(seqs))
            if len(steps) == 4:
                handles[cancel].cancel()
            return decode(seqs, tokens)

        monkeypatch.setattr(llm.runtime, "decode", cancelling)
    return [[t.token for t in last(iter(h)).logprobs] for h in handles]


def count_decodes(llm, monkeypatch) -> list[int]:
    """The batch size of every decode step."""
    sizes, decode = [], llm.runtime.decode
    monkeypatch.setattr(llm.runtime, "decode", lambda seqs, tokens: sizes.append(len(seqs)) or decode(seqs, tokens))
    return sizes


def count_tokens(llm, monkeypatch) -> list[int]:
    """A counter of the tokens the runtime evaluates (prefill and decode)."""
    counter, runtime = [0], llm.runtime
    prefill, decode = runtime.prefill, runtime.decode

    def counting_prefill(seq, tokens):
        counter[0] += len(tokens)
        return prefill(seq, tokens)

    def counting_decode(seqs, tokens):
        counter[0] += tokens.size
        return decode(seqs, tokens)

    monkeypatch.setattr(runtime, "prefill", counting_prefill)
    monkeypatch.setattr(runtime, "decode", counting_decode)
    return counter


@pytest.mark.parametrize("backend", ["mlx", "llama.cpp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_alone(tiny_models, arch, backend, monkeypatch):
    llm = load(tiny_models, arch, backend, prefix_cache=False)
    alone = [greedy(llm, [p])[0] for p in PROMPTS]
    assert all(len(t) == N for t in alone)
    sizes = count_decodes(llm, monkeypatch)
    for size in (2, 5):
        assert greedy(llm, PROMPTS[:size]) == alone[:size]
    assert max(sizes) == 5
    got = greedy(llm, PROMPTS, cancel=1, monkeypatch=monkeypatch)
    assert len(got[1]) < N and got[1] == alone[1][: len(got[1])]
    assert got[:1] + got[2:] == alone[:1] + alone[2:]
    llm.close()


def test_bounds_queue_and_kv(tiny_models, monkeypatch):
    llm = load(tiny_models, "qwen3_5_text", "mlx", prefix_cache=False, max_concurrent=2, max_queue=1)
    alone = [greedy(llm, [p])[0] for p in PROMPTS]

    # K/V for two short sequences at most: the others wait, or are put back and resume
    monkeypatch.setattr(llm.runtime, "kv_capacity", 512)
    sizes = count_decodes(llm, monkeypatch)
    assert greedy(llm, PROMPTS[:3]) == alone[:3]
    assert max(sizes) == 2
    with pytest.raises(ContextLimitError, match=r"needs \d+ tokens of K/V, and this model's memory holds 512"):
        last(llm.stream("word " * 600, raw=True))

    # two running, one waiting: a fourth is refused
    gate = threading.Event()
    original = llm.runtime.prefill

    def held(seq, tokens):
        assert gate.wait(30)
        return original(seq, tokens)

    monkeypatch.setattr(llm.runtime, "prefill", held)
    options = llm.options(temperature=0, max_tokens=4)
    handles = [llm.engine.submit(Request(llm.tokenizer.encode(p), options)) for p in PROMPTS[1:4]]
    with pytest.raises(QueueFullError, match="max_queue=1"):
        llm.engine.submit(Request(llm.tokenizer.encode("one more"), options))
    gate.set()
    assert all(last(iter(h)).stats.generated_tokens == 4 for h in handles)


def test_preempted_sequences_resume_with_the_same_tokens(tiny_models, monkeypatch):
    llm = load(tiny_models, "qwen3", "mlx", prefix_cache=False)
    prompts = ["word " * 240, "other " * 240]  # each crosses a block of 256 positions while generating
    alone = [greedy(llm, [p])[0] for p in prompts]
    # both prompts fit, but not both sequences grown past the next block: the younger waits
    monkeypatch.setattr(llm.runtime, "kv_capacity", 512)
    preempted = []
    preempt = llm.engine._preempt
    monkeypatch.setattr(llm.engine, "_preempt", lambda s: preempted.append(s) or preempt(s))
    assert greedy(llm, prompts) == alone
    assert preempted


def conversation_turns(llm, turns: int = 10) -> list:
    """A chat sent whole each turn, as an HTTP client does; thinking on every other turn."""
    messages, replies = [{"role": "system", "content": "You are terse."}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what is {turn} times {turn + 3}?"})
        done = last(llm.stream(messages, think=turn % 2 == 0, temperature=0, max_tokens=6))
        replies.append(done)
        messages.append(done.to_message())
    return replies


@pytest.mark.parametrize("backend", ["mlx", "llama.cpp"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5_text"])
def test_stateless_conversation_reads_only_each_new_turn(tiny_models, arch, backend, monkeypatch):
    llm, plain = load(tiny_models, arch, backend), load(tiny_models, arch, backend, prefix_cache=False)
    counted = count_tokens(llm, monkeypatch)
    replies = conversation_turns(llm)
    assert [(d.text, d.thinking) for d in replies] == [(d.text, d.thinking) for d in conversation_turns(plain)]
    new = [d.stats.prompt_tokens for d in replies]
    assert replies[0].stats.cached_tokens == 0
    assert all(d.stats.cached_tokens > prev.stats.cached_tokens for prev, d in zip(replies, replies[1:], strict=False))
    assert max(new[1:]) <= 40  # the new question and the template's framing of it
    total = replies[-1].stats.cached_tokens + new[-1] + replies[-1].stats.generated_tokens
    naive = sum(d.stats.cached_tokens + d.stats.prompt_tokens for d in replies)
    # every token of the final conversation once, plus each reply as generated (the template renders
    # it differently for the next turn, without its thinking): linear in the conversation, not quadratic
    assert counted[0] < 1.6 * total
    assert naive > 3 * total
    llm.close()
    plain.close()


RESTART = textwrap.dedent(
    """
    import json, sys
    import mlxqwen
    from mlxqwen.llm import last
    path, backend, cache, messages = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    llm = mlxqwen.load(path, backend=backend, prefix_cache_dir=cache)
    done = last(llm.stream(messages, temperature=0, max_tokens=6))
    print(json.dumps({"reply": done.to_message(), "cached": done.stats.cached_tokens}))
    """
)


@pytest.mark.parametrize("backend", ["mlx", "llama.cpp"])
def test_disk_tier_survives_a_restart_and_ignores_corrupt_files(tiny_models, backend, tmp_path):
    hf, gguf = tiny_models["qwen3_5_text"]
    path, cache = hf if backend == "mlx" else gguf, tmp_path / "cache"

    def turn(messages):
        args = [sys.executable, "-c", RESTART, str(path), backend, str(cache), json.dumps(messages)]
        return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)

    first = [{"role": "user", "content": "What is 2 + 2?"}]
    out = turn(first)
    assert out["cached"] == 0 and len(list(cache.rglob("*.safetensors"))) >= 2
    second = first + [out["reply"], {"role": "user", "content": "And 3 + 3?"}]
    resumed = turn(second)  # a new process: the state after the first turn comes from disk
    assert resumed["cached"] > 10

    files = list(cache.rglob("*.safetensors"))
    for file in files:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    again = turn(second)
    assert again == {**resumed, "cached": 0}  # corrupt files ignored (and replaced): the same reply
    assert all(f.stat().st_size > 0 for f in cache.rglob("*.safetensors"))


def verify_runtime(tiny_models, arch: str, backend: str):
    hf, gguf = tiny_models[arch]
    if backend == "mlx":
        return load(tiny_models, arch, backend).runtime
    return llama_cpp_backend.load(gguf, dtype=mx.float32, n_seq_max=4, rollback=3)


@pytest.mark.parametrize("backend", ["mlx", "llama.cpp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_verify_then_commit_equals_plain_decoding(tiny_models, arch, backend):
    """Two sequences verify 4 tokens each in one pass and keep 1 and 3 of them: the logits of that
    pass and of the next step equal those of sequences that were only ever fed the kept tokens."""
    runtime = verify_runtime(tiny_models, arch, backend)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 151_000, n).tolist() for n in (9, 14)]
    drafts = [rng.randint(0, 151_000, 4).tolist() for _ in prompts]
    kept = [1, 3]

    seqs = [runtime.new_sequence() for _ in prompts]
    for seq, prompt in zip(seqs, prompts, strict=True):
        runtime.prefill(seq, prompt)
    logits = np.array(runtime.verify(seqs, mx.array(drafts)))
    runtime.commit(seqs, kept)
    following = [rng.randint(0, 151_000) for _ in prompts]
    after = np.array(runtime.decode(seqs, mx.array(following)))

    for i, (prompt, draft, n) in enumerate(zip(prompts, drafts, kept, strict=True)):
        plain = runtime.new_sequence()
        runtime.prefill(plain, prompt)
        steps = [np.array(runtime.decode([plain], mx.array([t]))[0]) for t in draft[:n] + [following[i]]]
        scale = np.abs(steps[-1]).max()
        np.testing.assert_allclose(logits[i, :n], np.stack(steps[:n]), atol=1e-5 * scale)
        np.testing.assert_allclose(after[i], steps[-1], atol=1e-5 * scale)
        runtime.release(plain)
    for seq in seqs:
        runtime.release(seq)


def test_constrained_answers_in_a_batch_after_the_thinking(monkeypatch):
    """A JSON format binds the answer only (after </think>), and a request without one in the same batch
    is left alone."""
    from checkpoints import TOKENIZER_DIR
    from scripted import ScriptedRuntime, scripted_llm

    from mlxqwen.tokenizer import Tokenizer

    reply = 'Let me see.</think>{"a":1} and then some words'
    runtime = ScriptedRuntime(Tokenizer.from_dir(TOKENIZER_DIR), [reply, reply])
    llm = scripted_llm(runtime)
    sizes = count_decodes(llm, monkeypatch)
    handles = [
        llm.engine.submit(Request(llm.tokenizer.encode(llm.prompt_text("Hi?")), options, thinking=True))
        for options in (llm.options(format="json"), llm.options())
    ]
    constrained, free = (last(iter(h)) for h in handles)
    assert (constrained.thinking, constrained.text) == ("Let me see.", '{"a":1}')
    assert free.text == '{"a":1} and then some words'
    assert max(sizes) == 2
    with pytest.raises(ValueError, match="format"):
        llm.engine.submit(Request([1, 2], llm.options(format={"type": "no such type"})))
