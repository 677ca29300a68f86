"""The MTP head on llama.cpp: `--to gguf` writes a Qwen3.5 checkpoint's head as llama.cpp's
qwen35/qwen35moe define it, and the llama.cpp runtime drafts with it what transformers computes
(the head run on the model's hidden states) and what the MLX runtime drafts, batched over
sequences; after a verify with rejected guesses, after a snapshot and on a file without a head
it stays right."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MTPReference, add_mtp_head, build_reference, reference_draft, save_checkpoint, to_gguf

import mlxqwen
from mlxqwen.backends import mlx as mlx_backend
from mlxqwen.errors import ModelLoadError
from mlxqwen.llm import last

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from mlxqwen.convert import convert  # noqa: E402
from test_gguf import _LINEAR, VOCAB  # noqa: E402
from test_mtp import PROMPTS  # noqa: E402
from test_mtp import greedy as engine_greedy  # noqa: E402

from mlxqwen.backends import llama_cpp as llama_cpp_backend  # noqa: E402
from mlxqwen.cli import main  # noqa: E402

ARCHS = ["qwen3_5_text", "qwen3_5_moe_text"]
DEPTH = 3


@pytest.fixture(scope="module", params=ARCHS)
def with_head(request, tmp_path_factory):
    """(transformers model, its random MTP head, the checkpoint, its F32 GGUF with the head)."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = build_reference(request.param, vocab_size=VOCAB, **_LINEAR)
    head = MTPReference(model)
    src = add_mtp_head(save_checkpoint(model, tmp / "hf"), head)
    return model, head, src, to_gguf(src, tmp / "model-F32.gguf", "F32")


def load(path: Path, **kwargs):
    return llama_cpp_backend.load(path, dtype=mx.float32, n_seq_max=4, rollback=DEPTH, max_context=512, **kwargs)


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def fed(runtime, prompt: list[int]):
    """A sequence fed `prompt` (the last token decoded) and its greedy next token."""
    seq = runtime.new_sequence()
    if len(prompt) > 1:
        runtime.prefill(seq, prompt[:-1])
    return seq, int(greedy(runtime.decode([seq], mx.array(prompt[-1:])))[0])


class Recorder:
    """A greedy `pick` that keeps the head's logits of each step."""

    def __init__(self):
        self.logits: list[np.ndarray] = []

    def __call__(self, logits: mx.array) -> mx.array:
        self.logits.append(np.array(logits))
        return greedy(logits)


def test_the_file_holds_the_head_as_llama_cpp_names_it(with_head):
    *_, path = with_head
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == 5
    assert reader.fields[f"{arch}.nextn_predict_layers"].contents() == 1
    assert reader.fields[f"{arch}.attention.recurrent_layers"].contents() == [True, True, True, False, False]
    nextn = {f"blk.4.nextn.{n}.weight" for n in ("eh_proj", "enorm", "hnorm", "shared_head_norm")}
    ffn = {"qwen35": "blk.4.ffn_gate.weight", "qwen35moe": "blk.4.ffn_gate_exps.weight"}[arch]
    assert nextn | {"blk.4.attn_q.weight", ffn} <= {t.name for t in reader.tensors}


