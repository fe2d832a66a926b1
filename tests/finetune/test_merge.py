"""`darkhorse merge`: a PEFT LoRA adapter (made by PEFT itself on a tiny transformers model) merged into its
base gives the logits PEFT computes with the adapter applied; bad adapters and wrong bases are refused
with one line and nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from darkhorse.checkpoint import load_model, weights_fingerprint
from darkhorse.cli import main
from darkhorse.errors import DarkhorseError
from darkhorse.finetune.merge import merge_adapter
from darkhorse.interop.hf_import import import_hf
from tests.finetune.conftest import FAMILIES, ROUTER_AND_EXPERTS, VOCAB, build_hf_base, make_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 200, 11, 64, 2, 150]])


def peft_logits(base_hf_dir, adapter_dir) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_hf_dir), dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return wrapped(TOKENS).logits


def hf_logits(hf_dir) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits[..., :VOCAB]  # an export pads the vocabulary to 64


def darkhorse_logits(checkpoint) -> torch.Tensor:
    model, _, _ = load_model(checkpoint)
    with torch.no_grad():
        return model(TOKENS).logits[..., :VOCAB]


def assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, mixtral_base):
    """A tiny Mixtral HF dir, its import, and a PEFT adapter on it (router + experts + attention)."""
    root = tmp_path_factory.mktemp("mixtral")
    adapter = make_peft_adapter(mixtral_base, root / "adapter", "mixtral", target_modules=["q_proj", "v_proj"])
    return mixtral_base, import_hf(mixtral_base, root / "imported"), adapter


SAVED_ROUTER = dict(
    target_parameters=ROUTER_AND_EXPERTS[1:], modules_to_save=["gate"], rank_pattern={}, alpha_pattern={}
)


@pytest.mark.parametrize(
    ("family", "lora"),
    [("mixtral", {}), ("mixtral", SAVED_ROUTER), ("genesis", {}), ("llama", {"use_rslora": True})],
)
def test_merge_gives_peft_logits(tmp_path, family, lora):
    hf = build_hf_base(tmp_path / "hf", family)
    adapter = make_peft_adapter(hf, tmp_path / "adapter", family, **lora)
    expected = peft_logits(hf, adapter)
    base = hf_logits(hf)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the outputs

    # the HF export of the merge, in transformers, is PEFT's model with the adapter applied (fp32)
    merge_adapter(adapter, tmp_path / "merged-hf", base=hf, fmt="hf")
    torch.testing.assert_close(hf_logits(tmp_path / "merged-hf"), expected, atol=1e-5, rtol=0)

    # the darkhorse checkpoint computes the same (up to darkhorse vs transformers kernels, as import)
    result = merge_adapter(adapter, tmp_path / "merged", base=hf)
    torch.testing.assert_close(darkhorse_logits(tmp_path / "merged"), expected, atol=1e-4, rtol=0)
    assert result.targets and all(t.changed > 0 and t.relative_delta > 0 for t in result.targets)


def test_merged_weights_are_base_plus_scaled_b_a(mixtral, tmp_path):
    """Tensor by tensor: a fused gate_up delta lands split in our gate and up experts, the router takes
    its rank_pattern / alpha_pattern scaling, and untargeted tensors stay bit-identical."""
    hf, imported, adapter = mixtral
    merge_adapter(adapter, tmp_path / "merged", base=imported)
    base, _, _ = load_model(imported)
    merged, _, _ = load_model(tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    theirs = wrapped.state_dict()
    ours_b, ours_m = base.state_dict(), merged.state_dict()
    size = FAMILIES["mixtral"][2]["intermediate_size"]
    for i in range(2):
        gate_up = theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        torch.testing.assert_close(ours_m[f"layers.{i}.ffn.experts.gate_proj"], gate_up[:, :size], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours_m[f"layers.{i}.ffn.experts.up_proj"], gate_up[:, size:], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours_m[f"layers.{i}.ffn.gate.weight"], theirs[f"model.layers.{i}.mlp.gate.weight"])
        assert torch.equal(ours_m[f"layers.{i}.attn.k_proj.weight"], ours_b[f"layers.{i}.attn.k_proj.weight"])
        assert not torch.equal(ours_m[f"layers.{i}.attn.q_proj.weight"], ours_b[f"layers.{i}.attn.q_proj.weight"])


def test_hash_is_the_same_for_an_hf_dir_and_its_import(mixtral, tmp_path):
    hf, imported, adapter = mixtral
    result = merge_adapter(adapter, tmp_path / "a", base=hf)
    assert result.fingerprint == weights_fingerprint(load_model(imported)[0])
    assert result.fingerprint != weights_fingerprint(load_model(tmp_path / "a")[0])


def bad_adapter(adapter, folder, *, drop=(), config=None, tensors=None):
    """A copy of `adapter` without the files in `drop`, with `config` merged into adapter_config.json and
    `tensors(dict) -> dict` applied to its weights."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    for file in adapter.iterdir():
        if file.name not in drop:
            (folder / file.name).write_bytes(file.read_bytes())
    if config:
        merged = {**json.loads((adapter / "adapter_config.json").read_text()), **config}
        (folder / "adapter_config.json").write_text(json.dumps(merged))
    if tensors:
        weights = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(str(weights))), str(weights))
    return folder


