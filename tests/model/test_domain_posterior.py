"""What ranks isolated routing's expert groups over the text so far: the causal domain posterior
(model.moe.domain_posterior; a token's group follows the document's running vote) and the group context
(model.moe.group_context; a learned running mean of per-token group evidence). Both route the same whether
the text comes at once or through any decode path."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from darkhorse.config import MLAConfig, ModelConfig, MoEConfig
from darkhorse.errors import ConfigError
from darkhorse.infer.engine import ContinuousBatch, Engine, Row
from darkhorse.model import Transformer
from darkhorse.model.moe import MoE, group_scores


def chosen_groups(layer: MoE, x: torch.Tensor, **kwargs) -> torch.Tensor:
    chosen = []
    handle = layer.gate.register_forward_hook(lambda router, args, routing: chosen.append(routing.experts[:, 0] // 2))
    layer(x, **kwargs)
    handle.remove()
    return chosen[0]


def test_groups_follow_the_running_vote_causally_and_the_cache_carries_it():
    torch.manual_seed(0)
    moe = MoEConfig(n_routed_experts=6, experts_per_token=2, moe_intermediate_size=16, domain_routing="isolated",
                    n_domains=3)  # fmt: skip
    layer = MoE(ModelConfig(dim=32, n_heads=4, ffn="moe", moe=moe), layer_idx=1).eval()
    directions = torch.eye(32)[:3] * 4  # group g's experts read direction g
    layer.gate.weight.data = directions.repeat_interleave(2, dim=0)
    x = directions[[0, 0, 0, 0, 0, 1, 1, 1]].unsqueeze(0)  # five tokens of group 0, then three of group 1
    assert chosen_groups(layer, x).tolist() == [0] * 5 + [1] * 3  # each token's own group (exports do this)
    layer.moe.domain_posterior = 0.9  # the vote share, its ties broken by the token's own scores
    assert chosen_groups(layer, x).tolist() == [0] * 8  # the votes so far: 5-1, 5-2, 5-3
    assert chosen_groups(layer, x.flip(1)).tolist() == [1] * 5 + [0] * 3  # causal: 3-2, then 3-3 (a tie)
    cache = layer.new_cache(2, 16, "cpu")  # prefill 5, then one token at a time; row 1 a later prompt
    chunks = [chosen_groups(layer, x[:, :5], cache=cache.rows(0, 1), start_pos=0)]
    chunks += [chosen_groups(layer, x[:, i : i + 1], cache=cache.rows(0, 1), start_pos=i) for i in range(5, 8)]
    assert torch.cat(chunks).tolist() == [0] * 8
    both = torch.cat([x[:, 7:8], x[:, 0:1]])  # per-row positions: row 0 at 7 (re-written), row 1 a fresh prompt
    assert chosen_groups(layer, both, cache=cache, start_pos=torch.tensor([7, 0])).tolist() == [0, 0]
    cache.move_row(0, 1)
    assert chosen_groups(layer, x[:, 1:2], cache=cache.rows(1, 2), start_pos=8).tolist() == [0]


def test_the_group_context_is_a_causal_running_mean_that_the_cache_carries():
    torch.manual_seed(0)
    moe = MoEConfig(n_routed_experts=6, experts_per_token=2, moe_intermediate_size=16, domain_routing="isolated",
                    n_domains=3, group_context=True)  # fmt: skip
    layer = MoE(ModelConfig(dim=32, n_heads=4, ffn="moe", moe=moe), layer_idx=1).eval()
    directions = torch.eye(32)[:3] * 4
    layer.gate.weight.data = directions.repeat_interleave(2, dim=0)
    x = directions[[0, 0, 0, 0, 0, 1, 1, 1]].unsqueeze(0)
    assert chosen_groups(layer, x).tolist() == [0] * 5 + [1] * 3  # zero-initialised: each token's own scores
    layer.group_context.weight.data = directions[:, :32] * 2  # evidence 8 for the token's own group
    # the running mean of the evidence: 8, ..., then 8 x 5/6, 5/7, 5/8 for group 0 against 8 x 1/6, ...
    assert chosen_groups(layer, x).tolist() == [0] * 8
    assert chosen_groups(layer, x.flip(1)).tolist() == [1] * 5 + [0] * 3  # causal
    cache = layer.new_cache(2, 16, "cpu")
    chunks = [chosen_groups(layer, x[:, :5], cache=cache.rows(0, 1), start_pos=0)]
    chunks += [chosen_groups(layer, x[:, i : i + 1], cache=cache.rows(0, 1), start_pos=i) for i in range(5, 8)]
    assert torch.cat(chunks).tolist() == [0] * 8
    both = torch.cat([x[:, 7:8], x[:, 5:6]])  # row 0 at 7 (re-written), row 1 a fresh prompt of group 1
    assert chosen_groups(layer, both, cache=cache, start_pos=torch.tensor([7, 0])).tolist() == [0, 1]


def test_the_group_context_learns_from_the_group_loss_without_pushing_the_stream():
    torch.manual_seed(0)
    moe = MoEConfig(n_routed_experts=6, experts_per_token=2, moe_intermediate_size=16, domain_routing="isolated",
                    n_domains=3, group_context=True)  # fmt: skip
    layer = MoE(ModelConfig(dim=32, n_heads=4, ffn="moe", moe=moe), layer_idx=1).train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    layer(x, domains=torch.tensor([[0] * 8, [2] * 4 + [255] * 4]))
    losses = layer.take_losses()
    assert set(losses) == {"group", "group_context"}
    losses["group_context"].backward()
    assert layer.group_context.weight.grad.abs().sum() > 0
    assert x.grad is None and layer.gate.weight.grad is None  # the hidden states and router: the own-score loss's


def test_the_posterior_and_the_context_need_isolated_routing():
    with pytest.raises(ConfigError, match="needs model.moe.domain_routing=isolated"):
        MoEConfig(n_groups=2, domain_posterior=0.5)
    with pytest.raises(ConfigError, match="group_context .* needs model.moe.domain_routing=isolated"):
        MoEConfig(n_groups=2, group_context=True)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        MoEConfig(domain_routing="isolated", n_domains=2, domain_posterior=1.5)


def fresh_model(weight: float, context: bool) -> Transformer:
    torch.manual_seed(0)
    moe = MoEConfig(n_routed_experts=6, experts_per_token=2, n_shared_experts=1, moe_intermediate_size=32,
                    domain_routing="isolated", n_domains=3, domain_posterior=weight, group_context=context)  # fmt: skip
    mla = MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    config = ModelConfig(vocab_size=100, n_layers=3, dim=64, n_heads=4, max_seq_len=64, attention="mla",
                         ffn="moe", moe=moe, mla=mla, mtp_depth=1)  # fmt: skip
    return Transformer(config)


def posterior_model(weight: float, context: bool = False) -> Transformer:
    model = fresh_model(weight, context)
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
        for name, weight in model.named_parameters():
            if name.endswith("group_context.weight"):  # trained evidence, not the zero init
                weight.normal_(0, 1.0)
    return model.eval()


PROMPTS = [[5, 17, 42, 8, 3], [1, 2], [9, 9, 9, 60, 61, 62, 63]]


@pytest.mark.slow
@pytest.mark.parametrize(("weight", "context"), [(1.0, False), (0.0, True), (0.5, True)])
def test_every_decode_path_routes_as_the_whole_text_does(weight: float, context: bool):
    model = posterior_model(weight, context)
    text = torch.tensor([PROMPTS[2] + PROMPTS[0] * 3])
    with torch.no_grad():
        whole = model(text).logits
        assert not torch.allclose(whole, posterior_model(0.0)(text).logits, atol=1e-3)  # the ranking acts
        cache = model.new_cache(1, 64)  # a prefill of 4, then a token at a time
        steps = [model(text[:, :4], cache=cache).logits]
        steps += [model(text[:, i : i + 1], cache=cache, start_pos=i).logits for i in range(4, text.shape[1])]
        assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-4)
    engine = Engine(model, 100)
    plain = engine.generate(PROMPTS, max_new_tokens=12)
    for prompt, tokens in zip(PROMPTS, plain, strict=True):  # the cached decode = recomputing the whole text
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1, :100].argmax()))
        assert tokens == ids[len(prompt) :]
    assert engine.generate(PROMPTS, max_new_tokens=12, speculative="mtp") == plain  # drafts rewrite positions
    rows = [Row(prompt, max_new_tokens=12) for prompt in PROMPTS * 2]
    batch, pending = ContinuousBatch(engine, 2), list(rows)  # rows join, leave and reuse cache rows
    while pending or batch.rows:
        while pending and not batch.full:
            batch.add(pending.pop(0))
        batch.step()
    assert [row.tokens for row in rows] == plain * 2


def test_the_group_context_starts_at_zero_and_leaves_the_other_weights_as_without_it():
    """Switching the head on must not redraw the model: every other initial weight is the same."""
    with_context, without = fresh_model(0.0, context=True), fresh_model(0.0, context=False)
    weights = dict(with_context.named_parameters())
    heads = {name for name in weights if name.endswith("group_context.weight")}
    assert heads and all(not weights[name].any() for name in heads)
    for name, param in without.named_parameters():
        assert torch.equal(weights[name], param), name


def test_later_isolated_layers_route_in_the_groups_the_first_one_chose():
    """One group decision a token: the first isolated layer ranks with its context head, the later ones follow
    it (they carry no head), and an MTP block, which reads other positions, ranks its own."""
    model = posterior_model(0.0, context=True)
    heads = {name for name, _ in model.named_parameters() if name.endswith("group_context.weight")}
    assert heads == {"layers.1.ffn.group_context.weight", "mtp.0.block.ffn.group_context.weight"}
    chosen, own = {}, {}

    def record(layer: MoE, router, args, routing) -> None:
        chosen[layer.layer_idx] = layer.expert_domain[routing.experts[:, 0]]
        selection = routing.scores + router.e_score_correction_bias
        own[layer.layer_idx] = group_scores(selection, layer.moe.n_groups).argmax(-1)

    moe_layers = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    for layer in moe_layers:
        layer.gate.register_forward_hook(partial(record, layer))
    with torch.no_grad():
        model(torch.randint(0, 100, (4, 24)))
    assert torch.equal(chosen[2], chosen[1])
    assert not torch.equal(own[2], chosen[2])  # by its own scores layer 2 would have chosen otherwise
    assert [layer.keeps_decode_state() for layer in moe_layers] == [True, False]  # a follower needs no cache
