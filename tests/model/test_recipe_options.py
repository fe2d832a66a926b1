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


def test_value_embeddings_add_a_table_per_layer_to_the_values_and_decode_as_they_train():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, value_embeds=1)).eval()
    assert len(model.value_embeds) == 1 and model.value_embeds[0].weight.shape == (128, 2 * 8)
    tokens = torch.randint(0, 128, (2, 12))
    full = model(tokens).logits
    cache = model.new_cache(2, 12)
    steps = [model(tokens[:, :8], cache=cache).logits]
    steps += [model(tokens[:, i : i + 1], cache=cache, start_pos=i).logits for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.value_embeds[0].weight.zero_()
    assert not torch.allclose(model(tokens).logits, full)  # the table reaches the output ...
    plain = Transformer(ModelConfig(**SMALL))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("value_embeds")})
    torch.testing.assert_close(plain.eval()(tokens).logits, model(tokens).logits)  # ... through the values only
    assert model.flops_per_token(12) == plain.flops_per_token(12)  # a lookup, not a matmul


def test_value_embeddings_are_optimised_as_embeddings_and_need_gqa():
    from darkhorse.train.optim import split_parameters

    model = Transformer(ModelConfig(**SMALL, value_embeds=2))
    hidden, embeddings, _, _ = split_parameters(model)
    tables = {id(table.weight) for table in model.value_embeds}
    assert tables <= {id(p) for p in embeddings} and not tables & {id(p) for p in hidden}
    with pytest.raises(ConfigError, match="model.value_embeds needs model.attention=gqa"):
        ModelConfig(**SMALL, value_embeds=1, attention="mla")
    with pytest.raises(ConfigError, match="model.value_embeds must be"):
        ModelConfig(**SMALL, value_embeds=3)


def smeared(model: Transformer) -> Transformer:
    """`model` with its smear (which starts at zero, as the model without it) given random values."""
    with torch.no_grad():
        for param in model.smear.parameters():
            param.normal_()
    return model


@pytest.mark.parametrize(
    ("attention", "smear", "width"),
    [("gqa", "embed", 1), ("mla", "embed", 1), ("gqa", "kv", 1), ("mla", "kv", 1)]
    + [("gqa", "embed", 2), ("mla", "kv", 3), ("gqa", "attn", 1), ("mla", "attn", 3)],
)
def test_the_smear_starts_as_the_model_without_it_and_decodes_as_it_trains(attention, smear, width):
    from darkhorse.config import MLAConfig
    from darkhorse.infer.dense_forward import DenseForward
    from darkhorse.infer.engine import Engine

    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    shape = {**SMALL, "attention": attention, "mla": mla, "n_kv_heads": 2 if attention == "gqa" else 4}
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**shape)).eval()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape, smear=smear, smear_width=width)).eval()
    state = model.state_dict()
    far = ["smear.far_gate", "smear.far_scale"] if width > 1 else []
    assert sorted(set(state) - set(plain.state_dict())) == [*far, "smear.gate", "smear.scale"]
    assert all(torch.equal(value, state[name]) for name, value in plain.state_dict().items())  # the same draws
    tokens = torch.randint(0, 128, (3, 14))
    assert torch.equal(model(tokens).logits, plain(tokens).logits)
    model(tokens, tokens).loss.backward()
    assert model.smear.scale.grad.abs().sum() > 0  # the smear learns from the first step
    assert width == 1 or model.smear.far_scale.grad.abs().sum() > 0

    full = smeared(model)(tokens).logits
    assert not torch.allclose(full, plain(tokens).logits)
    cache = model.new_cache(3, 14)
    steps = [model(tokens[:, :6], cache=cache).logits, model(tokens[:, 6:9], cache=cache, start_pos=6).logits]
    steps += [model(tokens[:, i : i + 1], cache=cache, start_pos=i).logits for i in range(9, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    cache = model.new_cache(3, 14)  # rows at their own positions (continuous batching)
    model(tokens[:, :4], cache=cache)
    at = torch.tensor([4, 4, 4])
    torch.testing.assert_close(model(tokens[:, 4:7], cache=cache, start_pos=at).logits, full[:, 4:7])
    assert not DenseForward.supports(model)  # the dense and native steps do not compute the smear
    prompts = [tokens[0, :5].tolist(), tokens[1, :8].tolist()]
    for prompt, new in zip(prompts, Engine(model).generate(prompts, max_new_tokens=5), strict=True):
        recomputed = list(prompt)
        for _ in range(5):
            recomputed.append(int(model(torch.tensor([recomputed])).logits[0, -1].argmax()))
        assert new == recomputed[len(prompt) :]


def test_the_smear_is_optimised_as_a_vector_counted_and_starts_at_its_scale():
    from darkhorse.train.optim import split_parameters

    model, plain = Transformer(ModelConfig(**SMALL, smear="kv")), Transformer(ModelConfig(**SMALL))
    _, _, _, vectors = split_parameters(model)
    assert {id(model.smear.gate), id(model.smear.scale)} <= {id(p) for p in vectors}  # no weight decay
    assert model.num_params() - plain.num_params() == 2 * 32
    assert model.flops_per_token(12) - plain.flops_per_token(12) == 6 * 2 * 32  # the gate's dot, the mix
    wide = Transformer(ModelConfig(**SMALL, smear="kv", smear_width=3))  # 3 offsets, each a gate and a scale
    assert set(map(id, wide.smear.parameters())) <= {id(p) for p in split_parameters(wide)[3]}
    assert wide.num_params() - plain.num_params() == 3 * 2 * 32
    assert wide.flops_per_token(12) - plain.flops_per_token(12) == 6 * 3 * 2 * 32
    torch.manual_seed(0)
    started = Transformer(ModelConfig(**SMALL, smear="kv", smear_scale=1.0))
    torch.manual_seed(0)
    zero = Transformer(ModelConfig(**SMALL, smear="kv"))
    assert torch.equal(started.smear.scale, torch.ones(32)) and not zero.smear.scale.any()
    assert all(
        torch.equal(p, q)
        for (n, p), (_, q) in zip(started.named_parameters(), zero.named_parameters(), strict=True)
        if n != "smear.scale"
    )
    with pytest.raises(ConfigError, match="model.smear_scale must be >= 0"):
        ModelConfig(**SMALL, smear="kv", smear_scale=-1.0)
    with pytest.raises(ConfigError, match="model.smear_width must be >= 1"):
        ModelConfig(**SMALL, smear="kv", smear_width=0)
    with pytest.raises(ConfigError, match="model.smear must be one of none, embed, kv, attn"):
        ModelConfig(**SMALL, smear="keys")
    with pytest.raises(ConfigError, match="model.smear=kv needs model.residual=plain"):
        ModelConfig(**SMALL, smear="kv", residual="mhc")
