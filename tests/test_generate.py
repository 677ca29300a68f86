"""The engine on tiny models with the real Qwen tokenizer: greedy equals a plain reference loop,
seeded sampling, the sampler's filters and penalties, stop strings, EOS, limits, logprobs,
cancellation, worker threads, quantized K/V, and typed events."""

from __future__ import annotations

import json
import math
import threading

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TOKENIZER_DIR, build_reference, save_checkpoint
from scripted import ScriptedRuntime, scripted_llm

import mlxqwen
from mlxqwen import ContextLimitError, Done, GenerationOptions, TextDelta, ThinkingDelta, ToolCall
from mlxqwen.cache import KVCache, QuantizedKVCache
from mlxqwen.cli import main
from mlxqwen.sampling import Sampler, SamplingParams, recommended_sampling, top_k_ids
from mlxqwen.tokenizer import Tokenizer

PROMPT = "The capital of France is"
N = 24


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5_text"])
def llm(request, tmp_path_factory):
    ref = build_reference(request.param, vocab_size=151936)
    return mlxqwen.load(save_checkpoint(ref, tmp_path_factory.mktemp(request.param)))


def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[mx.array]]:
    """A plain loop: the whole prompt in one call, then one token at a time."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    tokens, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits)
        tokens.append(int(mx.argmax(logits)))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
    return tokens, all_logits


def tokens_of(done: Done) -> list[int]:
    return [t.token for t in done.logprobs]


def run(llm, prompt=PROMPT, **kwargs) -> Done:
    return mlxqwen.llm.last(llm.stream(prompt, raw=True, logprobs=0, **kwargs))


def test_greedy_equals_reference_loop(llm):
    prompt = llm.tokenizer.encode(PROMPT)
    expected, logits = reference_greedy(llm.model, prompt, N)
    done = run(llm, temperature=0, max_tokens=N)
    assert tokens_of(done) == expected
    assert done.finish_reason == "length"
    assert done.text == llm.tokenizer.decode(expected, skip_special_tokens=True).strip()
    ref_logprobs = [float(lg[t] - mx.logsumexp(lg)) for lg, t in zip(logits, expected, strict=True)]
    np.testing.assert_allclose([t.logprob for t in done.logprobs], ref_logprobs, rtol=1e-4, atol=1e-4)

    s = done.stats
    assert (s.prompt_tokens, s.cached_tokens, s.generated_tokens) == (len(prompt), 0, N)
    assert s.ttft > 0 and s.prompt_tps > 0 and s.generation_tps > 0 and s.peak_memory > 0


def test_chunked_prefill_and_top_logprobs(llm, monkeypatch):
    prompt = llm.tokenizer.encode(PROMPT * 3)
    expected, _ = reference_greedy(llm.model, prompt, 8)
    monkeypatch.setattr(llm.runtime, "prefill_chunk", 4)
    llm.prefix_cache.clear()  # the whole prompt is read
    events = list(llm.stream(PROMPT * 3, raw=True, temperature=0, max_tokens=8, logprobs=5))
    progress = [e for e in events if isinstance(e, mlxqwen.PrefillProgress)]
    assert [p.done for p in progress] == list(range(4, len(prompt) - 1, 4)) + [len(prompt) - 1]
    done = events[-1]
    assert tokens_of(done) == expected
    for t in done.logprobs:
        assert t.top[0][0] == t.token and len(t.top) == 5
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)


def test_seeded_sampling_is_reproducible(llm):
    a = run(llm, temperature=1.0, seed=7, max_tokens=16)
    b = run(llm, temperature=1.0, seed=7, max_tokens=16)
    c = run(llm, temperature=1.0, seed=8, max_tokens=16)
    assert tokens_of(a) == tokens_of(b) != tokens_of(c)
    d = run(llm, temperature=0.8, top_k=20, top_p=0.95, min_p=0.05, presence_penalty=1.5, seed=3, max_tokens=16)
    options = GenerationOptions(temperature=0.8, top_k=20, top_p=0.95, min_p=0.05, presence_penalty=1.5, seed=3)
    assert tokens_of(d) == tokens_of(run(llm, options=options, max_tokens=16))


def test_stop_strings_eos_and_limits(llm, monkeypatch):
    tokens, _ = reference_greedy(llm.model, llm.tokenizer.encode(PROMPT), N)
    tok = llm.tokenizer
    raw = tok.decode(tokens, skip_special_tokens=True)
    pieces = [tok.decode(tokens[: i + 1], True)[len(tok.decode(tokens[:i], True)) :] for i in range(N)]
    k = next(i for i in range(4, N - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[k].strip()[-2:] + pieces[k + 1].strip()[:2]  # spans two tokens
    done = run(llm, temperature=0, max_tokens=N, stop=("never appears", stop))
    assert done.finish_reason == "stop"
    assert done.text == raw[: raw.find(stop)].strip()

    eos = tokens[5]
    monkeypatch.setattr(tok, "eos_token_ids", {eos})
    done = run(llm, temperature=0, max_tokens=N)
    assert done.finish_reason == "stop"
    assert tokens_of(done) == tokens[: tokens.index(eos) + 1]
    assert done.text == tok.decode(tokens[: tokens.index(eos)], True).strip()
    monkeypatch.undo()

    prompt = tok.encode(PROMPT)
    monkeypatch.setattr(llm.runtime, "max_context", len(prompt) + 3)
    done = run(llm, temperature=0, max_tokens=N)
    assert (done.finish_reason, done.stats.generated_tokens) == ("length", 3)
    monkeypatch.setattr(llm.runtime, "max_context", len(prompt))
    with pytest.raises(ContextLimitError, match="maximum context"):
        run(llm)


def test_cancel_from_another_thread(llm):
    cancel = threading.Event()
    seen = 0
    for event in llm.stream(PROMPT, raw=True, temperature=0, max_tokens=200, cancel=cancel):
        if isinstance(event, (TextDelta, ThinkingDelta)):
            seen += 1
            if seen == 3:
                setter = threading.Thread(target=cancel.set)
                setter.start()
                setter.join()
    assert event.finish_reason == "cancelled"
    assert event.stats.generated_tokens < 20

    cancel = threading.Event()
    cancel.set()
    done = mlxqwen.llm.last(llm.stream(PROMPT, raw=True, cancel=cancel))
    assert (done.finish_reason, done.stats.generated_tokens) == ("cancelled", 0)


def test_generation_in_a_worker_thread(llm):
    expected = llm.generate(PROMPT, raw=True, temperature=0, max_tokens=12)
    results = []
    worker = threading.Thread(
        target=lambda: results.append(llm.generate(PROMPT, raw=True, temperature=0, max_tokens=12))
    )
    worker.start()
    worker.join()
    assert results == [expected] and expected


def test_chat_template_prompt(llm):
    text = llm.prompt_text("hi", system="Be brief.", think=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    llm.prefix_cache.clear()
    done = mlxqwen.llm.last(llm.stream("hi", system="Be brief.", temperature=0, max_tokens=4, think=False))
    assert done.stats.prompt_tokens == len(llm.tokenizer.encode(text))


@pytest.mark.parametrize("vocab", [151936, 151937, 248320, 1001])
def test_top_k_of_a_large_vocabulary(vocab):
    rng = np.random.default_rng(vocab)
    crowded = rng.normal(size=vocab).astype(np.float32)
    crowded[5:25] += 10  # the whole top 20 in one block
    spread = rng.normal(size=vocab).astype(np.float32)
    spread[:: vocab // 20][:20] += 10  # one in each of 20 blocks
    for logits in (rng.normal(size=vocab).astype(np.float32), crowded, spread):
        got = np.array(top_k_ids(mx.array(logits), 20))
        assert sorted(got.tolist()) == sorted(np.argpartition(-logits, 19)[:20].tolist())
    draws = [Sampler(SamplingParams(top_k=20, seed=s))(mx.array(crowded)).token.item() for s in range(30)]
    assert set(draws) <= set(range(5, 25)) and len(set(draws)) > 5


def test_sampler_filters_and_penalties():
    logits = mx.log(mx.array([0.5, 0.3, 0.15, 0.05]))

    def draws(n=400, context=(), **params) -> np.ndarray:
        sampler = Sampler(SamplingParams(seed=0, **params), context)
        return np.array([sampler(logits).token.item() for _ in range(n)])

    assert set(draws(top_k=2)) == {0, 1}
    assert set(draws(top_p=0.7)) == {0, 1}
    assert set(draws(top_p=0.85)) == {0, 1, 2}
    assert set(draws(min_p=0.4)) == {0, 1}
    free = np.bincount(draws(2000), minlength=4) / 2000
    np.testing.assert_allclose(free, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    hot = np.bincount(draws(2000, temperature=2.0), minlength=4) / 2000
    expected = np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum()
    np.testing.assert_allclose(hot, expected, atol=0.04)

    greedy = mx.array([2.0, 1.9, -1.0, -1.2])
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), [0])(greedy).token.item() == 1
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), [0, 1])(greedy).token.item() == 0
    # a repeated negative logit gets more negative: -1.0 * 1.5 < -1.2
    assert (
        Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), [0, 1, 2])(
            greedy + mx.array([-9, -9, 0, 0])
        ).token.item()
        == 3
    )
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=0.5))
    assert [sampler(greedy).token.item() for _ in range(3)] == [0, 1, 0]  # 1.5 < 1.9, then 1.4 < 1.5
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.3))
    assert [sampler(greedy).token.item() for _ in range(4)] == [0, 1, 0, 1]

    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert recommended_sampling({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}) == dict(
        temperature=0.6, top_p=0.95, top_k=20
    )
    assert recommended_sampling({"temperature": 0.6, "do_sample": False})["temperature"] == 0


def test_generation_config_gives_the_defaults(tmp_path):
    path = save_checkpoint(build_reference("qwen3", vocab_size=151936), tmp_path / "m")
    (path / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [151645, 151643]}'
    )
    llm = mlxqwen.load(path)
    assert (llm.defaults.temperature, llm.defaults.top_k, llm.defaults.top_p) == (0.6, 20, 0.95)
    assert llm.tokenizer.eos_token_ids == {151645, 151643}
    assert llm.options(temperature=0).top_k == 20


def test_quantized_kv_cache(tmp_path):
    path = save_checkpoint(build_reference("qwen3", head_dim=64, vocab_size=151936), tmp_path / "m")
    llm = mlxqwen.load(path)
    tokens = mx.array([llm.tokenizer.encode(PROMPT * 20)])
    for bits, tolerance in [(8, 0.02), (4, 0.2)]:
        q = mlxqwen.load(path, kv_bits=bits)
        plain, quant = llm.new_cache(), q.new_cache()
        assert all(type(c) is QuantizedKVCache for c in quant)
        expected = llm.model(tokens, cache=plain)[0, -1]
        got = q.model(tokens, cache=quant)[0, -1]
        assert float(mx.abs(got - expected).max() / mx.abs(expected).max()) < tolerance
        assert sum(c.nbytes for c in quant) < sum(c.nbytes for c in plain) * (bits + 4) / 32
        snap = quant[0].snapshot()
        quant[0].update_and_fetch(mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 3, 64)))
        quant[0].restore(snap)
        assert quant[0].offset == tokens.shape[1]
    with pytest.raises(ValueError, match="4 or 8"):
        mlxqwen.load(path, kv_bits=3)
    assert isinstance(llm.new_cache()[0], KVCache)


def test_events_from_a_scripted_model():
    backend = ScriptedRuntime(Tokenizer.from_dir(TOKENIZER_DIR))
    llm = scripted_llm(backend)
    backend.say(
        "The user wants the weather.\n</think>\n\nLet me check.\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    )
    events = list(llm.stream("Weather in Paris?"))  # the Qwen3.5 template opens <think>
    kinds = [type(e) for e in events]
    assert kinds.index(ThinkingDelta) < kinds.index(TextDelta) < kinds.index(ToolCall) < kinds.index(Done)
    done = events[-1]
    assert done.thinking == "The user wants the weather."
    assert done.text == "Let me check."
    assert done.tool_calls == (ToolCall("get_weather", {"city": "Paris"}),)
    assert done.finish_reason == "tool_calls"
    assert done.to_message()["tool_calls"][0]["function"]["name"] == "get_weather"
    assert math.isfinite(done.stats.ttft)

    backend.say("Hello")
    assert llm.generate("Hi", think=False) == "Hello"


def test_generate_command(llm, capsys):
    args = ["generate", str(llm.path), "-p", "Hello", "--max-tokens", "5", "--temp", "0", "--no-think"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == llm.generate("Hello", think=False, temperature=0, max_tokens=5) + "\n"
    assert "· reply 5 tokens, " in err and err.rstrip().endswith("length")
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["generated_tokens"] == 5 and result["text"] == out.strip()
    assert main(["generate", str(llm.path / "missing"), "-p", "x"]) == 1
    assert "error:" in capsys.readouterr().err
