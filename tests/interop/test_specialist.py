"""`export --domains`: a specialist cut out of a domain-isolated MoE run."""

from __future__ import annotations

import pytest
import torch

from darkhorse import checkpoint as ckpt
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.interop.specialist import cut_specialist
from darkhorse.train.trainer import train


def train_isolated(tmp_path, make_prepared, vocab_size: int = 64, extra: tuple[str, ...] = ()):
    data = make_prepared(tmp_path / "tagged", domains=True, vocab_size=vocab_size)
    config = load_run_config(
        "tiny-cpu",
        overrides=[
            "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=32",
            "train.batch_size=2", "train.max_steps=2", "train.eval_steps=0", "train.save_interval=0",
            "model.ffn=moe", "model.moe.moe_intermediate_size=32", "model.moe.domain_routing=isolated",
            "model.moe.first_k_dense=0", "model.moe.n_routed_experts=6", *extra,
        ],
    )  # fmt: skip
    return train(config, [(data, 1.0)], tmp_path / "run", verbose=False).checkpoint


@pytest.fixture
def isolated_run(tmp_path, make_prepared):
    return train_isolated(tmp_path, make_prepared)


@pytest.mark.parametrize("context", [False, True], ids=["own-scores", "group-context"])
def test_specialist_keeps_its_domains_groups_and_the_shared_part(context, tmp_path, make_prepared):
    isolated_run = train_isolated(tmp_path, make_prepared, extra=(f"model.moe.group_context={context}",))
    full, config, _ = ckpt.load_model(isolated_run)
    everything = cut_specialist(isolated_run, ["a", "b", "c"], tmp_path / "all")
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(ckpt.load_model(everything)[0](tokens).logits, full(tokens).logits)
    specialist, small, meta = ckpt.load_model(cut_specialist(isolated_run, ["b"], tmp_path / "b"))
    assert (small.model.moe.n_routed_experts, small.model.moe.n_groups, meta["domains"]) == (2, 1, ["b"])
    for name, layer in zip(("layers.0", "layers.1"), specialist.layers, strict=True):
        full_layer = full.get_submodule(name)
        assert torch.equal(layer.ffn.gate.weight, full_layer.ffn.gate.weight[2:4])
        assert torch.equal(layer.ffn.experts.down_proj, full_layer.ffn.experts.down_proj[2:4])
        assert torch.equal(layer.ffn.shared_experts.up_proj.weight, full_layer.ffn.shared_experts.up_proj.weight)
        if context and name == "layers.0":  # the kept group's row of the context evidence (layer 1 follows 0)
            assert torch.equal(layer.ffn.group_context.weight, full_layer.ffn.group_context.weight[1:2])
    routed = sum(p.numel() for p in full.layers[0].ffn.experts.parameters())
    context_rows = full.layers[0].ffn.group_context.weight[:2].numel() if context else 0
    assert (
        sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in specialist.parameters())
        == 2 * (routed * 2 // 3 + full.layers[0].ffn.gate.weight[:4].numel()) + context_rows
    )


def test_specialist_of_unequal_domain_groups_keeps_its_domains_experts(tmp_path, make_prepared):
    """Domains owning 3, 2 and 1 experts (groups of one): the specialist keeps its domain's experts whole."""
    run = train_isolated(tmp_path, make_prepared, extra=("model.moe.domain_experts=[3, 2, 1]",))
    full, config, _ = ckpt.load_model(run)
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        everything = ckpt.load_model(cut_specialist(run, ["a", "b", "c"], tmp_path / "all"))[0]
        assert torch.equal(everything(tokens).logits, full(tokens).logits)
    specialist, small, _ = ckpt.load_model(cut_specialist(run, ["b"], tmp_path / "b"))
    assert (small.model.moe.n_routed_experts, small.model.moe.domain_experts) == (2, [2])
    assert torch.equal(specialist.layers[0].ffn.experts.up_proj, full.layers[0].ffn.experts.up_proj[3:5])
    pair = ckpt.load_model(cut_specialist(run, ["a", "c"], tmp_path / "ac"))[1].model.moe
    assert (pair.n_routed_experts, pair.domain_experts, pair.n_groups) == (4, [3, 1], 4)  # the full model's groups


def test_specialist_of_an_unknown_domain_lists_the_models_domains(isolated_run, tmp_path):
    with pytest.raises(DarkhorseError, match=r"--domains legal: .* has the domains a, b, c"):
        cut_specialist(isolated_run, ["b", "legal"], tmp_path / "x")


def test_no_specialist_of_a_model_with_free_layers(tmp_path, make_prepared):
    run = train_isolated(tmp_path, make_prepared, extra=("model.moe.isolated_from_layer=1",))
    with pytest.raises(DarkhorseError, match="before layer 1 freely"):
        cut_specialist(run, ["a"], tmp_path / "x")


def test_export_domains_writes_the_specialist(tmp_path, make_prepared, capsys):
    import shutil

    from darkhorse.cli import main
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.interop.export import load_state_dict_export

    tokenizer = Tokenizer.train(["one two three four five six"] * 20, vocab_size=300)
    run = train_isolated(tmp_path, make_prepared, vocab_size=tokenizer.vocab_size)
    args = ["export", "--checkpoint", str(run), "--format", "safetensors", "--domains", "b"]
    assert main([*args, "--out", str(tmp_path / "none")]) == 2  # no tokenizer: said about the checkpoint
    assert f"{run} has no tokenizer.json" in capsys.readouterr().err
    shutil.copy(tokenizer.save(tmp_path / "tokenizer.json"), run / "tokenizer.json")
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "specialist for b: " in capsys.readouterr().out
    assert load_state_dict_export(tmp_path / "b")[1].model.moe.n_routed_experts == 2