def test_drafts_match_transformers_and_mlx(with_head):
    """Three sequences of different lengths (one token: the head has read nothing yet) draft in
    one call what the head computes in transformers, and the head's logits at each step are the
    MLX runtime's on the same F32 weights."""
    model, head, src, path = with_head
    runtime, mlx_runtime = load(path), mlx_backend.load(src, dtype=mx.float32, mtp=True)
    assert runtime.mtp and mlx_runtime.mtp
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 151_000, n).tolist() for n in (1, 6, 13)]
    drafts = []
    for r in (runtime, mlx_runtime):
        seqs, nexts = zip(*(fed(r, p) for p in prompts), strict=True)
        drafted = Recorder()
        drafts.append((nexts, r.draft(seqs, mx.array(nexts), DEPTH, drafted).tolist(), drafted.logits))
    (nexts, guesses, logits), (mlx_nexts, mlx_guesses, mlx_logits) = drafts
    for prompt, following, got in zip(prompts, nexts, guesses, strict=True):
        expected_next, expected = reference_draft(model, head, prompt, DEPTH)
        assert (following, got) == (expected_next, expected)
    assert (mlx_nexts, mlx_guesses) == (nexts, guesses)
    for got, want in zip(logits, mlx_logits, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    runtime.close()


def test_verify_commit_keeps_the_head_in_step(with_head):
    """Draft, verify the guesses (random ones: rejected) and keep 1 and 3 tokens: the target's
    logits and the head's next drafts equal those of sequences only ever fed the kept tokens."""
    *_, path = with_head
    runtime = load(path)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 151_000, n).tolist() for n in (9, 14)]
    seqs, nexts = zip(*(fed(runtime, p) for p in prompts), strict=True)
    runtime.draft(seqs, mx.array(nexts), DEPTH, greedy)
    fed_tokens = [[t, *rng.randint(0, 151_000, DEPTH).tolist()] for t in nexts]
    runtime.verify(seqs, mx.array(fed_tokens))
    kept = [1, 3]
    runtime.commit(seqs, kept)
    following = [int(t) for t in rng.randint(0, 151_000, 2)]
    after = np.array(runtime.decode(seqs, mx.array(following)))
    drafted = Recorder()
    runtime.draft(seqs, mx.array(following), DEPTH, drafted)

    for i, (prompt, tokens, n) in enumerate(zip(prompts, fed_tokens, kept, strict=True)):
        plain, _ = fed(runtime, prompt + tokens[:n])
        logits = np.array(runtime.decode([plain], mx.array([following[i]])))[0]
        np.testing.assert_allclose(after[i], logits, atol=1e-5 * np.abs(logits).max())
        expected = Recorder()
        runtime.draft([plain], mx.array([following[i]]), DEPTH, expected)
        for got, want in zip(drafted.logits, expected.logits, strict=True):
            np.testing.assert_allclose(got[i], want[0], atol=1e-5 * np.abs(want).max())
        runtime.release(plain)
    runtime.close()


def test_the_head_forgets_what_plain_steps_fed_it(with_head):
    """While nothing drafts, the head does not read what the model reads: past twice
    `HEAD_RECENT` tokens it keeps only the last of them, and then drafts what transformers' head
    computes reading those (the model's hidden states still those of the whole sequence)."""
    model, head, _, path = with_head
    runtime = load(path)
    recent = llama_cpp_backend.HEAD_RECENT
    tokens = np.random.RandomState(3).randint(0, 151_000, 5).tolist()
    seq, following = fed(runtime, tokens)
    for _ in range(2 * recent + 10):
        tokens.append(following)
        following = int(greedy(runtime.decode([seq], mx.array([following])))[0])
    assert recent <= len(seq.unread) < 2 * recent
    assert llama_cpp_backend.llama.llama_memory_seq_pos_max(runtime.head_memory, seq.slot) == -1
    unread = len(seq.unread)
    guesses = runtime.draft([seq], mx.array([following]), DEPTH, greedy).tolist()[0]
    assert (following, guesses) == reference_draft(model, head, tokens, DEPTH, recent=unread + 1)
    runtime.close()


def test_snapshots_carry_the_head(with_head):
    """A snapshot restored (also through save/load, the prefix cache's disk form) drafts as the
    sequence it was taken from; one without the head's state restarts the head: it still drafts."""
    *_, path = with_head
    runtime = load(path)
    prompt = np.random.RandomState(2).randint(0, 151_000, 11).tolist()
    seq, following = fed(runtime, prompt)
    snapshot = runtime.snapshot(seq)
    expected = Recorder()
    runtime.draft([seq], mx.array([following]), DEPTH, expected)

    for copy in (snapshot, runtime.load(runtime.save(snapshot))):
        restored = runtime.new_sequence()
        runtime.restore(restored, copy, snapshot.length)
        got = Recorder()
        runtime.draft([restored], mx.array([following]), DEPTH, got)
        for a, b in zip(got.logits, expected.logits, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())
        runtime.release(restored)

    arrays = runtime.save(snapshot)
    without = runtime.load({"state": arrays["state"], "length": arrays["length"]})
    restored = runtime.new_sequence()
    runtime.restore(restored, without, snapshot.length)
    assert runtime.draft([restored], mx.array([following]), DEPTH, greedy).shape == (1, DEPTH)
    with pytest.raises(ValueError, match="not a llama.cpp state"):
        runtime.load({**arrays, "head": mx.array([1.0])})
    runtime.close()


