"""The demo model's building blocks (`demo/`, outside the package): the task data, the tokenizer,
the fast gated delta rule used in training, the chat encoding and the MTP head's Qwen3.5 layout.
(The shipped model itself: tests/test_demo_model.py.)"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors import safe_open

from demo import data, train
from demo.delta_rule import chunk_gated_delta_rule
from demo.vocab import ADDED_TOKENS, QWEN2_SPLIT, train_tokenizer
from mlxqwen.chat_template import ChatTemplate

TEMPLATE = ChatTemplate(train.TEMPLATE, {"eos_token": "<|im_end|>"})


@pytest.mark.parametrize("length, chunk", [(37, 16), (64, 32), (5, 32)])
def test_fast_delta_rule_matches_transformers(length, chunk):
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    torch.manual_seed(0)
    b, k_heads, v_heads, dim = 2, 2, 4, 16
    q, k = (torch.randn(b, length, k_heads, dim, requires_grad=True) for _ in range(2))
    v = torch.randn(b, length, v_heads, dim, requires_grad=True)
    g = (-torch.rand(b, length, v_heads) * 3).requires_grad_()
    beta = torch.rand(b, length, v_heads).requires_grad_()
    state = torch.randn(b, v_heads, dim, dim)
    inputs = (q, k, v, g, beta)
    kwargs = dict(initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref, ref_state = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)
    out, out_state = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, chunk_size=chunk, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_state, ref_state, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    out_grads = torch.autograd.grad((out * weights).sum(), inputs)
    for a, e in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4)


def _check_steps(thinking: str) -> None:
    """Every `expression = n` step of the thinking is true arithmetic."""
    for step in re.split(r", |\n", thinking):
        match = re.fullmatch(r"([\d +\-×]+) = (\d+)", step)
        if match:
            assert eval(match.group(1).replace("×", "*")) == int(match.group(2)), step


def test_examples_are_right_and_held_out_ones_never_train():
    rng = random.Random(0)
    test_keys = {e.key for e in data.test_set(40)}
    assert len(test_keys) >= 150
    for family in data.FAMILIES:
        for _ in range(300):
            example = data.sample(rng, family)
            assert example.key not in test_keys
            _check_steps(example.thinking)
            if family in ("add", "sub", "mul"):
                a, sign, b = re.match(r"(\d+) (\S) (\d+) =", example.answer).groups()
                assert example.answer == f"{a} {sign} {b} = {eval(a + sign.replace('×', '*') + b)}."
            if family in data.WORKED:  # thinking off: the steps, then the answer
                assert example.reply(False).splitlines() == [*example.thinking.splitlines()[:-1], example.answer]
            else:
                assert example.reply(False) == example.answer
            if family == "large":
                assert max(map(int, re.findall(r"\d+", example.question))) >= 100
                assert example.answer == data.TOO_LARGE
            assert example.reply(True) == example.answer
    assert data.arithmetic(rng, "add", 85, 27).thinking.splitlines() == [
        "5 + 7 = 12, carry 1",
        "8 + 2 + 1 = 11",
        "85 + 27 = 112",
    ]
    assert data.arithmetic(rng, "sub", 52, 48).thinking.splitlines()[0] == "12 - 8 = 4, borrow 1"
    assert data.arithmetic(rng, "mul", 7, 89).thinking.splitlines() == [
        "89 × 7:",
        "9 × 7 = 63, carry 6",
        "8 × 7 = 56, 56 + 6 = 62",
        "7 × 89 = 623",
    ]
    assert data.conversion(rng, 5, 7).answer == "7 hours = 420 minutes."


def test_careless_typing_glues_names_in_training_and_evaluation():
    """Now and then a training question drops the space before the name it asks about, as the
    evaluation's "glued" questions do ("capital ofJapan?")."""
    rng = random.Random(0)
    facts = [data.sample(rng, "fact") for _ in range(1000)]
    glued = [e for e in facts if (name := e.key.split(":")[1]) in e.question and f" {name}" not in e.question]
    assert 0.08 < len(glued) / len(facts) < 0.25
    japan = data.fact(random.Random(0), "capital", "Japan", 0)
    assert japan.question == "What is the capital of Japan?"
    assert data.glued(japan).question == "What is the capital ofJapan?"
    assert data.glued(japan).answer == "The capital of Japan is Tokyo."


