"""Output format `gguf`: one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python)
loads, mapped by `gguf_mapping`, with a Qwen3.5/3.6 checkpoint's MTP head as llama.cpp's `nextn`
tensors unless `no_mtp`. The metadata and tokenizer are written first, then the tensors
are streamed to disk one at a time, a few rows at a time: F32/F16/BF16/Q8_0 by gguf-py (a
dependency of mlxqwen itself); K-quants (Q4_K_M) are made from a BF16 file by llama.cpp's own
quantizer, which needs llama-cpp-python (`pip install 'mlxqwen[llama]'`)."""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import mlx.core as mx
import numpy as np
from rich.progress import Progress

from mlxqwen.backends import INSTALL_LLAMA, llama_cpp_installed
from mlxqwen.errors import ConvertError, option

from . import gguf_mapping as mapping
from .calibration import calibration_batch, user_text
from .format import ConvertResult, Option, OutputFormat
from .output import check_free_space, staged
from .progress import add_task, bytes_done
from .reader import SourceCheckpoint
from .recipes import quants_for
from .sensitivity import importance
from .source import Source

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# --quant -> (type gguf-py writes the matrices in, file type, llama.cpp file type to requantize to)
QUANTS: dict[str, tuple[Q, FT, FT | None]] = {
    "F32": (Q.F32, FT.ALL_F32, None),
    "F16": (Q.F16, FT.MOSTLY_F16, None),
    "BF16": (Q.BF16, FT.MOSTLY_BF16, None),
    "Q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0, None),
    # BF16 holds Qwen's bf16 weights exactly, so the quantizer sees the original values.
    "Q4_K_M": (Q.BF16, FT.MOSTLY_BF16, FT.MOSTLY_Q4_K_M),
}

