"""Quantize a GGUF file with llama.cpp's own quantizer and measure what it cost, in llama.cpp.

The quantization itself is `llama_model_quantize` from libllama (through llama-cpp-python), the
same code as llama.cpp's `llama-quantize` tool, so the K-quant mixes (Q4_K_M puts some tensors in
Q6_K, ...) are exactly llama.cpp's. K-quants pack rows in super-blocks of 256 values: a tensor
whose rows are not a multiple of 256 cannot take them, and llama.cpp silently falls back to
another type (Q4_K -> Q5_0, Q6_K -> Q8_0, ...). The report reads the written file back with
`gguf.GGUFReader` and names every such tensor.

Perplexity is computed from llama.cpp's own logits on windows of a prepared val split, so the
original and the quantized file are measured by the same engine on the same tokens. Both run
llama.cpp in a child process (interop/llama_cpp_child.py): a llama.cpp crash is an error line, not
the end of the command.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_file
from darkhorse.interop.llama_cpp_child import run_llama_cpp

# llama_ftype values (llama.h) and the tensor types each one is meant to produce.
QUANT_TYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15}
INTENDED_TYPES = {
    "Q8_0": {QType.Q8_0},
    "Q6_K": {QType.Q6_K},
    "Q5_K_M": {QType.Q5_K, QType.Q6_K},
    "Q4_K_M": {QType.Q4_K, QType.Q6_K},
}
UNQUANTIZED = {QType.F32, QType.F16, QType.BF16}


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]  # torch order: the last entry is the row length
    type_in: str
    type_out: str
    fell_back: bool  # should have been quantized but its rows do not fit the target's blocks


@dataclass
class QuantizeReport:
    in_path: Path
    out_path: Path
    qtype: str
    in_bytes: int
    out_bytes: int
    tensors: list[TensorReport] = field(default_factory=list)
    ppl_in: float | None = None
    ppl_out: float | None = None
    ppl_tokens: int = 0

    @property
    def fallbacks(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.fell_back]


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader for `path`, or a one-line error if it is missing or not a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise DarkhorseError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise DarkhorseError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise DarkhorseError(f"{path}: unreadable GGUF file ({exc})") from None


def _tensor_types(reader: gguf.GGUFReader) -> dict[str, tuple[tuple[int, ...], QType]]:
    return {t.name: (tuple(int(n) for n in reversed(t.shape)), QType(t.tensor_type)) for t in reader.tensors}


def _report_tensors(reader_in: gguf.GGUFReader, reader_out: gguf.GGUFReader, qtype: str) -> list[TensorReport]:
    before = _tensor_types(reader_in)
    intended = INTENDED_TYPES[qtype]
    block = max(gguf.GGML_QUANT_SIZES[t][0] for t in intended)
    reports = []
    for name, (shape, type_out) in _tensor_types(reader_out).items():
        type_in = before.get(name, (shape, type_out))[1]
        # llama.cpp keeps some matrices F32 on purpose (MoE routers); a fallback is never F32.
        fell_back = len(shape) >= 2 and type_out not in intended | {QType.F32} and shape[-1] % block != 0
        reports.append(TensorReport(name, shape, type_in.name, type_out.name, fell_back))
    return reports


def quantize_gguf(
    in_path: str | Path, out_path: str | Path, qtype: str, *, force: bool = False, threads: int = 0
) -> QuantizeReport:
    """Quantize `in_path` (an f32/f16/bf16 GGUF) to `qtype` at `out_path` with llama.cpp (in a child process)."""
    if qtype not in QUANT_TYPES:
        raise DarkhorseError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    in_path, out_path = Path(in_path), Path(out_path)
    reader_in = open_gguf(in_path)
    quantized = sorted({t.name for _, t in _tensor_types(reader_in).values() if t not in UNQUANTIZED})
    if quantized:
        raise DarkhorseError(
            f"{in_path} already holds {', '.join(quantized)} tensors; quantize from an f32, f16 or bf16 "
            "export (darkhorse export --format gguf --outtype f16)"
        )
    if out_path.resolve() == in_path.resolve():
        raise DarkhorseError(f"--out {out_path} is the input file; choose another path")
    with atomic_file(out_path, force=force) as temp:
        run_llama_cpp("quantize", in_path, out=str(temp), ftype=QUANT_TYPES[qtype], threads=threads)
    return QuantizeReport(
        in_path=in_path,
        out_path=out_path,
        qtype=qtype,
        in_bytes=in_path.stat().st_size,
        out_bytes=out_path.stat().st_size,
        tensors=_report_tensors(reader_in, open_gguf(out_path), qtype),
    )


def gguf_vocab(reader: gguf.GGUFReader) -> list[str]:
    field = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if field is None:
        raise DarkhorseError("the GGUF file has no tokenizer.ggml.tokens: it cannot be evaluated on token ids")
    return list(field.contents())


def check_same_tokenizer(gguf_path: Path, tokenizer_file: Path) -> None:
    """Refuse val tokens from another tokenizer than the GGUF's: the perplexity would be noise."""
    from darkhorse.data.tokenizer import Tokenizer

    ours = Tokenizer.from_file(tokenizer_file).backend.get_vocab(with_added_tokens=True)
    theirs = gguf_vocab(open_gguf(gguf_path))
    for text, token_id in sorted(ours.items(), key=lambda item: item[1]):
        if token_id >= len(theirs) or theirs[token_id] != text:
            found = theirs[token_id] if token_id < len(theirs) else "nothing"
            raise DarkhorseError(
                f"{tokenizer_file} does not match the tokenizer in {gguf_path}: token {token_id} is {text!r} "
                f"there but {found!r} in the GGUF; use the prepared data the model was trained on"
            )


