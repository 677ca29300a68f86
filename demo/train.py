"""Rebuild the demo model from scratch: `python -m demo.train`, from the root of mlxqwen's
source checkout (this trainer is not part of the installed package).

Trains a small Qwen3.5 (Gated DeltaNet + gated attention, MTP head) with transformers on the
CPU, on the synthetic chats of `demo.data`, then makes the shipped forms with the
project's converter, into one directory (`mlxqwen/demo/mlxqwen-demo/`, `mlxqwen.demo.model_path()`):
MLX 4-bit, and GGUF (`model.gguf`) beside it; then prints the held-out accuracy of all three
forms (`demo.evaluate`). Seeded, one CPU thread: the
same machine gives the same model. Needs the test extras (torch, transformers) and
llama-cpp-python.

Chats are packed whole into rows, so every batch mixes all the task's families (batches
sorted by length held one family each and learned several times slower). transformers'
reference Gated DeltaNet is swapped for `delta_rule.chunk_gated_delta_rule` (same math,
about 3x faster on a CPU; tests/test_demo.py checks it against the reference).

The MTP head follows Qwen3.5's `mtp.*` layout (`fc`, `pre_fc_norm_embedding`,
`pre_fc_norm_hidden`, one full-attention decoder layer, `norm`; the tied embedding and head
are shared): at position t it reads the main model's last hidden state and the embedding of
token t+1, and is trained to predict token t+2, which is what self-speculative decoding asks
of it."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers.models.qwen3_5 import modeling_qwen3_5

from mlxqwen.chat_template import ChatTemplate
from mlxqwen.demo import DEMO_DIR, GGUF_QUANT

from . import data
from .delta_rule import chunk_gated_delta_rule
from .vocab import ADDED_TOKENS, save_tokenizer, train_tokenizer

TEMPLATE_FILE = Path(__file__).parent / "chat_template.jinja"
TEMPLATE = TEMPLATE_FILE.read_text()


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 192
    intermediate_size: int = 512
    layers: int = 6
    full_attention_interval: int = 3  # every n-th layer is full attention, the others Gated DeltaNet
    chats: int = 40000
    row_length: int = 256  # chats are packed into rows of this many tokens
    batch_rows: int = 8
    lr: float = 3e-3
    warmup: int = 100
    mtp_weight: float = 0.3


def model_config(s: Settings, vocab_size: int) -> transformers.Qwen3_5TextConfig:
    head_dim = 64
    rotary_pairs = int(head_dim * 0.25) // 2
    return transformers.Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.layers,
        layer_types=[
            "full_attention" if (i + 1) % s.full_attention_interval == 0 else "linear_attention"
            for i in range(s.layers)
        ],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10000.0,
            partial_rotary_factor=0.25,
            # text-only positions make mRoPE plain RoPE; llama.cpp wants 2 * sum <= rotary dims
            mrope_section=[rotary_pairs - 2 * (rotary_pairs // 3), rotary_pairs // 3, rotary_pairs // 3],
            mrope_interleaved=True,
        ),
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
    )


class MTP(torch.nn.Module):
    """Qwen3.5's multi-token prediction head (one layer), on top of a Qwen3_5ForCausalLM."""

    def __init__(self, config: transformers.Qwen3_5TextConfig):
        super().__init__()
        norm = modeling_qwen3_5.Qwen3_5RMSNorm
        self.pre_fc_norm_embedding = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        # a decoder layer built as the model's first full-attention layer (its index only names a cache slot)
        full = config.layer_types.index("full_attention")
        self.layers = torch.nn.ModuleList([modeling_qwen3_5.Qwen3_5DecoderLayer(config, full)])
        self.norm = norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, position_embeddings) -> torch.Tensor:
        x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        x = self.layers[0](self.fc(x), position_embeddings=position_embeddings)
        return self.norm(x)


