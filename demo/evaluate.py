"""Held-out accuracy of the demo model: `python -m demo.evaluate [HF_DIR] [--shipped]`.

Each form answers the same held-out questions (`data.test_set`, and its fact questions again
with the space before the name dropped: "glued", not counted in "all"), greedily, with thinking
on and with it off; an answer counts when it is exactly the expected one (with thinking off,
arithmetic shows its steps first: `Example.reply`). The full-precision model runs in
transformers (the reference); the shipped forms through `mlxqwen.load` and its engine, the
MLX 4-bit form on MLX, the GGUF form on llama.cpp. Exit status 1 when the full-precision model is
under 90 % or a shipped form more than 5 points below it, in either mode."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlxqwen.demo import GGUF_QUANT, model_path

from . import data

MAX_TOKENS = 160
TARGET, TOLERANCE = 90.0, 5.0

Answerer = Callable[[list[str], bool], list[tuple[str, str]]]  # questions, thinking -> (thinking, answer) each


def split_reply(text: str) -> tuple[str, str]:
    """(thinking, answer) of a reply generated after the template's opening `<think>`."""
    thinking, sep, answer = text.partition("</think>")
    return (thinking.strip(), answer.strip()) if sep else ("", text.strip())


def transformers_answers(hf_dir: Path) -> Answerer:
    import torch
    import transformers
    from tokenizers import Tokenizer

    from mlxqwen.tokenizer import Tokenizer as ChatTokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    template = ChatTokenizer.from_dir(hf_dir).chat_template
    pad, end = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")

    def answer(questions: list[str], think: bool) -> list[tuple[str, str]]:
        replies = []
        for start in range(0, len(questions), 50):
            prompts = [tokenizer.encode(template.render([{"role": "user", "content": q}], enable_thinking=think)).ids
                       for q in questions[start : start + 50]]  # fmt: skip
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=attention,
                    max_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    eos_token_id=end,
                    pad_token_id=pad,
                )
            replies += [split_reply(tokenizer.decode(row[width:].tolist())) for row in out]
        return replies

    return answer


def engine_answers(path: Path, backend: str) -> Answerer:
    """The shipped form through `mlxqwen.load` on `backend` ("mlx" or "llama.cpp") and the
    engine, which parses thinking and answer."""
    from mlxqwen import load
    from mlxqwen.llm import last

    llm = load(path, backend=backend, max_context=1024)

    def answer(questions: list[str], think: bool) -> list[tuple[str, str]]:
        replies = []
        for q in questions:
            done = last(llm.stream(q, temperature=0.0, max_tokens=MAX_TOKENS, think=think))
            replies.append((done.thinking.strip(), done.text.strip()))
        return replies

    return answer


def mtp_accuracy(hf_dir: Path, examples: list[data.Example]) -> float:
    """Percent of held-out reply tokens that the MTP head drafts right (token t+2 from the
    model's state at t and token t+1, teacher-forced): what speculative decoding would accept."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from mlxqwen.tokenizer import Tokenizer as ChatTokenizer

    from .train import MTP, draft_logits, encode_chat

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    mtp = MTP(model.config).eval()
    weights = load_file(hf_dir / "model.safetensors")
    mtp.load_state_dict({k.removeprefix("mtp."): v for k, v in weights.items() if k.startswith("mtp.")})
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    template = ChatTokenizer.from_dir(hf_dir).chat_template
    right = total = 0
    for example in examples:
        ids, mask = encode_chat(tokenizer, template, [example], None, True)
        ids, target = torch.tensor([ids]), torch.tensor(mask[2:], dtype=torch.bool)
        with torch.no_grad():
            drafts = draft_logits(model, mtp, ids, model.model(input_ids=ids).last_hidden_state)[0].argmax(-1)
        right += int((drafts[target] == ids[0, 2:][target]).sum())
        total += int(target.sum())
    return 100 * right / total


def accuracy(answer: Answerer, examples: list[data.Example], think: bool = True) -> dict[str, float]:
    """Percent right per family, and overall under "all" (of the families in `data.FAMILIES`)."""
    replies = answer([e.question for e in examples], think)
    right: dict[str, list[bool]] = {}
    for example, (_, reply) in zip(examples, replies, strict=True):
        ok = reply == example.reply(think)
        right.setdefault(example.family, []).append(ok)
        if example.family in data.FAMILIES:
            right.setdefault("all", []).append(ok)
    return {family: 100 * sum(r) / len(r) for family, r in right.items()}


def questions(per_family: int) -> list[data.Example]:
    """The held-out questions, and their fact questions again as typed carelessly (`data.glued`)."""
    examples = data.test_set(per_family)
    return examples + [data.glued(e) for e in examples if e.family == "fact"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, nargs="?", default=Path("build/demo/hf"),
                        help="the full-precision model the training wrote (default build/demo/hf)")  # fmt: skip
    parser.add_argument("--shipped", action="store_true", help="also evaluate the shipped MLX 4-bit and GGUF forms")
    parser.add_argument("--per-family", type=int, default=40, help="held-out questions per family (default 40)")
    args = parser.parse_args(argv)
    console = Console()
    examples = questions(args.per_family)
    forms: dict[str, Callable[[], Answerer]] = {
        "full precision (transformers)": lambda: transformers_answers(args.hf_dir)
    }
    if args.shipped:
        forms["MLX 4-bit (MLX)"] = lambda: engine_answers(model_path("mlx"), "mlx")
        forms[f"GGUF {GGUF_QUANT} (llama.cpp)"] = lambda: engine_answers(model_path("gguf"), "llama.cpp")
    results = {}
    for name, make in forms.items():
        answerer = make()
        for think in (True, False):
            with console.status(f"evaluating {name} on {len(examples)} held-out questions"):
                results[name, think] = accuracy(answerer, examples, think)
    families = [*data.FAMILIES, "glued", "all"]
    table = Table(title=f"held-out accuracy, % ({len(examples)} questions)")
    table.add_column("form")
    table.add_column("thinking")
    for family in families:
        table.add_column(family, justify="right")
    for (name, think), scores in results.items():
        table.add_row(name, "on" if think else "off", *(f"{scores.get(f, float('nan')):.1f}" for f in families))
    console.print(table)
    with console.status("measuring the MTP head"):
        drafted = mtp_accuracy(args.hf_dir, [e for e in examples if e.family in data.FAMILIES])
    console.print(f"MTP head (full precision): {drafted:.1f} % of held-out reply tokens drafted right")
    ok = True
    for think in (True, False):
        reference = results["full precision (transformers)", think]["all"]
        ok &= reference >= TARGET and all(
            reference - scores["all"] <= TOLERANCE for (_, mode), scores in results.items() if mode == think
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