def _renamed(state: dict) -> dict:
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key.replace("q_proj", "qq_proj")] = state.pop(key)
    state[key.replace("q_proj", "qq_proj").replace("lora_A", "lora_B")] = state.pop(key.replace("lora_A", "lora_B"))
    return state


def _narrowed(state: dict) -> dict:
    key = next(k for k in state if "experts.lora_A" in k)
    state[key] = state[key][:, :-1].contiguous()
    return state


def _zeroed(state: dict) -> dict:
    return {k: torch.zeros_like(v) if "mlp.gate.lora_B" in k else v for k, v in state.items()}


def _diverged(state: dict) -> dict:
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    return state


BAD = {
    "missing weights": (dict(drop=("adapter_model.safetensors",)), "no adapter_model.safetensors"),
    "missing config": (dict(drop=("adapter_config.json",)), "no adapter_config.json"),
    "key that matches nothing": (dict(tensors=_renamed), "qq_proj, which is no weight of this base"),
    "shape mismatch": (dict(tensors=_narrowed), "do not fit the base tensor"),
    "rank that does not fit": (dict(config={"r": 4}), "do not fit the base tensor"),
    "zero delta": (dict(tensors=_zeroed), "do not change"),
    "dora": (dict(config={"use_dora": True}), "use_dora=True is not supported"),
    "not lora": (dict(config={"peft_type": "IA3"}), "is not LORA"),
    "diverged": (dict(tensors=_diverged), "is from a diverged run"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_are_refused_with_one_line(mixtral, tmp_path, capsys, case):
    hf, imported, adapter = mixtral
    options, message = BAD[case]
    broken = bad_adapter(adapter, tmp_path / "adapter", **options)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(broken), "--base", str(imported), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("darkhorse: error: ") and error.count("\n") == 0 and message in error
    assert_nothing_written(out)


def test_zero_delta_merges_when_allowed(mixtral, tmp_path):
    hf, imported, adapter = mixtral
    broken = bad_adapter(adapter, tmp_path / "adapter", tensors=_zeroed)
    result = merge_adapter(broken, tmp_path / "merged", base=imported, allow_zero_delta=True)
    assert sorted(t.hf_name for t in result.zero) == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]


def test_adapter_for_another_architecture_is_refused(mixtral, tmp_path):
    _, _, adapter = mixtral
    llama = build_hf_base(tmp_path / "llama", "llama")
    with pytest.raises(DarkhorseError, match="which is no weight of this base"):
        merge_adapter(adapter, tmp_path / "merged", base=llama)
    assert_nothing_written(tmp_path / "merged")


def test_no_base_and_no_sidecar_asks_for_base(mixtral, tmp_path):
    _, _, adapter = mixtral
    with pytest.raises(DarkhorseError, match="pass --base"):
        merge_adapter(adapter, tmp_path / "merged")


def test_per_expert_keys_of_older_transformers_land_in_their_expert(mixtral, tmp_path):
    """transformers 4 had one Linear per expert (`block_sparse_moe.experts.{j}.w1`): a LoRA on it changes
    expert j of our stacked gate_proj by exactly alpha/r * B @ A and no other expert."""
    from safetensors.torch import save_file

    _, imported, _ = mixtral
    torch.manual_seed(3)
    a, b = torch.randn(2, 64), torch.randn(96, 2)
    folder = tmp_path / "v4-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6,
                                                            "target_modules": ["w1"]}))  # fmt: skip
    key = "base_model.model.model.layers.1.block_sparse_moe.experts.2.w1"
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    merge_adapter(folder, tmp_path / "merged", base=imported)
    before = load_model(imported)[0].state_dict()["layers.1.ffn.experts.gate_proj"]
    after = load_model(tmp_path / "merged")[0].state_dict()["layers.1.ffn.experts.gate_proj"]
    torch.testing.assert_close(after[2] - before[2], 3.0 * b @ a, atol=1e-5, rtol=1e-5)
    others = [j for j in range(after.shape[0]) if j != 2]
    assert torch.equal(after[others], before[others])