def encode_chat(
    tokenizer, template: ChatTemplate, turns: list[data.Example], system: str | None, think: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a chat as a `ChatSession` feeds them, and a mask of the ids the model writes.

    Each turn is rendered alone (so earlier replies keep their thinking, as in the session's
    cache), prompt and reply are tokenized apart (as the engine does), and the reply ends
    with <|im_end|>; the newline after it belongs to the next prompt."""
    ids: list[int] = []
    mask: list[int] = []
    for i, example in enumerate(turns):
        head = [{"role": "system", "content": system}] if system is not None and i == 0 else []
        user = {"role": "user", "content": example.question}
        reply = example.reply_message(think)
        prompt = template.render([*head, user], enable_thinking=think)
        full = template.render([*head, user, reply], add_generation_prompt=False)
        assert full.startswith(prompt) and full.endswith("<|im_end|>\n"), "chat template changed"
        prompt_ids = tokenizer.encode(("\n" if i else "") + prompt).ids
        reply_ids = tokenizer.encode(full[len(prompt) : -1]).ids
        ids += prompt_ids + reply_ids
        mask += [0] * len(prompt_ids) + [1] * len(reply_ids)
    return ids, mask


def _plain_text(text: str) -> str:
    for token, _ in ADDED_TOKENS:
        text = text.replace(token, "\n")
    return text


def make_corpus(s: Settings, template: ChatTemplate, console: Console):
    rng = random.Random(s.seed)
    chats = [data.conversation(rng) for _ in range(s.chats)]
    sample_texts = []
    for turns, system, _ in chats[:20000]:
        for e in turns:
            sample_texts += [_plain_text(template.render([{"role": "user", "content": e.question}])), e.thinking]
            sample_texts.append(e.answer)
        if system:
            sample_texts.append(system)
    tokenizer = train_tokenizer(sample_texts, s.vocab_size)
    corpus = [encode_chat(tokenizer, template, *chat) for chat in chats]
    lengths = [len(ids) for ids, _ in corpus]
    console.print(
        f"{len(corpus):,} chats, {sum(lengths):,} tokens (mean {sum(lengths) / len(lengths):.0f}, "
        f"max {max(lengths)}), tokenizer: {tokenizer.get_vocab_size()} tokens"
    )
    return tokenizer, corpus


def batches(corpus, s: Settings, separator: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Chats in a seeded order, packed whole into rows of `row_length` tokens (separated by
    <|endoftext|>, the rest padded with it), `batch_rows` rows a batch: every batch mixes the
    task's families and wastes little on padding."""
    rng = random.Random(s.seed + 1)
    order = list(range(len(corpus)))
    rng.shuffle(order)
    rows: list[tuple[list[int], list[int]]] = [([], [])]
    for i in order:
        ids, mask = corpus[i]
        row_ids, row_mask = rows[-1]
        if row_ids and len(row_ids) + 1 + len(ids) > s.row_length:
            rows.append(([], []))
            row_ids, row_mask = rows[-1]
        if row_ids:
            row_ids.append(separator)
            row_mask.append(0)
        row_ids += ids
        row_mask += mask
    result = []
    for start in range(0, len(rows), s.batch_rows):
        group = rows[start : start + s.batch_rows]
        width = max(len(ids) for ids, _ in group)
        ids = torch.full((len(group), width), separator)
        mask = torch.zeros((len(group), width), dtype=torch.bool)
        for r, (row_ids, row_mask) in enumerate(group):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            mask[r, : len(row_ids)] = torch.tensor(row_mask, dtype=torch.bool)
        result.append((ids, mask))
    return result


def draft_logits(model, mtp: MTP, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The MTP head's logits at positions 0..T-3: from the model's last hidden state at t and
    the embedding of token t+1, a guess at token t+2."""
    positions = torch.arange(ids.shape[1] - 1)[None, None]
    rope = model.model.rotary_emb(hidden, positions)
    drafted = mtp(hidden[:, :-1], model.model.embed_tokens(ids[:, 1:]), rope)
    return model.lm_head(drafted[:, :-1])


def losses(model, mtp: MTP, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of the model and next-next-token loss of the MTP head, on reply tokens."""
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    main = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
    # the head learns on top of the model without pulling its states toward drafting
    draft = draft_logits(model, mtp, ids, hidden.detach())
    return main, F.cross_entropy(draft[mask[:, 2:]], ids[:, 2:][mask[:, 2:]])


def _param_groups(modules: list[torch.nn.Module]) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            (no_decay if p.ndim < 2 or name.endswith(("A_log", "dt_bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def train(s: Settings, console: Console):
    torch.manual_seed(s.seed)
    modeling_qwen3_5.torch_chunk_gated_delta_rule = chunk_gated_delta_rule  # same math, faster on a CPU
    template = ChatTemplate(TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer, corpus = make_corpus(s, template, console)
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config = model_config(s, vocab_size)
    model = transformers.Qwen3_5ForCausalLM(config).float()
    mtp = MTP(config)
    mtp.apply(model._init_weights)  # initialized like the model's own layers
    count = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in mtp.parameters())
    console.print(f"model: {count / 1e6:.2f}M parameters ({s.layers} layers, hidden {s.hidden_size})")
    params = list(model.parameters()) + list(mtp.parameters())
    optimizer = torch.optim.AdamW(_param_groups([model, mtp]), lr=s.lr, betas=(0.9, 0.95))
    schedule = batches(corpus, s, tokenizer.token_to_id("<|endoftext|>"))
    steps = len(schedule)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        progress = (step - s.warmup) / max(1, steps - s.warmup)
        return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    start, tokens, window = time.perf_counter(), 0, []
    for step, (ids, mask) in enumerate(schedule):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        main, draft = losses(model, mtp, ids, mask)
        (main + s.mtp_weight * draft).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += ids.numel()
        window.append((main.item(), draft.item()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            m, d = (sum(x) / len(window) for x in zip(*window, strict=True))
            window = []
            console.print(
                f"step {step + 1}/{steps}  loss {m:.3f}  mtp {d:.3f}  {tokens / elapsed:.0f} tok/s  "
                f"{elapsed / 60:.1f} min, {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min left"
            )
    return model.eval(), mtp.eval(), tokenizer, time.perf_counter() - start


def save_hf(model, mtp: MTP, tokenizer, path: Path) -> None:
    """A Hugging Face directory like Qwen's: weights with `mtp.*`, config, tokenizer, template."""
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    tensors.update({f"mtp.{k}": v.contiguous() for k, v in mtp.state_dict().items()})
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    im_end, end = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config.update(eos_token_id=im_end, pad_token_id=end)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # greedy: the task has one right answer
    generation = {"do_sample": False, "eos_token_id": [im_end, end], "pad_token_id": end}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tokenizer, path)
    shutil.copy(TEMPLATE_FILE, path / "chat_template.jinja")


def ship(hf_dir: Path, console: Console) -> None:
    """The shipped forms, made by the project's converter: the MLX directory (with the greedy
    generation_config.json that both backends read), then the GGUF inside it."""
    from mlxqwen.convert import convert

    from mlxqwen.display import format_size

    mlx = convert(hf_dir, DEMO_DIR, recipe="4bit", dtype="bfloat16", force=True)
    (DEMO_DIR / "README.md").unlink()  # the model card would name the build path
    gguf = convert(hf_dir, DEMO_DIR / "model.gguf", to="gguf", quant=GGUF_QUANT)
    console.print(f"shipped: MLX {format_size(mlx.size_bytes)}, GGUF {format_size(gguf.size_bytes)} in {DEMO_DIR}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("build/demo"), help="where the full-precision model goes")
    parser.add_argument("--chats", type=int, default=Settings.chats, help="training chats (fewer: a quick run)")
    parser.add_argument("--seed", type=int, default=Settings.seed)
    # another size, for experiments (bench_quant's larger trained model); the shipped one is the default
    parser.add_argument("--hidden-size", type=int, default=Settings.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=Settings.intermediate_size)
    parser.add_argument("--layers", type=int, default=Settings.layers)
    parser.add_argument(
        "--attention-every", type=int, default=Settings.full_attention_interval, help="full attention every n-th layer"
    )
    parser.add_argument("--no-ship", action="store_true", help="train and evaluate only; leave the shipped files")
    # two threads train 1.8x as fast as one on a 2-core machine, to the same weights bit for bit
    threads = min(2, os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    console = Console()
    settings = Settings(
        seed=args.seed,
        chats=args.chats,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        layers=args.layers,
        full_attention_interval=args.attention_every,
    )
    console.print(f"training with {torch.get_num_threads()} threads on {os.cpu_count()} CPUs: {settings}")
    model, mtp, tokenizer, seconds = train(settings, console)
    hf_dir = args.work / "hf"
    save_hf(model, mtp, tokenizer, hf_dir)
    if not args.no_ship:
        ship(hf_dir, console)
    total = (time.perf_counter() - start) / 60
    console.print(
        f"rebuilt in {total:.1f} min (training {seconds / 60:.1f} min; load average {os.getloadavg()[0]:.1f})"
    )
    from .evaluate import main as evaluate

    return evaluate([str(hf_dir)] + ([] if args.no_ship else ["--shipped"]))


if __name__ == "__main__":
    raise SystemExit(main())
