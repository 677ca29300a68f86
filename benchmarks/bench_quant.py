"""Quantization quality at equal bits per weight: KL to the source, top-1 agreement and perplexity on
held-out text (the quality report's text, never calibrated on), for

- uniform 4-bit, group 64 (`mlxqwen convert --recipe 4bit`): the reference budget B (its bits per
  weight, counted as mlx-lm counts them);
- ours at B (`--target-bpw B`), with plain round-to-nearest and with activation-aware rounding;
- mlx-lm's dynamic_quant at B (3-bit and 5-bit, group 64, split by its own sensitivities), GPTQ and
  AWQ (4-bit, group 64: B), all calibrated on the same text as ours (mlxqwen's shipped chats);
- GGUF Q4_K_M (llama.cpp's quantizer), without and with our importance matrix (`--imatrix`, from the
  same calibration text as ours), run by llama.cpp on the same held-out text, when llama-cpp-python
  is installed. Its bits per weight are those of its tensors (weights, scales, norms; not the
  tokenizer) and differ from B: llama.cpp keeps some matrices in 6 bits (Q6_K), and a matrix whose
  rows are not a multiple of 256 (every one of the 128-wide models) falls back to Q5_0 or Q8_0; the
  note names the types llama.cpp chose.

Trained models (`--trained DIR`, a Hugging Face directory the demo's trainer wrote, `python -m
demo.train --no-ship --work W` -> `W/hf`; the README's larger one: `--hidden-size 384
--intermediate-size 1024 --layers 8 --attention-every 4 --chats 4000`): calibrated on 600
training chats of the demo's task and measured on its held-out questions (`demo.data`), both
rendered with the model's chat template.
With `--dwq`, mlx-lm's DWQ runs too (its `dwq_quantize`: 4-bit g64 scales and biases distilled
against the source on the calibration text, in samples of 256 tokens; learning rate 1e-5, since
mlx-lm's default 1e-6 hardly moves them in the few dozen steps this much text gives). It trains,
and off the GPU mlx-lm's Gated DeltaNet runs token by token: over an hour for the demo's size here.

Built models (random weights moved off their initial values by `tests/checkpoints.py`), each
with a byte-level BPE of 480 tokens (trained on the report's text, with Qwen's pre-tokenizer, which
llama.cpp recognises):
- `random`: Qwen3-shaped, hidden 128, 4 layers, 2 heads of 64, intermediate 384;
- `outliers`: the same with the massive-activation channels real LLMs have, injected: in 4 of the
  128 hidden channels the embedding columns are scaled by 20 and every RMSNorm weight by 10, so
  those channels of the residual stream and of every projection's input are 10-200x the others;
- `random-256`, `outliers-256`: the same at hidden 256, 4 heads of 64, intermediate 768, the
  nearest shape whose every matrix llama.cpp quantizes to K-quants (rows a multiple of 256).

On a 2-core machine each 128-wide model takes about 10 minutes, each 256-wide one about 20.

    nice -n 10 python benchmarks/bench_quant.py [--workdir DIR] [--models random,outliers,random-256,outliers-256]
        [--trained HF_DIR ...] [--dwq]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))  # the demo's trainer (`demo/`) lives beside the package
from checkpoints import build_reference, save_checkpoint  # noqa: E402
from common import print_table  # noqa: E402
from mlxqwen.convert import convert  # noqa: E402
from mlxqwen.convert.calibration import TEXT, calibration_batch, shipped_text  # noqa: E402
from mlxqwen.convert.quality import Quality, compare  # noqa: E402
from test_convert import small_tokenizer  # noqa: E402

import mlxqwen  # noqa: E402
from mlxqwen.tokenizer import Tokenizer  # noqa: E402

DIMS = dict(hidden_size=128, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
WIDE = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
KINDS = {"random": (DIMS, False), "outliers": (DIMS, True), "random-256": (WIDE, False), "outliers-256": (WIDE, True)}
OUTLIER_CHANNELS = 4
DWQ_LEARNING_RATE = 1e-5
DWQ_SAMPLE = 256  # tokens per DWQ training sample


@dataclass(frozen=True)
class Case:
    label: str
    src: Path
    text: str  # held out: never calibrated on
    calibration: Path | None  # None: the shipped chats


def build(kind: str, path: Path) -> Path:
    dims, outliers = KINDS[kind]
    ref = build_reference("qwen3", **dims)
    if outliers:
        import torch

        channels = torch.randperm(dims["hidden_size"], generator=torch.Generator().manual_seed(0))[:OUTLIER_CHANNELS]
        with torch.no_grad():
            ref.model.embed_tokens.weight[:, channels] *= 20
            for name, param in ref.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    param[channels] *= 10
    src = save_checkpoint(ref, path)
    small_tokenizer(src, qwen_pre_tokenizer=True)
    return src


def trained_case(src: Path, work: Path) -> Case:
    """A model from the demo's trainer, with its task's chats as calibration and held-out text."""
    from demo import data

    template = Tokenizer.from_dir(src).chat_template

    def render(example: data.Example, think: bool = True) -> str:
        messages = [{"role": "user", "content": example.question}, example.reply_message(think)]
        return template.render(messages, add_generation_prompt=False, enable_thinking=think)

    rng = random.Random(0)
    chats = [data.conversation(rng) for _ in range(600)]
    calibration = work / f"{src.name}-calibration.txt"
    calibration.write_text("".join(render(e, think) for turns, _, think in chats for e in turns))
    return Case(src.name, src, "".join(render(e) for e in data.test_set(8)), calibration)


def logits_of(model: nn.Module, tokens: list[int]) -> mx.array:
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    mx.eval(logits)
    return logits


def bits_per_weight(model: nn.Module) -> float:
    from mlx_lm.utils import compute_bits_per_weight

    return compute_bits_per_weight(model)


def mlx_lm_methods(
    bf16: Path, target: float, data: mx.array, dwq_tokens: list[int] | None
) -> dict[str, tuple[nn.Module | None, str]]:
    """mlx-lm's learned quantizations of `bf16` (the source converted unquantized, so that mlx-lm
    reads it whatever its model type), or why one did not run."""
    import copy

    from mlx_lm import load
    from mlx_lm.quant import awq, dynamic_quant, gptq
    from mlx_lm.utils import quantize_model

    def fresh():
        model, _, config = load(str(bf16), return_config=True)
        model.set_dtype(mx.bfloat16)
        return model, config

    out: dict[str, tuple[nn.Module | None, str]] = {}
    try:
        model, config = fresh()
        sensitivities = dict(dynamic_quant.estimate_sensitivities(model, data, 3, 64, 5, 64))
        threshold = dynamic_quant.estimate_threshold(model, sensitivities, target, 3, 64, 5, 64)

        def predicate(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            return {"bits": 5, "group_size": 64} if sensitivities[path] > threshold else True

        quantized, _ = quantize_model(copy.deepcopy(model), config, 64, 3, quant_predicate=predicate)
        out["mlx-lm dynamic_quant (3/5-bit g64)"] = (quantized, "")
    except Exception as e:  # a method that does not run on the architecture is reported, not fatal
        out["mlx-lm dynamic_quant (3/5-bit g64)"] = (None, f"{type(e).__name__}: {e}")
    try:
        model, _ = fresh()
        quantized, _ = gptq.gptq_quantize(model, data, 4, 64, 4, 64)
        out["mlx-lm GPTQ 4-bit g64"] = (quantized, "")
    except Exception as e:
        out["mlx-lm GPTQ 4-bit g64"] = (None, f"{type(e).__name__}: {e}")
    model, config = fresh()
    if (awq_config := awq.AWQ_MODEL_CONFIGS.get(config["model_type"])) is None:
        out["mlx-lm AWQ 4-bit g64"] = (None, f"not run: mlx-lm's AWQ has no configuration for {config['model_type']}")
    else:
        awq.awq_quantize(model, data, awq_config, 64, 4, embed_group_size=64, embed_bits=4)
        out["mlx-lm AWQ 4-bit g64"] = (model, "")
    if dwq_tokens is None:
        out["mlx-lm DWQ 4-bit g64"] = (None, "not run (--dwq runs it): it trains, over an hour here")
        return out
    try:
        out["mlx-lm DWQ 4-bit g64"] = (dwq(fresh, dwq_tokens), "")
    except Exception as e:
        out["mlx-lm DWQ 4-bit g64"] = (None, f"{type(e).__name__}: {e}")
    return out


def dwq(fresh, tokens: list[int]) -> nn.Module:
    """mlx-lm's DWQ as its `mlx_lm.dwq` runs it (Adam, temperature 2, targets from the source),
    on samples of the calibration text, a tenth of them for validation."""
    import copy

    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    source, config = fresh()
    student = copy.deepcopy(source)
    quantize_model(student, config, 64, 4)
    samples = [(tokens[i : i + DWQ_SAMPLE + 1], 0) for i in range(0, len(tokens) - DWQ_SAMPLE, DWQ_SAMPLE)]
    valid = max(4, len(samples) // 10)
    dwq_quantize(
        student,
        lambda batch, _, split: source(batch),
        optim.Adam(learning_rate=DWQ_LEARNING_RATE, bias_correction=True),
        samples[valid:],
        samples[:valid],
        batch_size=4,
        max_seq_length=DWQ_SAMPLE + 1,
        seed=0,
    )
    return student


def gguf_rows(
    src: Path, work: Path, tokens: list[int], reference: mx.array, calibration: Path | None
) -> tuple[list[list], dict]:
    """GGUF Q4_K_M of `src` without and with our importance matrix, run by llama.cpp."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return [["GGUF Q4_K_M", "-", "-", "-", "-", "not run: llama-cpp-python is not installed"]], {}

    import gguf
    from mlxqwen.convert.evaluate import gguf_logits

    rows, results = [], {}
    imatrix = {"imatrix": True, "calibration": calibration and str(calibration)}
    for name, options in (("GGUF Q4_K_M", {}), ("GGUF Q4_K_M + our imatrix", imatrix)):
        out = work / f"{src.name}-Q4_K_M{'-imatrix' if options else ''}.gguf"
        start = time.perf_counter()
        convert(src, out, to="gguf", quant="Q4_K_M", **options)
        seconds = time.perf_counter() - start
        tensors = gguf.GGUFReader(out).tensors
        bpw = 8 * sum(t.n_bytes for t in tensors) / sum(t.n_elements for t in tensors)
        types = "/".join(sorted({t.tensor_type.name for t in tensors if len(t.shape) > 1}))
        q = compare(reference, gguf_logits(out, tokens), tokens)
        results[name] = {"bpw": bpw, "kl": q.kl, "top1": q.top1, "ppl": q.ppl_converted, "seconds": seconds}
        rows.append([name, f"{bpw:.3f}", *_cells(q), f"{seconds:.0f} s, {types}"])
    return rows, results


