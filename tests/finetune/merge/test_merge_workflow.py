"""The seed's MoE LoRA workflow end to end on tiny models transformers builds locally:

    HF base (own tokenizer, Llama-3-style chat template) -> darkhorse import -> LoRA adapter
    -> darkhorse merge -> GGUF f32 + f16 -> llama.cpp Q6_K and Q4_K_M -> llama.cpp generates

for a Mixtral base (router + expert LoRA), a DeepseekV3 base (Genesis: MLA + MoE with a shared expert)
and a dense Llama base. The f32 GGUF's greedy continuation of a chat prompt equals darkhorse's for 32+
tokens. At these dims no row is a multiple of 256, so llama.cpp's K-quants fall back for every matrix
(quantize reports it); the quantized files must still load and generate.

The weights are drawn with initializer_range 0.1 (not 0.02) so next-token and routing scores are spread
out: the test checks that darkhorse's greedy margins are far above f32 summation-order noise, so the
comparison cannot pass or fail on a near-tie.
"""

from __future__ import annotations

import json

import pytest
import torch

from darkhorse.checkpoint import load_for_inference, load_model
from darkhorse.cli import main
from darkhorse.finetune.merge import SIDECAR_FILE, base_weights_sha256
from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import render_chat_prompt
from darkhorse.interop.gguf import export_gguf
from darkhorse.interop.hf_import import import_hf
from darkhorse.interop.llama_cpp_child import LLAMA_CPP_MISSING
from darkhorse.interop.quantize import quantize_gguf
from tests.finetune.merge.conftest import FAMILIES, VOCAB, build_hf_base, make_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)

GREEDY_TOKENS = 32


def make_adapter(base_hf, base, run_dir, family: str):
    """RUN_DIR/final: a LoRA adapter in PEFT's format with darkhorse's sidecar naming `base`.

    Made by PEFT itself for now; `darkhorse finetune --base BASE --out RUN_DIR` writes the same files."""
    final = make_peft_adapter(base_hf, run_dir / "final", family)
    sidecar = {"base": str(base), "base_sha256": base_weights_sha256(load_model(base)[0])}
    (final / SIDECAR_FILE).write_text(json.dumps(sidecar))
    return final


def darkhorse_greedy(checkpoint, prompt: list[int]) -> tuple[list[int], float]:
    """darkhorse's greedy continuation and its smallest top-1 over top-2 logit margin."""
    model, tokenizer, _ = load_for_inference(checkpoint)
    tokens = list(Engine(model, tokenizer.vocab_size).stream(prompt, max_new_tokens=GREEDY_TOKENS))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1, : tokenizer.vocab_size]
    top2 = logits.topk(2).values
    return tokens, float((top2[:, 0] - top2[:, 1]).min())


def llama_generate(path, prompt: list[int], count: int) -> list[int]:
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, type_k=f32, type_v=f32, verbose=False)
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == count:
            break
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_seed_workflow_import_lora_merge_gguf_quantize_llama_cpp(tmp_path, family, capsys):
    build_hf_base(tmp_path / "hf", family)
    base = import_hf(tmp_path / "hf", tmp_path / "runs" / "base" / "final")
    adapter = make_adapter(tmp_path / "hf", base, tmp_path / "runs" / "lora", family)

    merged = tmp_path / "runs" / "merged" / "final"
    assert main(["merge", "--adapter", str(adapter), "--out", str(merged)]) == 0  # the base comes from the sidecar
    report = capsys.readouterr().out
    assert "wrote darkhorse model" in report and "did not change" not in report

    f32 = export_gguf(merged, tmp_path / "merged-f32.gguf", "f32")
    f16 = export_gguf(merged, tmp_path / "merged-f16.gguf", "f16")
    quantized = {qtype: quantize_gguf(f16, tmp_path / f"merged-{qtype}.gguf", qtype) for qtype in ("Q6_K", "Q4_K_M")}
    for qtype, result in quantized.items():
        assert result.out_bytes < result.in_bytes, qtype
        assert result.fallbacks  # 64-wide rows cannot take K-quants; reported, not hidden

    _, tokenizer, _ = load_for_inference(merged)
    assert tokenizer.chat_template and not tokenizer.has_chat_tokens
    text = render_chat_prompt(tokenizer, [{"role": "user", "content": "one two three"}])
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    prompt = tokenizer.encode(text)
    expected, margin = darkhorse_greedy(merged, prompt)
    assert len(expected) == GREEDY_TOKENS and margin > 1e-3  # far above f32 noise (~1e-5)
    assert llama_generate(f32, prompt, GREEDY_TOKENS) == expected
    base_tokens, _ = darkhorse_greedy(base, prompt)
    assert base_tokens != expected  # the adapter is in the GGUF, not just the base

    # and the merged model is the base with the adapter applied, as PEFT computes it
    sequence = torch.tensor([prompt + expected])
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_base, str(adapter)).eval()(sequence).logits
        ours = load_model(merged)[0](sequence).logits[..., :VOCAB]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    for path in (f16, *(r.out_path for r in quantized.values())):
        assert len(llama_generate(path, prompt, 8)) == 8, path.name
