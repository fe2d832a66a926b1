"""MTP speculative decoding writes exactly what plain greedy decoding writes, whether the drafts are right or not."""

from __future__ import annotations

import itertools

import pytest
import torch

from darkhorse.config import MLAConfig, ModelConfig, MoEConfig
from darkhorse.errors import DarkhorseError
from darkhorse.infer.engine import Engine
from darkhorse.model import Transformer

GENESIS = dict(
    vocab_size=100, n_layers=2, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=64, attention="mla",
    ffn="moe", mtp_depth=1,
    mla=MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    moe=MoEConfig(
        n_routed_experts=4, experts_per_token=2, n_shared_experts=1, moe_intermediate_size=32, first_k_dense=1
    ),
)  # fmt: skip
PROMPTS = [[5, 17, 42, 8, 3], [1, 2], [9, 9, 9, 60, 61, 62, 63]]


def genesis_model(block_scale: float | None = None, smear: str = "none") -> Transformer:
    """A random genesis model with MTP; its drafts are almost always wrong.

    With `block_scale` the main model's blocks are scaled down, so it mostly predicts from the current token
    alone (context still flips some picks), and the MTP module is made to predict from the next token alone
    (block off, eh_proj passing the embedding): its drafts are then mostly, not always, right. `smear`: a
    `model.smear` with random values (a rejected draft's token is overwritten in its token cache too)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**GENESIS, smear=smear))
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
        if smear != "none":
            model.smear.gate.normal_()
            model.smear.scale.normal_()
        if block_scale is not None:
            for name, param in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                    param.mul_(0.0 if name.startswith("mtp.") else block_scale)
            eh_proj = model.mtp[0].eh_proj.weight
            eh_proj.zero_()
            eh_proj[:, : GENESIS["dim"]] = torch.eye(GENESIS["dim"])
    return model.eval()


def every_third_draft_wrong(model: Transformer) -> Transformer:
    """Negate the MTP module's output at every third call: that draft is the head's least likely token."""
    mtp, calls = model.mtp[0], itertools.count()
    right = mtp.forward

    def forward(*args, **kwargs):
        hidden = right(*args, **kwargs)
        return -hidden if next(calls) % 3 == 2 else hidden

    mtp.forward = forward
    return model


def decode(model: Transformer, prompts, **options) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, 100)
    return engine.generate(prompts, **options), engine


@pytest.mark.parametrize(
    ("model", "acceptance"),
    [
        (lambda: genesis_model(), (0.0, 0.3)),
        (lambda: genesis_model(block_scale=0.3), (1.0, 1.0)),
        (lambda: every_third_draft_wrong(genesis_model(block_scale=0.3)), (0.4, 0.9)),
        (lambda: every_third_draft_wrong(genesis_model(block_scale=0.3, smear="embed")), (0.3, 0.9)),
    ],
    ids=["drafts-wrong", "drafts-right", "two-drafts-in-three-right", "smear-two-drafts-in-three-right"],
)
def test_speculative_greedy_writes_what_plain_greedy_writes(model, acceptance):
    model = model()
    for prompts in ([PROMPTS[0]], PROMPTS):  # alone, and a ragged batch
        plain, _ = decode(model, prompts, max_new_tokens=24)
        spec, engine = decode(model, prompts, max_new_tokens=24, speculative="mtp")
        assert spec == plain
        assert all(len(row) == 24 for row in spec)
        assert engine.speculation.drafted > 0
        low, high = acceptance
        assert low <= engine.speculation.acceptance <= high, engine.speculation


def test_speculative_stops_and_limits_as_plain():
    model = genesis_model(0.3)
    plain, _ = decode(model, PROMPTS, max_new_tokens=30)
    stop = plain[0][5]  # a token row 0 writes: it stops there, the others when they write it or at the limit
    options = dict(max_new_tokens=30, stop_ids=[stop])
    assert decode(model, PROMPTS, speculative="mtp", **options)[0] == decode(model, PROMPTS, **options)[0]
    long_prompt = list(range(1, 60))  # the context (64) ends the decode before max_new_tokens
    assert (
        decode(model, [long_prompt], max_new_tokens=30, speculative="mtp")[0]
        == decode(model, [long_prompt], max_new_tokens=30)[0]
    )
    streamed = list(Engine(model, 100).stream(PROMPTS[0], max_new_tokens=9, speculative="mtp"))
    assert streamed == plain[0][:9]


def test_speculative_refuses_what_it_cannot_do():
    model = genesis_model()
    with pytest.raises(DarkhorseError, match="greedily only"):
        decode(model, [[1, 2]], max_new_tokens=4, temperature=0.8, speculative="mtp")
    with pytest.raises(DarkhorseError, match="unknown speculative"):
        decode(model, [[1, 2]], max_new_tokens=4, speculative="medusa")
    dense = Transformer(ModelConfig(vocab_size=100, n_layers=1, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64))
    with pytest.raises(DarkhorseError, match="MTP module"):
        decode(dense, [[1, 2]], max_new_tokens=4, speculative="mtp")


def test_generate_speculative_mtp_prints_the_same_and_reports_acceptance(tiny_genesis_checkpoint, capsys):
    from darkhorse.cli import main

    args = ["generate", "--checkpoint", str(tiny_genesis_checkpoint), "--prompt", "the", "--max-new-tokens", "16"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "mtp"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain
    assert "drafts accepted" in spec.err
    assert main([*args, "--speculative", "mtp", "--temperature", "0.7"]) == 2
    assert "greedily only" in capsys.readouterr().err