def _cells(q: Quality) -> list[str]:
    return [f"{q.kl:.5f}", f"{q.top1:.1%}", f"{q.ppl_converted:.2f}"]


def run(case: Case, work: Path, dwq: bool = False) -> tuple[list[list], dict]:
    kind, src = case.label, case.src
    tokens = Tokenizer.from_dir(src).encode(case.text)
    loaded = mlxqwen.load(src, dtype=mx.float32)
    source = loaded.model
    reference = logits_of(source, tokens)
    rows, results = [], {}

    def add(name: str, model: nn.Module, bpw: float, seconds: float) -> None:
        model.set_dtype(mx.float32)
        q = compare(reference, logits_of(model, tokens), tokens)
        results[name] = {"bpw": bpw, "kl": q.kl, "top1": q.top1, "ppl": q.ppl_converted, "seconds": seconds}
        rows.append([name, f"{bpw:.3f}", *_cells(q), f"{seconds:.0f} s"])

    from mlx_lm import load as mlx_lm_load

    start = time.perf_counter()
    convert(src, work / f"{kind}-4bit", recipe="4bit", dtype="bfloat16")
    uniform = mlx_lm_load(str(work / f"{kind}-4bit"))[0]
    target = bits_per_weight(uniform)
    add("uniform 4-bit g64", uniform, target, time.perf_counter() - start)
    for rounding in ("nearest", "activation"):
        start = time.perf_counter()
        out = work / f"{kind}-{rounding}"
        convert(
            src,
            out,
            target_bpw=round(target - 5e-4, 3),
            dtype="bfloat16",
            rounding=rounding,
            calibration=case.calibration and str(case.calibration),
        )
        model = mlx_lm_load(str(out))[0]
        add(f"ours --target-bpw, {rounding} rounding", model, bits_per_weight(model), time.perf_counter() - start)

    data = calibration_batch(src, loaded.config.vocab_size, case.calibration)
    bf16 = convert(src, work / f"{kind}-bf16", recipe="none", dtype="bfloat16").output
    calibration = case.calibration.read_text() if case.calibration else shipped_text(Tokenizer.from_dir(src))
    dwq_tokens = Tokenizer.from_dir(src).encode(calibration) if dwq else None
    for name, (model, why) in mlx_lm_methods(bf16, target, data, dwq_tokens).items():
        if model is None:
            rows.append([name, "-", "-", "-", "-", why])
        else:
            add(name, model, bits_per_weight(model), 0.0)
    gguf, measured = gguf_rows(src, work, tokens, reference, case.calibration)
    rows += gguf
    results.update(measured)
    results["source perplexity"] = _ppl(reference, tokens)
    return [[f"{kind} (source ppl {_ppl(reference, tokens):.2f})", "", "", "", "", ""], *rows], results


def _ppl(reference: mx.array, tokens: list[int]) -> float:
    return compare(reference, reference, tokens).ppl_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--models", default=",".join(KINDS), help="built models; '' for none")
    parser.add_argument("--trained", type=Path, nargs="*", default=[], help="demo-trainer HF directories")
    parser.add_argument("--dwq", action="store_true", help="also run mlx-lm's DWQ (it trains: slow on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_quant-", dir=args.workdir))
    rows, results = [], {}
    try:
        cases = [Case(kind, build(kind, work / f"{kind}-hf"), TEXT, None) for kind in args.models.split(",") if kind]
        cases += [trained_case(src, work) for src in args.trained]
        for case in cases:
            case_rows, results[case.label] = run(case, work, args.dwq)
            rows += case_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    columns = ["method", "bits/weight", "KL (nats/token)", "top-1", "perplexity", "note / time"]
    print_table("Quantization at equal bits per weight (held-out text)", columns, rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
