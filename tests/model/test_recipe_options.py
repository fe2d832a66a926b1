"""The training-recipe options of the one model (issue 17): each does what its config key says."""

from __future__ import annotations

import pytest
import torch

from darkhorse.config import ModelConfig
from darkhorse.errors import ConfigError
from darkhorse.model import Transformer

SMALL = dict(vocab_size=128, n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def test_soft_capped_logits_stay_inside_the_cap():
    model = Transformer(ModelConfig(**SMALL, logit_softcap=2.0, init_std=1.0))
    logits = model(torch.randint(0, 128, (2, 16))).logits
    assert logits.abs().max() <= 2.0  # tanh rounds to 1 in fp32 far out
    assert logits.abs().max() > 1.5  # init_std=1 drives the raw logits far past the cap


def test_zero_init_out_starts_every_block_as_the_identity():
    model = Transformer(ModelConfig(**SMALL, zero_init_out=True))
    outs = [p for n, p in model.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(outs) == 4 and all(not p.any() for p in outs)
    assert model.layers[0].attn.q_proj.weight.std() > 0.01


def test_ungated_mlp_at_one_and_a_half_width_matches_swiglu_in_size():
    swiglu = Transformer(ModelConfig(**SMALL)).num_params()
    relu2 = Transformer(ModelConfig(**{**SMALL, "ffn_dim": 96}, ffn_activation="relu2")).num_params()
    assert swiglu == relu2


def test_learned_positions_need_gqa():
    with pytest.raises(ConfigError, match="model.positions=learned needs model.attention=gqa"):
        ModelConfig(**SMALL, positions="learned", attention="mla")
