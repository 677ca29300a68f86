"""Speculative decoding with the MTP head: the head computes what Qwen's head computes (a torch
reference); greedy output is the same token for token with and without it, alone and batched,
on random heads (most guesses refused) and the demo model (most kept); sampled output follows
the same distribution (chi-square); after refused guesses the model's state equals plain
decoding's; the head loads from the checkpoint or from a folder of its own."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import MTPReference, add_mtp_head, build_reference, reference_draft, save_checkpoint
from scipy.stats import chi2_contingency

import mlxqwen
from mlxqwen import ModelLoadError
from mlxqwen.demo import model_path
from mlxqwen.engine import Request
from mlxqwen.llm import last
from mlxqwen.loader import load_model
from mlxqwen.speculative import HEAD_RECENT, DepthChooser

HEADED = ["qwen3_5_text", "qwen3_5_moe_text"]
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and then", "1 2 3 4 5 6 7 8 9 10", "A"]


@pytest.fixture(scope="module")
def headed(tmp_path_factory) -> dict[str, tuple]:
    """arch -> (checkpoint with a random MTP head, transformers model, torch head)."""
    out = {}
    for arch in HEADED:
        ref = build_reference(arch, vocab_size=151936)
        head = MTPReference(ref)
        out[arch] = add_mtp_head(save_checkpoint(ref, tmp_path_factory.mktemp(arch)), head), ref, head
    return out


@pytest.mark.parametrize("arch", HEADED)
def test_head_computes_what_qwen_head_computes(headed, arch):
    path, ref, head = headed[arch]
    model, _ = load_model(path, dtype=mx.float32, mtp=True)
    tokens = [5, 17, 300, 42, 7, 99, 123, 4000, 12]
    with torch.no_grad():
        hidden = ref.model(torch.tensor([tokens])).last_hidden_state
        expected = ref.lm_head(head(hidden[:, :-1], torch.tensor([tokens[1:]]))).numpy()
    h = model.hidden(mx.array([tokens]))
    got = np.array(model.head(model.mtp(h[:, :-1], model.embed(mx.array([tokens[1:]])))))
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


def greedy(llm, prompts: list[str], n: int = 24) -> list[list[int]]:
    options = llm.options(temperature=0, max_tokens=n, logprobs=0)
    handles = [llm.engine.submit(Request(llm.tokenizer.encode(p), options)) for p in prompts]
    return [[t.token for t in last(iter(h)).logprobs] for h in handles]


@pytest.mark.parametrize("arch", HEADED)
def test_greedy_is_the_same_with_random_heads(headed, arch):
    path = headed[arch][0]
    plain = mlxqwen.load(path, dtype=mx.float32, mtp=False, prefix_cache=False)
    assert not plain.runtime.mtp
    expected = greedy(plain, PROMPTS)
    for depth in (None, 1, 2, 3):
        llm = mlxqwen.load(path, dtype=mx.float32, mtp=True, mtp_depth=depth, prefix_cache=False)
        assert llm.runtime.mtp
        assert [greedy(llm, [p])[0] for p in PROMPTS] == expected  # alone
        assert greedy(llm, PROMPTS) == expected  # batched: each sequence keeps its own number of guesses
    done = last(llm.stream(PROMPTS[1], raw=True, temperature=0, max_tokens=24))
    # 3 guesses a step from a random head: most refused, so about one token a step
    assert done.stats.draft_tokens >= 3 * 20 and done.stats.accepted_tokens < done.stats.draft_tokens / 4


def test_demo_model_keeps_most_guesses_and_answers_the_same():
    plain = mlxqwen.load(model_path("mlx"), backend="mlx", mtp=False)
    llm = mlxqwen.load(model_path("mlx"), backend="mlx", mtp_depth=3)
    chat, reference = llm.chat(max_tokens=120), plain.chat(max_tokens=120)
    for question in ("What is 37 + 48?", "What is the capital of Peru?"):
        done, expected = chat.send(question), reference.send(question)
        assert (done.text, done.thinking) == (expected.text, expected.thinking)
        assert done.stats.accepted_tokens > 0.6 * done.stats.draft_tokens > 0


@pytest.mark.parametrize(
    "penalties", [{}, dict(repetition_penalty=1.3, presence_penalty=0.5)], ids=["unpenalized", "penalized"]
)
def test_sampling_follows_the_same_distribution(tmp_path, penalties):
    """A tiny vocabulary and a random head: many guesses refused, residual draws among them. With
    penalties, each guess is tested against a distribution that counts the guesses kept before it."""
    ref = build_reference("qwen3_5_text", vocab_size=48)
    path = add_mtp_head(save_checkpoint(ref, tmp_path / "tiny"), MTPReference(ref))
    prompt, n, samples = [3, 7, 11, 5, 2], 4, 400
    options = dict(temperature=1.0, top_k=12, top_p=0.9, max_tokens=n, logprobs=0, **penalties)

    def draws(**load) -> np.ndarray:
        llm = mlxqwen.load(path, dtype=mx.float32, prefix_cache=False, max_concurrent=64, max_queue=samples, **load)
        handles = [llm.engine.submit(Request(prompt, llm.options(seed=s, **options))) for s in range(samples)]
        return np.array([[t.token for t in last(iter(h)).logprobs] for h in handles])

    plain, speculative = draws(mtp=False), draws(mtp=True, mtp_depth=3)
    for position in range(1, n):  # the tokens that guesses decided
        table = np.array([np.bincount(x[:, position], minlength=48) for x in (plain, speculative)])
        table = table[:, table.sum(axis=0) > 0]
        assert chi2_contingency(table).pvalue > 0.001, f"position {position}"


def test_state_after_refused_guesses_equals_plain_decoding(headed):
    runtime = mlxqwen.load(headed["qwen3_5_text"][0], dtype=mx.float32, mtp=True).runtime
    prompts = [[9, 8, 7, 6, 5, 4], [1, 2, 3]]
    seqs, plain = [runtime.new_sequence() for _ in prompts], [runtime.new_sequence() for _ in prompts]
    for seq, reference, prompt in zip(seqs, plain, prompts, strict=True):
        runtime.prefill(seq, prompt[:-1])
        runtime.prefill(reference, prompt[:-1])
    nexts, kept_total = mx.array([p[-1] for p in prompts]), 0
    for _ in range(4):
        guesses = runtime.draft(seqs, nexts, 3, lambda logits: mx.argmax(logits, axis=-1))
        fed = mx.concatenate([nexts[:, None], guesses], axis=1)
        logits = runtime.verify(seqs, fed)
        accepted, following = [], []
        for row in range(len(seqs)):
            model = mx.argmax(logits[row], axis=-1).tolist()
            n = next((j for j in range(3) if guesses[row, j].item() != model[j]), 3)
            accepted.append(n + 1)
            following.append(model[n])
        runtime.commit(seqs, accepted)
        for row, n in enumerate(accepted):
            for token in fed[row, :n].tolist():
                runtime.decode([plain[row]], mx.array([token]))
        kept_total += sum(accepted) - len(seqs)
        nexts = mx.array(following)
    assert kept_total < 4 * 3 * len(seqs)  # some guesses were refused
    got = np.array(runtime.decode(seqs, nexts))
    for row, reference in enumerate(plain):
        expected = np.array(runtime.decode([reference], nexts[row : row + 1])[0])
        np.testing.assert_allclose(got[row], expected, atol=1e-5 * np.abs(expected).max())


def test_the_head_forgets_what_plain_steps_fed_it(headed):
    """While nothing drafts, the head does not read what the model reads: past twice `HEAD_RECENT`
    tokens it keeps only the last of them, and then drafts what Qwen's head computes reading those
    (the model's hidden states still those of the whole sequence). Restored cut shorter, a snapshot
    taken then has its head cut by as many positions."""
    path, ref, head = headed["qwen3_5_text"]
    runtime = mlxqwen.load(path, dtype=mx.float32, mtp=True).runtime
    tokens = np.random.RandomState(3).randint(0, 151_000, 5).tolist()
    seq = runtime.new_sequence()
    runtime.prefill(seq, tokens[:-1])
    following = runtime.decode([seq], mx.array(tokens[-1:])).argmax(axis=-1).item()
    for _ in range(2 * HEAD_RECENT + 10):
        tokens.append(following)
        following = runtime.decode([seq], mx.array([following])).argmax(axis=-1).item()
    assert HEAD_RECENT <= seq.waiting_pairs < 2 * HEAD_RECENT and seq.head_cache.offset == 0
    unread = seq.waiting_pairs
    guesses = runtime.draft([seq], mx.array([following]), 3, lambda logits: mx.argmax(logits, axis=-1))
    assert (following, guesses.tolist()[0]) == reference_draft(ref, head, tokens, 3, recent=unread + 1)

    snapshot = runtime.snapshot(seq)
    assert seq.head_cache.offset == unread + 1 < seq.length - 1
    restored = runtime.new_sequence()
    runtime.restore(restored, snapshot, snapshot.length - 5)
    assert restored.head_cache.offset == unread + 1 - 5


def test_head_loading(headed, tmp_path):
    path = headed["qwen3_5_text"][0]
    without = save_checkpoint(headed["qwen3_5_text"][1], tmp_path / "no-head")
    assert not mlxqwen.load(without, dtype=mx.float32).runtime.mtp  # "auto": none there
    with pytest.raises(ModelLoadError, match="no-head: this checkpoint has no MTP head"):
        mlxqwen.load(without, mtp=True)
    # a head shipped apart, in a folder of its own (names with or without "mtp.")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    (tmp_path / "head").mkdir()
    save_file(
        {k.removeprefix("mtp."): v for k, v in tensors.items() if k.startswith("mtp.")},
        tmp_path / "head" / "h.safetensors",
    )
    apart = mlxqwen.load(without, dtype=mx.float32, mtp=tmp_path / "head", prefix_cache=False, mtp_depth=3)
    together = mlxqwen.load(path, dtype=mx.float32, prefix_cache=False, mtp_depth=3)
    assert apart.runtime.mtp and greedy(apart, PROMPTS[:2]) == greedy(together, PROMPTS[:2])
    qwen3 = save_checkpoint(build_reference("qwen3", vocab_size=151936), tmp_path / "qwen3")
    with pytest.raises(ModelLoadError, match="an MTP head needs a Qwen3.5-family model"):
        mlxqwen.load(qwen3, mtp=tmp_path / "head")


def test_servers_report_the_guesses():
    from mlxqwen.server.ollama_api import _final
    from mlxqwen.server.openai_api import _usage

    llm = mlxqwen.load(model_path("mlx"), backend="mlx", mtp_depth=2)
    done = last(llm.stream("What is 37 + 48?", max_tokens=60))
    assert done.stats.draft_tokens > 0
    details = _usage(done)["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == done.stats.accepted_tokens
    assert details["rejected_prediction_tokens"] == done.stats.draft_tokens - done.stats.accepted_tokens

    class Finished:  # what Ollama's last chunk is made from
        load_seconds = 0.0

    Finished.done = done
    final = _final(Finished(), 0.0)
    assert (final["draft_count"], final["draft_accepted_count"]) == (
        done.stats.draft_tokens,
        done.stats.accepted_tokens,
    )


def _steps_at(depth: int, kept: float) -> float:
    """Steps per token at `depth` for the simulated machine below."""
    return (1 + 0.25 * depth) / sum(kept**j for j in range(depth + 1))


@pytest.mark.parametrize("kept, best", [(0.0, 0), (0.2, 0), (0.9, 3), (0.5, 1)])
@pytest.mark.parametrize("load", [0, 1], ids=["quiet", "busy"])
def test_depth_follows_what_pays(kept, best, load):
    """Steps cost 1 + 0.25 per guess, the first at each depth 10x (new shapes) and the first after
    a change of depth 1.5x (what the other depth left behind); guesses are kept at `kept`: the
    chooser settles on the depth with the most tokens a second, probes the others only now and
    then, and on a quiet machine decodes within 3 % of the time that depth alone takes (at 0.2,
    depth 1 is 4 % slower than depth 0: measured by the first steps after a change, depth 0 looked
    50 % dearer than it is). On a busy machine a third of the steps, at any depth, take up to
    several times longer (other processes ran meanwhile)."""
    chooser, rng = DepthChooser(), np.random.RandomState(0)
    chosen, previous, total, tokens = [], None, 0.0, 0
    for i in range(4000):
        depth = chooser.choose(batch=1)
        seconds = (1 + 0.25 * depth) * (10 if (depth, 1) not in chooser.measured else 1.5 if depth != previous else 1)
        n = next((j for j in range(depth) if rng.rand() > kept), depth)
        if i >= 100:
            total, tokens = total + seconds, tokens + n + 1
        seconds += load * (rng.rand() < 0.3) * rng.exponential(3)
        chooser.record(depth, 1, seconds, [n] if depth else [])
        chosen.append(depth)
        previous = depth
    later = chosen[100:]
    assert max(set(later), key=later.count) == best
    assert later.count(best) / len(later) > 0.9
    if not load:
        assert total / tokens < 1.03 * _steps_at(best, kept)
