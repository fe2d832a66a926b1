"""The seed's MoE LoRA workflow end to end on tiny models transformers builds locally:

    HF base (own tokenizer, Llama-3-style chat template) -> darkhorse finetune (imports it on the fly;
    router freeze, aux loss, an 80/20 mix) -> darkhorse merge (the base from the adapter's sidecar)
    -> GGUF f32 + f16 -> llama.cpp Q6_K and Q4_K_M -> llama.cpp generates

for a Mixtral base (router + fused gate/up + down expert LoRA), a DeepseekV3 base (Genesis: MLA + MoE with a
shared expert; its router, whose selection bias keeps updating, is saved whole in modules_to_save) and a
dense Llama base. The merged model computes darkhorse's base + adapter (fp32, 1e-5) and PEFT's (1e-4); the
f32 GGUF's greedy continuation of a chat prompt equals darkhorse's for 32+ tokens. At these dims no row is a
multiple of 256, so llama.cpp's K-quants fall back for every matrix (quantize reports it); the quantized
files must still load and generate. The greedy margins are checked to be far above f32 summation-order
noise, so the comparison cannot pass or fail on a near-tie.
"""

from __future__ import annotations

import pytest
import torch

from darkhorse.checkpoint import load_for_inference, load_model
from darkhorse.cli import main
from darkhorse.finetune.run import load_adapted_model
from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import render_chat_prompt
from darkhorse.interop.gguf import export_gguf
from darkhorse.interop.hf_import import import_hf
from darkhorse.interop.llama_cpp_child import LLAMA_CPP_MISSING
from darkhorse.interop.quantize import quantize_gguf
from tests.finetune.conftest import FAMILIES, SMALL_RUN, VOCAB, build_hf_base

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)

GREEDY_TOKENS = 32


def make_adapter(base_hf, chats, run_dir, family: str):
    """RUN_DIR/final from `darkhorse finetune` on the HF base: the seed's recipe at toy scale (experts r8 >
    router r4, router frozen for 2 of 6 steps, aux loss, 80/20 mix); a dense base takes no router flags."""
    chat, memory = chats
    router = ["--expert-lora-r", "8", "--router-lora-r", "4", "--router-freeze-steps", "2",
              "--router-aux-loss-coef", "0.01"]  # fmt: skip
    argv = ["finetune", "--base", base_hf, "--data", f"{chat}:0.8", "--data", f"{memory}:0.2", "--out", run_dir,
            "--lora-r", "4", *(router if family != "llama" else []), "--quiet", *SMALL_RUN,
            "train.max_steps=6"]  # fmt: skip
    assert main([str(arg) for arg in argv]) == 0
    return run_dir / "final"


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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_seed_workflow_finetune_merge_gguf_quantize_llama_cpp(tmp_path, family, chat_files, capsys):
    build_hf_base(tmp_path / "hf", family)
    adapter = make_adapter(tmp_path / "hf", chat_files, tmp_path / "runs" / "lora", family)

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
    text = render_chat_prompt(tokenizer, [{"role": "user", "content": "after one"}])  # as trained
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    prompt = tokenizer.encode(text)
    expected, margin = darkhorse_greedy(merged, prompt)
    assert len(expected) == GREEDY_TOKENS and margin > 1e-3  # far above f32 noise (~1e-5)
    assert llama_generate(f32, prompt, GREEDY_TOKENS) == expected
    base = import_hf(tmp_path / "hf", tmp_path / "runs" / "base" / "final")
    base_tokens, _ = darkhorse_greedy(base, prompt)
    assert base_tokens != expected  # the adapter is in the GGUF, not just the base

    # and the merged model is the base with the adapter applied, as darkhorse and PEFT compute it
    sequence = torch.tensor([prompt + expected])
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_base, str(adapter)).eval()(sequence).logits
        adapted = load_adapted_model(adapter)[0](sequence).logits
        ours = load_model(merged)[0](sequence).logits
    torch.testing.assert_close(ours, adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[..., :VOCAB], theirs, atol=1e-4, rtol=0)
    for path in (f16, *(r.out_path for r in quantized.values())):
        assert len(llama_generate(path, prompt, 8)) == 8, path.name
