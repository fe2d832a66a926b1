"""`darkhorse quantize`: llama.cpp's quantizer, per-tensor fallback report, perplexity measured by llama.cpp."""

from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkhorse.checkpoint import load_model, save_model_checkpoint
from darkhorse.cli import main
from darkhorse.config import ModelConfig, RunConfig, TrainConfig
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.interop.gguf import export_gguf
from darkhorse.interop.llama_cpp_child import LLAMA_CPP_MISSING, llama_cpp_version
from darkhorse.interop.quantize import gguf_perplexity, quantize_gguf
from darkhorse.model import Transformer

pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
QType = gguf.GGMLQuantizationType
WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"


@pytest.fixture(scope="module")
def f16_gguf(tiny_dense_checkpoint, tmp_path_factory):
    return export_gguf(tiny_dense_checkpoint, tmp_path_factory.mktemp("quantize") / "model-f16.gguf", "f16")


def write_val_dir(path, tokenizer_file, tokens: list[int]):
    """A prepared dir in the data/prepared.py format, holding `tokens` as both splits."""
    path.mkdir()
    array = np.asarray(tokens, dtype="<u4")
    array.tofile(path / "train.bin")
    array.tofile(path / "val.bin")
    (path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    vocab_size = Tokenizer.from_file(tokenizer_file).vocab_size
    split = {"tokens": len(tokens), "documents": 1, "bytes": 4 * len(tokens)}
    meta = {"format": "darkhorse-prepared-v1", "vocab_size": vocab_size, "splits": {"train": split, "val": split}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def tensor_types(path) -> dict[str, QType]:
    return {t.name: QType(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def test_cli_quantizes_q4_k_m_and_reports_sizes_and_perplexity(tiny_dense_checkpoint, f16_gguf, tmp_path, capsys):
    tokenizer_file = tiny_dense_checkpoint / "tokenizer.json"
    tokens = Tokenizer.from_file(tokenizer_file).encode(" ".join([WORDS] * 24))
    data = write_val_dir(tmp_path / "prepared", tokenizer_file, tokens)
    out = tmp_path / "model-q4_k_m.gguf"
    argv = [str(f16_gguf), "--type", "Q4_K_M", "--out", str(out), "--data", str(data), "--context", "64"]
    assert main(["quantize", *argv, "--ppl-tokens", "256", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "no fallbacks" in printed
    assert "perplexity on 256 val tokens" in printed
    assert out.stat().st_size < 0.4 * f16_gguf.stat().st_size

    types = tensor_types(out)
    assert types["blk.0.attn_q.weight"] == QType.Q4_K  # dim 256: real K-quants, no fallback
    assert types["blk.0.attn_norm.weight"] == QType.F32
    assert set(types.values()) <= {QType.Q4_K, QType.Q6_K, QType.F32}

    # The quantized file still runs in llama.cpp and the memorised cycle costs little more.
    numbers = [float(part.split()[0]) for part in printed.split("(llama.cpp): ")[1].split(" -> ")]
    ppl_f16, ppl_q4 = numbers
    assert 1.0 < ppl_f16 < 3.0
    assert ppl_f16 * 0.9 < ppl_q4 < ppl_f16 * 1.5


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K_M"])
def test_other_types_use_their_own_formats(f16_gguf, tmp_path, qtype):
    report = quantize_gguf(f16_gguf, tmp_path / "out.gguf", qtype, threads=1)
    main_types = {QType[t.type_out] for t in report.tensors if len(t.shape) == 2}
    expected = {"Q8_0": {QType.Q8_0}, "Q6_K": {QType.Q6_K}, "Q5_K_M": {QType.Q5_K, QType.Q6_K}}[qtype]
    assert main_types <= expected and QType[report.tensors[0].type_in] in (QType.F16, QType.F32)
    assert report.fallbacks == []
    assert report.out_bytes == (tmp_path / "out.gguf").stat().st_size < report.in_bytes


def test_rows_not_multiple_of_256_are_reported_as_fallbacks(tiny_dense_checkpoint, tmp_path):
    tokenizer_file = tiny_dense_checkpoint / "tokenizer.json"
    vocab = Tokenizer.from_file(tokenizer_file).vocab_size
    cfg = ModelConfig(vocab_size=vocab, n_layers=1, dim=192, n_heads=3, n_kv_heads=1, ffn_dim=512, max_seq_len=64)
    checkpoint = save_model_checkpoint(
        tmp_path / "dim192", Transformer(cfg), RunConfig(model=cfg, train=TrainConfig(seq_len=64)), tokenizer_file, {}
    )
    f16 = export_gguf(checkpoint, tmp_path / "dim192-f16.gguf", "f16")
    report = quantize_gguf(f16, tmp_path / "dim192-q4.gguf", "Q4_K_M", threads=1)
    fallen = {t.name: t.type_out for t in report.fallbacks}
    # Every matrix whose rows have 192 values (all but ffn_down, whose rows have 512) falls back.
    assert set(fallen) == {
        "token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
        "blk.0.attn_output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight",
    }  # fmt: skip
    assert all(QType[t] not in (QType.Q4_K, QType.Q6_K) for t in fallen.values())
    assert tensor_types(report.out_path)["blk.0.ffn_down.weight"] in (QType.Q4_K, QType.Q6_K)


def test_perplexity_matches_darkhorse_on_the_same_windows(tiny_dense_checkpoint, tmp_path):
    f32 = export_gguf(tiny_dense_checkpoint, tmp_path / "model-f32.gguf", "f32")
    model, _, _ = load_model(tiny_dense_checkpoint)
    tokens = np.asarray(Tokenizer.from_file(tiny_dense_checkpoint / "tokenizer.json").encode(" ".join([WORDS] * 6)))
    context = 32
    theirs = gguf_perplexity(f32, tokens, context=context, threads=1)
    losses = []
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, context):
            window = torch.tensor(tokens[start : start + context], dtype=torch.long)
            if len(window) < 2:
                break
            logits = model(window[None, :-1]).logits[0]
            losses.append(F.cross_entropy(logits, window[1:], reduction="none"))
    ours = math.exp(torch.cat(losses).mean().item())
    assert theirs == pytest.approx(ours, rel=2e-3)  # llama.cpp keeps its KV cache in F16 here


def test_bad_input_is_one_line_error_and_nothing_is_written(f16_gguf, tiny_dense_checkpoint, tmp_path, capsys):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    out = tmp_path / "out.gguf"
    cases = [
        ([str(tmp_path / "missing.gguf"), "--type", "Q8_0", "--out", str(out)], "GGUF file not found"),
        ([str(not_gguf), "--type", "Q8_0", "--out", str(out)], "is not a GGUF file"),
    ]
    for argv, message in cases:
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

    with pytest.raises(DarkhorseError, match="unknown quantization type"):
        quantize_gguf(f16_gguf, out, "Q3_K")
    with pytest.raises(SystemExit):  # argparse refuses it before any work
        main(["quantize", str(f16_gguf), "--type", "Q3_K", "--out", str(out)])

    out.write_bytes(b"precious")
    assert main(["quantize", str(f16_gguf), "--type", "Q8_0", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["quantize", str(f16_gguf), "--type", "Q8_0", "--out", str(out), "--force", "--threads", "1"]) == 0
    assert tensor_types(out)["blk.0.attn_q.weight"] == QType.Q8_0

    with pytest.raises(DarkhorseError, match="already holds Q8_0"):
        quantize_gguf(out, tmp_path / "again.gguf", "Q4_K_M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "out.gguf"]


def test_val_data_from_another_tokenizer_is_refused(f16_gguf, tmp_path):
    other = Tokenizer.train(["completely different text about zebras"] * 50, vocab_size=300)
    other_file = other.save(tmp_path / "other-tokenizer.json")
    data = write_val_dir(tmp_path / "prepared", other_file, other.encode("zebras zebras zebras"))
    out = tmp_path / "q8.gguf"
    argv = ["quantize", str(f16_gguf), "--type", "Q8_0", "--out", str(out), "--data", str(data), "--threads", "1"]
    assert main(argv) == 2
    assert not out.exists()


def test_deepseek2_quantizes_with_router_kept_f32(tiny_genesis_checkpoint, tmp_path):
    import llama_cpp

    f16 = export_gguf(tiny_genesis_checkpoint, tmp_path / "genesis-f16.gguf", "f16")
    report = quantize_gguf(f16, tmp_path / "genesis-q4.gguf", "Q4_K_M", threads=1)
    by_name = {t.name: t for t in report.tensors}
    router = by_name["blk.1.ffn_gate_inp.weight"]
    assert router.type_out == "F32" and not router.fell_back  # llama.cpp keeps routers exact on purpose
    assert by_name["blk.1.ffn_gate_exps.weight"].fell_back  # dim 128: expert rows cannot take Q4_K
    assert not by_name["blk.0.ffn_down.weight"].fell_back  # rows of 256 do
    assert llama_cpp.Llama(str(report.out_path), n_ctx=64, n_threads=1, verbose=False).n_vocab() > 0


CRASHING_LLAMA_CPP = """
import os, signal

def llama_model_quantize_default_params():
    os.kill(os.getpid(), signal.SIGSEGV)

def Llama(*args, **kwargs):
    print("/src/ggml-backend.cpp:1294: GGML_ASSERT(*cur_backend_id != -1) failed", file=__import__("sys").stderr)
    os.abort()
"""


@pytest.fixture
def crashing_llama_cpp(tmp_path, monkeypatch):
    """Child processes import a llama_cpp that dies by a signal, as llama.cpp does on AMX Xeons."""
    fake = tmp_path / "fake-llama-cpp"
    fake.mkdir()
    (fake / "llama_cpp.py").write_text(CRASHING_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))


def test_a_llama_cpp_crash_in_quantize_is_one_error_line_and_writes_nothing(
    f16_gguf, tmp_path, crashing_llama_cpp, capsys
):
    out = tmp_path / "q8.gguf"
    assert main(["quantize", str(f16_gguf), "--type", "Q8_0", "--out", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"(llama-cpp-python {llama_cpp_version()}) crashed with SIGSEGV during quantize of {f16_gguf}" in err
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-llama-cpp"]  # no output, no temp file


def test_a_llama_cpp_abort_in_perplexity_names_the_assertion(f16_gguf, crashing_llama_cpp):
    with pytest.raises(DarkhorseError, match=r"crashed with SIGABRT \(ggml-backend.cpp:1294: GGML_ASSERT"):
        gguf_perplexity(f16_gguf, np.arange(40), context=16, threads=1)