def test_tokenizer_keeps_qwen_layout():
    tokenizer = train_tokenizer(["What is 37 + 48?", "The capital of France is Paris."] * 50, 300)
    regular = tokenizer.get_vocab_size(with_added_tokens=False)
    for i, (text, special) in enumerate(ADDED_TOKENS):
        assert tokenizer.token_to_id(text) == regular + i
        assert tokenizer.get_added_tokens_decoder()[regular + i].special == special
    assert tokenizer.get_vocab_size() <= 300
    text = "Ünïcödé 😀 <think>\n7 × 6</think>"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.token_to_id("<think>") in ids
    split = json.loads(tokenizer.to_str())["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"]["Regex"] == QWEN2_SPLIT  # the regex llama.cpp knows as `qwen2`


def test_encode_chat_masks_the_replies_as_a_session_sees_them():
    examples = [data.arithmetic(random.Random(0), "add", 37, 48), data.fact(random.Random(0), "capital", "Peru", 0)]
    texts = [train._plain_text(TEMPLATE.render([{"role": "user", "content": e.question}])) for e in examples]
    tokenizer = train_tokenizer(texts + [e.thinking + e.answer for e in examples], 400)
    ids, mask = train.encode_chat(tokenizer, TEMPLATE, examples, "Answer briefly.", True)
    decode = lambda xs: tokenizer.decode(xs, skip_special_tokens=False)  # noqa: E731
    replies = decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert replies == "".join(f"{e.thinking}\n</think>\n\n{e.answer}<|im_end|>" for e in examples)
    assert decode(ids) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{examples[0].question}<|im_end|>\n<|im_start|>assistant\n<think>\n{examples[0].thinking}"
        f"\n</think>\n\n37 + 48 = 85.<|im_end|>\n<|im_start|>user\n{examples[1].question}<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n{examples[1].thinking}\n</think>\n\n{examples[1].answer}<|im_end|>"
    )
    ids, mask = train.encode_chat(tokenizer, TEMPLATE, examples, None, False)
    worked = "7 + 8 = 15, carry 1\n3 + 4 + 1 = 8\n37 + 48 = 85."
    replies = decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert replies == f"{worked}<|im_end|>{examples[1].answer}<|im_end|>"
    assert f"<think>\n\n</think>\n\n{worked}<|im_end|>" in decode(ids)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """A tiny model with its MTP head, a few training steps, saved like the real one."""
    settings = train.Settings(hidden_size=64, intermediate_size=128, layers=4, full_attention_interval=4)
    tokenizer = train_tokenizer(["What is 1 + 2?"] * 10, 300)
    model_config = train.model_config(settings, 320)
    torch.manual_seed(0)
    import transformers

    model = transformers.Qwen3_5ForCausalLM(model_config).float().eval()
    mtp = train.MTP(model_config).eval()
    path = tmp_path_factory.mktemp("demo") / "hf"
    train.save_hf(model, mtp, tokenizer, path)
    return model, mtp, path


def test_mtp_head_has_qwen35_layout(tiny_trained):
    _, _, path = tiny_trained
    with safe_open(path / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("mtp.")}
    h, layer = 64, "mtp.layers.0."
    assert shapes == {
        "mtp.fc.weight": (h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.norm.weight": (h,),
        layer + "input_layernorm.weight": (h,),
        layer + "post_attention_layernorm.weight": (h,),
        layer + "self_attn.q_proj.weight": (2 * 4 * 64, h),  # query and output gate
        layer + "self_attn.k_proj.weight": (2 * 64, h),
        layer + "self_attn.v_proj.weight": (2 * 64, h),
        layer + "self_attn.o_proj.weight": (h, 4 * 64),
        layer + "self_attn.q_norm.weight": (64,),
        layer + "self_attn.k_norm.weight": (64,),
        layer + "mlp.gate_proj.weight": (128, h),
        layer + "mlp.up_proj.weight": (128, h),
        layer + "mlp.down_proj.weight": (h, 128),
    }


def test_saved_model_loads_in_transformers_and_mlxqwen(tiny_trained):
    import mlx.core as mx
    import transformers

    from mlxqwen import load

    model, _, path = tiny_trained
    tokens = [5, 17, 300, 2, 99]
    again = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
        torch.testing.assert_close(again(torch.tensor([tokens])).logits[0], expected)
    llm = load(path)
    got = llm.model(mx.array([tokens]))[0]
    assert abs(got - mx.array(expected.numpy())).max().item() < 1e-3


def test_mtp_head_is_causal(tiny_trained):
    model, mtp, _ = tiny_trained
    with torch.no_grad():
        ids = torch.tensor([[5, 17, 300, 2, 99, 7]])
        changed = ids.clone()
        changed[0, 4] = 8

        def draft(x):
            return train.draft_logits(model, mtp, x, model.model(input_ids=x).last_hidden_state)

        a, b = draft(ids), draft(changed)  # position t reads tokens up to t+1 and guesses t+2
    assert a.shape == (1, 4, 320)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])