def gguf_perplexity(path: str | Path, tokens: np.ndarray, *, context: int = 256, threads: int = 0) -> float:
    """exp(mean next-token NLL) of `tokens` under llama.cpp, in non-overlapping windows of `context`.

    Each window starts from an empty cache, so every prediction sees between 1 and context-1 tokens
    of history (the same protocol as llama.cpp's `llama-perplexity` without its half-window skip).
    """
    if len(tokens) < 2:
        raise DarkhorseError("perplexity needs at least 2 val tokens")
    starts = range(0, len(tokens) - 1, context)
    windows = [[int(t) for t in tokens[start : start + context]] for start in starts]
    result = run_llama_cpp(
        "perplexity", path, context=context, threads=threads or os.cpu_count() or 1,
        windows=[window for window in windows if len(window) >= 2],
    )  # fmt: skip
    return float(np.exp(result["nll_sum"] / result["count"]))


def load_val_tokens(data_dir: str | Path, gguf_path: str | Path, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` tokens of DIR/val.bin, checked against the GGUF's tokenizer."""
    from darkhorse.data.prepared import open_prepared

    data = open_prepared(data_dir)
    if not (data.path / "val.bin").is_file() or len(data.tokens("val")) < 2:
        raise DarkhorseError(f"{data.path} has no val.bin (or fewer than 2 val tokens) to measure perplexity on")
    check_same_tokenizer(Path(gguf_path), data.tokenizer_path)
    return np.asarray(data.tokens("val")[:max_tokens])


def add_perplexity(report: QuantizeReport, tokens: np.ndarray, *, context: int, threads: int = 0) -> None:
    """Measure both files on `tokens`, in windows of `context` capped at the model's trained context."""
    reader = open_gguf(report.in_path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    trained = reader.fields.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
    if trained is not None:
        context = min(context, int(trained.contents()))
    report.ppl_in = gguf_perplexity(report.in_path, tokens, context=context, threads=threads)
    report.ppl_out = gguf_perplexity(report.out_path, tokens, context=context, threads=threads)
    report.ppl_tokens = len(tokens)


def layer_pattern(name: str) -> str:
    """`blk.7.attn_q.weight` -> `blk.*.attn_q.weight`, to summarise per-layer tensors in one row."""
    return re.sub(r"^blk\.\d+\.", "blk.*.", name)