def test_without_the_head(with_head, tmp_path, capsys):
    """`--no-mtp` leaves the head out; such a file (or `mtp=False`) loads without `draft`, and
    asking for the head of a file that has none is a one-line error."""
    _, _, src, path = with_head
    out = tmp_path / "no-mtp.gguf"
    assert main(["convert", str(src), "--to", "gguf", "--quant", "F32", "--no-mtp", "-o", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == 4 and f"{arch}.nextn_predict_layers" not in reader.fields
    assert not any(".nextn." in t.name or t.name.startswith("blk.4.") for t in reader.tensors)

    for runtime in (load(out), load(path, mtp=False)):
        assert not runtime.mtp
        seq, following = fed(runtime, [1, 2, 3])
        with pytest.raises(NotImplementedError, match="no MTP head"):
            runtime.draft([seq], mx.array([following]), 1, greedy)
        runtime.close()
    with pytest.raises(ModelLoadError, match="has no MTP head") as error:
        load(out, mtp=True)
    assert "\n" not in str(error.value)


def test_quantized_file_keeps_the_head(with_head, tmp_path):
    """llama.cpp's quantizer (Q4_K_M) keeps the head."""
    _, _, src, _ = with_head
    runtime = load(to_gguf(src, tmp_path / "m.gguf", "Q4_K_M"), mtp=True)
    seq, following = fed(runtime, np.random.RandomState(3).randint(0, 151_000, 8).tolist())
    assert runtime.draft([seq], mx.array([following]), DEPTH, greedy).shape == (1, DEPTH)
    runtime.close()


def test_greedy_output_is_the_same_with_the_head(with_head):
    """Through `mlxqwen.load`: with the head guessing 1 to 3 tokens a step (a random head: most
    refused, so rollback runs), alone and batched, greedy output is plain decoding's."""
    *_, path = with_head
    plain = mlxqwen.load(path, dtype=mx.float32, mtp=False, prefix_cache=False)
    assert not plain.runtime.mtp
    expected = engine_greedy(plain, PROMPTS)
    for depth in (None, 1, 3):
        llm = mlxqwen.load(path, dtype=mx.float32, mtp_depth=depth, prefix_cache=False)
        assert llm.runtime.mtp
        assert [engine_greedy(llm, [p])[0] for p in PROMPTS] == expected
        assert engine_greedy(llm, PROMPTS) == expected
    done = last(llm.stream(PROMPTS[1], raw=True, temperature=0, max_tokens=24))
    assert done.stats.draft_tokens >= 3 * 20 and done.stats.accepted_tokens < done.stats.draft_tokens / 4


def test_mlx_directory_keeps_its_head(with_head, tmp_path):
    """An MLX 4-bit directory, whose head is quantized with the rest, converts to a GGUF whose head
    drafts what the MLX runtime drafts from that directory."""
    _, _, src, _ = with_head
    mlx_dir = convert(src, tmp_path / "mlx", recipe="4bit", dtype="float32").output
    path = to_gguf(mlx_dir, tmp_path / "m.gguf", "F32")
    prompt = np.random.RandomState(4).randint(0, 151_000, 10).tolist()
    drafts = []
    for runtime in (load(path), mlx_backend.load(mlx_dir, dtype=mx.float32, mtp=True)):
        seq, following = fed(runtime, prompt)
        drafted = Recorder()
        drafts.append((following, runtime.draft([seq], mx.array([following]), DEPTH, drafted).tolist(), drafted.logits))
    (following, guesses, logits), expected = drafts[0], drafts[1]
    assert (following, guesses) == expected[:2]
    for got, want in zip(logits, expected[2], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_the_memory_estimate_counts_the_heads_context(with_head, caplog):
    """The head's K/V lives in a context of its own and the recurrent states kept for its guesses
    multiply the model's: the estimate has both as llama.cpp allocates them."""
    *_, path = with_head

    def allocated(kind: str) -> float:
        pattern = rf"{kind}: size =\s+([\d.]+) MiB"
        return sum(float(m[1]) for r in caplog.records if (m := re.search(pattern, r.getMessage())))

    for mtp in (False, True):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mlxqwen.llama_cpp"):
            load(path, mtp=mtp).close()
        plan = llama_cpp_backend.sizing(path, dtype=mx.float32, n_seq_max=4, rollback=DEPTH, mtp=mtp).estimate(512)
        assert plan.kv_cache / 2**20 == pytest.approx(allocated("llama_kv_cache"), abs=0.02), mtp  # two rounded figures
        assert plan.recurrent_state / 2**20 == pytest.approx(allocated("llama_memory_recurrent"), abs=0.01), mtp