_CHUNK_BYTES = 64 << 20  # fp32 rows converted and written at a time


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _write_rows(f: BinaryIO, value: mx.array, qtype: Q) -> None:
    """Quantize and write a tensor a few rows at a time (quantization blocks lie along rows),
    so that no more than one copy of it is in memory."""
    rows = value.reshape(-1, value.shape[-1])
    step = max(1, _CHUNK_BYTES // (4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = np.array(rows[start : start + step].astype(mx.float32))
        gguf.quants.quantize(chunk, qtype).tofile(f)


def _write_gguf(
    source: Source,
    out: Path,
    matrix_type: Q,
    file_type: FT,
    progress: Progress | None,
    mtp: bool,
    importance: dict[str, mx.array] | None = None,
) -> tuple[int, dict[str, np.ndarray]]:
    """Write the GGUF, with the MTP head where the checkpoint has one and `mtp` (as llama.cpp's
    `nextn` tensors); returns the number of parameters in it, and `importance` (by our tensor
    names) as llama.cpp's importance matrix (by its tensor names, in its column order). The
    vision tower is left out: llama.cpp's Qwen architectures run the decoder alone."""
    checkpoint = SourceCheckpoint.open(source.path)
    importance = importance or {}
    imatrix: dict[str, np.ndarray] = {}
    cfg, config_file = checkpoint.cfg, str(source.path / "config.json")
    arch = mapping.llama_arch(cfg, config_file)
    weights, head, _ = checkpoint.tensors()
    head = head if mtp and cfg.family == "qwen3_5" else {}
    layers = mapping.mtp_layers(head)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_file_type(file_type)
    mapping.write_metadata(w, cfg, arch, source.name, config_file, layers)
    mapping.write_tokenizer(w, source.path, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers + layers)
    weights.update(mapping.mtp_to_llama(key, value, cfg) for key, value in head.items())
    del head
    plan: list[tuple[mx.array, Q, int]] = []
    for name in list(weights):
        key, value = mapping.to_llama(name, weights.pop(name), cfg)
        # the nextn tensors are named already; TensorNameMap knows the rest
        tensor = key if key.startswith("blk.") else names.get_name(key, try_suffixes=(".weight", ".bias"))
        if tensor is None:
            raise ConvertError(f"{source.path}: tensor {key!r} has no counterpart in llama.cpp's {w.arch}")
        if name in importance:
            imatrix[tensor] = np.array(mapping.importance_to_llama(name, importance[name], cfg), dtype=np.float32)
        qtype = mapping.tensor_type(tensor, value.shape, matrix_type)
        nbytes = _nbytes(value.shape, qtype)
        w.add_tensor_info(tensor, value.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((value, qtype, nbytes))

    total = sum(nbytes for *_, nbytes in plan)
    params = sum(value.size for value, *_ in plan)
    check_free_space(out.parent, total)
    task = add_task(progress, f"gguf {source.name}", total) if progress is not None else None
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(out, "ab") as f:  # the data section: each tensor at the next aligned offset
        plan.reverse()
        done = 0
        while plan:  # holds the only reference to each tensor
            value, qtype, nbytes = plan.pop()
            f.write(bytes(-f.tell() % w.data_alignment))
            _write_rows(f, value, qtype)
            done += nbytes
            if task is not None:
                progress.update(task, completed=done, info=bytes_done(done, total))
    return params, imatrix


def _llama_quantize(src: Path, out: Path, file_type: FT, progress: Progress | None, imatrix: dict) -> None:
    """llama.cpp's quantizer, given `imatrix` (tensor name -> importance of its input columns,
    experts one after another) when there is one."""
    import llama_cpp  # checked to be installed before anything is written

    label = file_type.name.removeprefix("MOSTLY_")
    task = add_task(progress, f"quantize {label} (llama.cpp)", None) if progress is not None else None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    # a NULL-named entry ends the array; `values` keeps the data alive during the call
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    values = [np.ascontiguousarray(v.reshape(-1), dtype=np.float32) for v in imatrix.values()]
    for entry, name, value in zip(entries, imatrix, values, strict=False):
        entry.name, entry.size = name.encode(), value.size
        entry.data = value.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if imatrix:
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    llama_log = logging.getLogger("llama-cpp-python")  # llama.cpp logs every tensor it quantizes
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        llama_log.setLevel(level)
    if status != 0:
        raise ConvertError(f"{out.name}: llama.cpp's quantizer failed (status {status}); see its messages above")
    if task is not None:
        progress.update(task, total=1, completed=1)


def _importance(source: Source, calibration: str | None, progress: Progress | None) -> dict[str, mx.array]:
    """The importance of every matrix's input columns on the calibration text (llama.cpp's
    importance matrix, by our tensor names): the same forward pass as an MLX budget's."""
    checkpoint = SourceCheckpoint.open(source.path)
    decoder, _, _ = checkpoint.tensors()
    names = [name for name, value in decoder.items() if quants_for(name, value.shape)]
    batch = calibration_batch(source.path, checkpoint.cfg.vocab_size, calibration)
    return importance(checkpoint, batch, names, progress)


class GgufFormat(OutputFormat):
    name = "gguf"
    options = {
        "quant": Option("GGUF tensor type (default Q8_0; Q4_K_M needs mlxqwen[llama])", "Q8_0", choices=tuple(QUANTS)),
        "no_mtp": Option("leave the multi-token-prediction head (mtp.*) out", False, switch=True),
        "imatrix": Option(
            "K-quants: weigh the rounding by an importance matrix measured on the calibration text", False, switch=True
        ),
        "calibration": Option("UTF-8 text to calibrate on (default: the built-in chats)", type=str),
    }

    def label(self, options: dict[str, Any]) -> str:
        return options["quant"]

    def default_output(self, name: str, options: dict[str, Any]) -> str:
        return f"{name}-{options['quant']}.gguf"

    def check(self, options: dict[str, Any]) -> None:
        if options["imatrix"] and QUANTS[options["quant"]][2] is None:
            said = option("imatrix")
            raise ConvertError(f"{said}: only llama.cpp's K-quants use an importance matrix; add --quant Q4_K_M")
        if options["calibration"] is not None:
            if not options["imatrix"]:
                said = option("calibration", options["calibration"])
                raise ConvertError(f"{said}: calibrates an importance matrix; add {option('imatrix')}")
            user_text(options["calibration"])

    def convert(
        self, source: Source, output: Path, options: dict[str, Any], *, force: bool, progress: Progress | None
    ) -> ConvertResult:
        start = time.perf_counter()
        matrix_type, file_type, requantize = QUANTS[options["quant"]]
        if requantize is not None and not llama_cpp_installed():
            raise ConvertError(
                f"{option('quant', options['quant'])}: K-quants come from llama.cpp's quantizer; "
                f"install it with {INSTALL_LLAMA}, or choose F32, F16, BF16 or Q8_0"
            )
        with staged(output, force, source.path) as tmp:
            if requantize is None:
                params, _ = _write_gguf(source, tmp, matrix_type, file_type, progress, not options["no_mtp"])
            else:
                importance = _importance(source, options["calibration"], progress) if options["imatrix"] else None
                intermediate = tmp.with_name(f"{tmp.name}.{matrix_type.name}")
                try:
                    params, imatrix = _write_gguf(
                        source, intermediate, matrix_type, file_type, progress, not options["no_mtp"], importance
                    )
                    _llama_quantize(intermediate, tmp, requantize, progress, imatrix)
                finally:
                    intermediate.unlink(missing_ok=True)
        size = output.stat().st_size  # tensors and the tokenizer (a few MB)
        return ConvertResult(output, options["quant"], size, 8 * size / params, time.perf_counter() - start)


GGUF = GgufFormat()
