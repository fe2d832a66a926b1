"""MoE: sparse dispatch against a per-expert loop, routing rules, ALF balancing, statistics."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from darkhorse.config import MoEConfig, load_run_config
from darkhorse.errors import ConfigError
from darkhorse.model.moe import MoE, Router, domain_expert_mask, grouped_mm_supported


def moe_config(dim: int = 32, **moe):
    settings = {"n_routed_experts": 8, "experts_per_token": 2, "moe_intermediate_size": 16, "first_k_dense": 0, **moe}
    overrides = [f"model.moe.{k}={v}" for k, v in settings.items()]
    return load_run_config(overrides=[f"model.dim={dim}", "model.n_heads=4", "model.ffn=moe", *overrides]).model


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: loop over tokens' chosen experts one by one, with the layer's own routing."""
    flat = x.reshape(-1, x.shape[-1])
    routing = layer.gate(flat)
    out = torch.zeros_like(flat)
    experts = layer.experts
    for e in range(layer.moe.n_routed_experts):
        token_ids, slot = (routing.experts == e).nonzero(as_tuple=True)
        h = F.silu(flat[token_ids] @ experts.gate_proj[e].T) * (flat[token_ids] @ experts.up_proj[e].T)
        out = out.index_add(0, token_ids, (h @ experts.down_proj[e].T) * routing.weights[token_ids, slot, None])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(flat)
    return out.view_as(x)


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize(
    "moe",
    [{}, {"scoring": "softmax", "n_shared_experts": 0}, {"n_groups": 4, "topk_groups": 2}, {"experts_per_token": 1}],
    ids=["sigmoid", "softmax", "groups", "top1"],
)
def test_sparse_dispatch_matches_per_expert_loop(use_grouped_mm, moe):
    torch.manual_seed(0)
    layer = MoE(moe_config(**moe), layer_idx=0).eval()
    x = torch.randn(3, 11, 32, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_()
    out = layer(x, use_grouped_mm=use_grouped_mm)
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    expected = naive_moe(layer, reference_x)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, reference_x.grad, atol=1e-5, rtol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_grouped_mm_only_where_its_kernels_accept_the_shapes(monkeypatch):
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda", 0), torch.bfloat16
    assert grouped_mm_supported(cpu, torch.float32, 20, 36) and grouped_mm_supported(cpu, bf16, 24, 40)
    assert not grouped_mm_supported(cpu, torch.float32, 30, 36)  # 120-byte rows: torch raises
    assert not grouped_mm_supported(cpu, bf16, 20, 40)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert grouped_mm_supported(cuda, bf16, 512, 1024)
    assert not grouped_mm_supported(cuda, torch.float32, 512, 1024)  # CUDA kernels are bf16 only
    assert not grouped_mm_supported(cuda, bf16, 20, 1024) and not grouped_mm_supported(cuda, bf16, 512, 36)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not grouped_mm_supported(cuda, bf16, 512, 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_expert_sizes_fall_back_to_padded_bmm(dtype):
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=40, moe_intermediate_size=30), layer_idx=0).to(dtype)  # 60- or 120-byte rows
    x = torch.randn(2, 5, 40, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()  # grouped_mm would raise "strides should be multiple of 16 bytes"
    expected = naive_moe(layer.float(), x.detach().float())
    torch.testing.assert_close(layer(x.detach().float()), expected, atol=1e-5, rtol=1e-5)


def test_autocast_keeps_the_residual_dtype_and_the_fp32_result():
    torch.manual_seed(0)
    layer = MoE(moe_config(capacity_factor=0.8), layer_idx=0)
    layer.gate.e_score_correction_bias.copy_(torch.arange(8.0))  # fixed choices, so bf16 picks the same
    x = torch.randn(2, 16, 32, requires_grad=True)
    expected = layer(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == torch.float32
    assert (out - expected).norm() / expected.norm() < 2e-2
    assert (x.grad - expected_grad).norm() / expected_grad.norm() < 2e-2


def test_moe_layer_traces_as_one_graph():
    """No data-dependent shapes on the default path: torch.compile sees one graph, CUDA needs no host sync."""
    layer = MoE(moe_config(), layer_idx=0).to(torch.bfloat16)  # the grouped_mm meta kernel is bf16-only
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 8, 32, dtype=torch.bfloat16))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_fp32_layer_compiles_on_cpu_as_one_graph():
    """grouped_mm's shape-inference kernel is bf16-only, so a compiled fp32 layer takes padded bmm, whose
    routing-dependent padding is a custom op: no graph break (repeat_interleave and .item() broke it)."""
    layer = MoE(moe_config(), layer_idx=0).train()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 8, 32, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_bias_moves_selection_but_not_weights():
    torch.manual_seed(0)
    router = Router(16, MoEConfig(n_routed_experts=4, experts_per_token=1, norm_topk_prob=False))
    x = torch.randn(64, 16)
    router.e_score_correction_bias[2] = 10.0  # every token now picks expert 2 ...
    routing = router(x)
    assert (routing.experts == 2).all()
    expected = torch.sigmoid(x @ router.weight.T)[:, 2:3]  # ... weighted by its unbiased score
    torch.testing.assert_close(routing.weights, expected)


def test_group_limited_routing_stays_inside_top_groups():
    torch.manual_seed(0)
    router = Router(16, MoEConfig(n_routed_experts=8, experts_per_token=2, n_groups=4, topk_groups=1))
    routing = router(torch.randn(100, 16))
    groups = routing.experts // 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_capacity_factor_drops_overflow_and_counts_it():
    torch.manual_seed(0)
    layer = MoE(moe_config(capacity_factor=0.5, n_shared_experts=0), layer_idx=0).train()
    layer.gate.e_score_correction_bias[:2] = 10.0  # all tokens want experts 0 and 1
    out = layer(torch.randn(1, 32, 32))
    layer.after_optimizer_step(1)
    capacity = 0.5 * 32 * 2 / 8  # 4 slots per expert out of 32 wanted
    assert layer.training_metrics()["moe/L0/dropped_fraction"] == pytest.approx(1 - 2 * capacity / 64)
    assert (out.abs().sum(-1) > 0).sum() == capacity  # the earliest tokens were kept, both slots each


def skewed_batch(generator: torch.Generator) -> torch.Tensor:
    """Tokens that share a common offset, so the router's scores favour a few experts for most tokens."""
    return torch.randn(256, 32, generator=generator) + 1.0


def train_router(rate: float, steps: int = 300) -> float:
    """Train one MoE layer on a regression task; return max/mean expert load on a fresh batch."""
    torch.manual_seed(0)
    config = moe_config(bias_update_rate=rate, n_shared_experts=0)
    layer = MoE(config, layer_idx=0).train()
    teacher = torch.nn.Linear(32, 32)
    optimizer = torch.optim.Adam(layer.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = skewed_batch(data)
        loss = F.mse_loss(layer(x.unsqueeze(0)).squeeze(0), teacher(x).detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        layer.after_optimizer_step(step)
    layer(skewed_batch(data).unsqueeze(0))
    load = layer.load_since_step
    return float(load.max() / load.mean())


def test_alf_balances_expert_load_where_a_frozen_bias_does_not():
    balanced, frozen = train_router(rate=1e-2), train_router(rate=0.0)
    print(f"max/mean expert load after 300 steps: ALF {balanced:.2f}, frozen bias {frozen:.2f}")
    assert balanced <= 1.5
    assert frozen > balanced


def test_alf_bias_is_a_saved_buffer_outside_autograd():
    layer = MoE(moe_config(), layer_idx=0)
    assert "gate.e_score_correction_bias" in layer.state_dict()
    assert "gate.e_score_correction_bias" not in dict(layer.named_parameters())
    assert layer.gate.e_score_correction_bias.dtype == torch.float32
    layer.train()(torch.randn(2, 8, 32))
    layer.after_optimizer_step(1)
    bias = layer.gate.e_score_correction_bias
    assert not bias.requires_grad and bias.abs().sum() > 0
    assert bias.abs().max() == pytest.approx(layer.moe.bias_update_rate)


def test_collapse_warning_names_the_knob_once(caplog):
    layer = MoE(moe_config(collapse_share=0.5, collapse_steps=3, bias_update_rate=0.0), layer_idx=5).train()
    layer.gate.e_score_correction_bias[0] = 10.0
    with caplog.at_level(logging.WARNING, logger="darkhorse"):
        for step in range(1, 7):
            layer(torch.randn(1, 16, 32))
            layer.after_optimizer_step(step)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "layer 5" in warnings[0] and "model.moe.bias_update_rate" in warnings[0]


def test_aux_and_z_losses_are_reported_and_differentiable():
    layer = MoE(moe_config(aux_loss_alpha=0.01, z_loss_weight=1e-3), layer_idx=0).train()
    layer(torch.randn(2, 8, 32))
    losses = layer.take_losses()
    assert set(losses) == {"aux", "z"}
    sum(losses.values()).backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.take_losses() == {}


def test_domain_counts_and_prior_annealing():
    config = moe_config(domain_prior=True, n_domains=2, domain_prior_bonus=100.0, domain_prior_anneal_steps=10)
    layer = MoE(config, layer_idx=0).train()
    chosen = []
    layer.gate.register_forward_hook(lambda router, args, routing: chosen.append(routing.experts))
    layer(torch.randn(1, 16, 32), domains=torch.tensor([[0] * 8 + [1] * 8], dtype=torch.uint8))
    experts = chosen[0]
    assert (experts[:8] % 2 == 0).all() and (experts[8:] % 2 == 1).all()  # the prior decides: round-robin groups
    layer.after_optimizer_step(10)
    assert float(layer.domain_prior_scale) == 0.0  # annealed away: inference needs no tags
    assert "domain_prior_scale" in layer.state_dict()


def test_domain_mask_round_robin():
    assert domain_expert_mask(3, 6)[:3].nonzero()[:, 1].tolist() == [0, 3, 1, 4, 2, 5]
    assert domain_expert_mask(3, 6)[3].sum() == 0  # the untagged row


def test_idle_params_make_active_count_right():
    layer = MoE(moe_config(), layer_idx=0)
    per_expert = 3 * 32 * 16
    assert layer.idle_params_per_token() == (8 - 2) * per_expert


def isolated_layer(**moe) -> MoE:
    return MoE(moe_config(domain_routing="isolated", n_domains=3, n_routed_experts=6, **moe), layer_idx=0).train()


def chosen_experts(layer: MoE, x: torch.Tensor, domains: torch.Tensor | None) -> torch.Tensor:
    chosen = []
    handle = layer.gate.register_forward_hook(lambda router, args, routing: chosen.append(routing.experts))
    layer(x, domains=domains)
    handle.remove()
    return chosen[0]


def test_isolated_partition_is_one_group_per_domain():
    moe = isolated_layer().moe
    assert (moe.n_groups, moe.topk_groups) == (3, 1)  # inference picks one group through group-limited top-k


def test_isolated_tagged_tokens_route_inside_their_group_untagged_freely():
    torch.manual_seed(0)
    layer = isolated_layer()
    domains = torch.tensor([[0] * 8 + [1] * 8 + [2] * 8 + [3] * 8 + [255] * 8], dtype=torch.uint8)
    experts = chosen_experts(layer, torch.randn(1, 40, 32), domains)
    groups = experts // 2
    for d in range(3):
        assert (groups[8 * d : 8 * (d + 1)] == d).all()
    # untagged (3 = unknown, 255 = untagged): the router picks; one group per token, not one for all
    free = groups[24:]
    assert (free == free[:, :1]).all() and len(free[:, 0].unique()) > 1
    # tags never steer evaluation: inference has none
    layer.eval()
    x = torch.randn(1, 8, 32)
    assert torch.equal(chosen_experts(layer, x, domains[:, :8]), chosen_experts(layer, x, None))


def test_group_prediction_loss_trains_the_router():
    torch.manual_seed(0)
    layer = isolated_layer(group_loss_weight=1.0)
    centres = torch.randn(3, 32) * 2
    optimizer = torch.optim.Adam(layer.gate.parameters(), lr=0.05)

    def accuracy() -> float:
        layer.eval()
        domains = torch.arange(3).repeat_interleave(20)
        x = centres[domains] + torch.randn(60, 32)
        experts = chosen_experts(layer, x.unsqueeze(0), None)
        layer.train()
        return float((experts[:, 0] // 2 == domains).float().mean())

    before = accuracy()
    for _ in range(30):
        domains = torch.randint(0, 3, (4, 16))
        layer(centres[domains] + torch.randn(4, 16, 32), domains=domains.to(torch.uint8))
        loss = layer.take_losses()["group"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.9 < accuracy()


def test_group_loss_temperature_divides_the_group_scores():
    torch.manual_seed(0)
    x, domains = torch.randn(1, 12, 32), torch.tensor([[0, 1, 2] * 4])
    losses = {}
    for temperature in (1.0, 0.25):
        layer = isolated_layer(group_loss_temperature=temperature)
        torch.manual_seed(1)
        layer.gate.weight.data.normal_()
        layer(x, domains=domains)
        groups = layer.gate(x.view(12, 32)).scores.view(12, 3, 2).sum(-1)  # groups of two: the sum of both
        losses[temperature] = float(layer.take_losses()["group"])
        assert losses[temperature] == pytest.approx(0.1 * float(F.cross_entropy(groups / temperature, domains[0])))
    assert losses[0.25] != pytest.approx(losses[1.0])


def test_group_loss_dims_keep_the_loss_and_confine_its_gradient_to_them():
    torch.manual_seed(0)
    x, domains = torch.randn(1, 12, 32), torch.tensor([[0, 1, 2] * 4])
    whole, reserved, at_width = (isolated_layer(group_loss_dims=n) for n in (0, 8, 32))
    reserved.load_state_dict(whole.state_dict())
    at_width.load_state_dict(whole.state_dict())
    gradients = {}
    for name, layer in (("whole", whole), ("reserved", reserved), ("at_width", at_width)):
        stream = x.clone().requires_grad_()
        layer(stream, domains=domains)
        loss = layer.take_losses()["group"]
        gradients[name] = (loss.detach(), *torch.autograd.grad(loss, [stream, layer.gate.weight]))
    loss, stream_grad, gate_grad = gradients["whole"]
    reserved_loss, reserved_stream_grad, reserved_gate_grad = gradients["reserved"]
    assert torch.equal(loss, reserved_loss) and torch.equal(gate_grad, reserved_gate_grad)
    assert torch.equal(reserved_stream_grad[..., :8], stream_grad[..., :8]) and stream_grad[..., 8:].abs().sum() > 0
    assert reserved_stream_grad[..., 8:].abs().sum() == 0
    # N >= model.dim reads the whole stream
    assert all(torch.equal(a, b) for a, b in zip(gradients["at_width"], gradients["whole"], strict=True))
    assert MoEConfig().group_loss_dims == 16  # the default: the demo corpus and kinds3 (docs/experiments.md)


def test_group_loss_warmup_raises_the_weight_from_zero():
    x, domains = torch.randn(1, 12, 32), torch.tensor([[0, 1, 2] * 4])
    layer, full = isolated_layer(group_loss_warmup=4), isolated_layer()
    full.load_state_dict(layer.state_dict())
    full(x, domains=domains)
    target = float(full.take_losses()["group"])
    layer(x, domains=domains)
    assert "group" not in layer.take_losses()  # step 0: weight 0, no loss term
    for step, share in ((1, 0.25), (4, 1.0), (9, 1.0)):
        layer.after_optimizer_step(step)
        layer(x, domains=domains)
        assert float(layer.take_losses()["group"]) == pytest.approx(share * target)


def test_layers_before_isolated_from_layer_route_freely():
    from darkhorse.train.routing import isolated_partition

    """Free layers ignore the tags and get no group loss; the later ones route inside the tag's group."""
    torch.manual_seed(0)
    x, domains = torch.randn(1, 12, 32), torch.tensor([[0, 1, 2] * 4])
    config = moe_config(domain_routing="isolated", n_domains=3, n_routed_experts=6, isolated_from_layer=2)
    free, isolated = MoE(config, layer_idx=1).train(), MoE(config, layer_idx=2).train()
    isolated.load_state_dict(free.state_dict())
    untagged = chosen_experts(free, x, None)
    assert torch.equal(chosen_experts(free, x, domains), untagged) and not free.take_losses()
    assert torch.equal(chosen_experts(isolated, x, domains) // 2, domains.view(-1, 1).expand(-1, 2))
    assert "group" in isolated.take_losses()
    assert isolated_partition(config.moe, ["a", "b", "c"]).endswith("; MoE layers before layer 2 route freely")


def test_isolated_alf_balances_within_each_group():
    layer = isolated_layer(bias_update_rate=0.1)
    layer.load_since_step.copy_(torch.tensor([9.0, 1.0, 5.0, 5.0, 1.0, 1.0]))  # group 0 uneven, group 2 idle
    layer.after_optimizer_step(1)
    bias = layer.gate.e_score_correction_bias
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0, 0.0, 0.0])  # no group favoured over another


def unequal_layer(counts: list[int], **moe) -> MoE:
    config = moe_config(
        domain_routing="isolated", n_domains=len(counts), n_routed_experts=sum(counts), domain_experts=counts, **moe
    )
    return MoE(config, layer_idx=0).train()


def test_unequal_domain_experts_are_groups_of_their_common_size():
    """A domain owning more experts owns more groups; exports route groups of one expert freely (the same)."""
    moe = unequal_layer([4, 2, 3], experts_per_token=1).moe
    assert (moe.n_groups, moe.topk_groups, moe.limiting_groups()) == (9, 1, (1, 1))
    moe = unequal_layer([4, 2, 2]).moe  # k = 2: groups of two, one of them per token
    assert (moe.n_groups, moe.topk_groups, moe.limiting_groups()) == (4, 1, (4, 1))
    moe = unequal_layer([2, 1, 1]).moe  # k = 2 in groups of one: two groups per token, no limit at all
    assert (moe.n_groups, moe.topk_groups, moe.limiting_groups()) == (4, 2, (1, 1))
    moe = unequal_layer([7] * 4 + [6] * 6).moe  # Genesis's 64 experts across 10 domains
    assert (moe.n_groups, moe.topk_groups, moe.limiting_groups()) == (64, 2, (1, 1))
    from darkhorse.train.routing import isolated_partition

    line = isolated_partition(unequal_layer([4, 2, 3], experts_per_token=1).moe, ["code", "lists", "math"])
    assert "9 routed experts in 9 groups of 1 (experts code 0-3, lists 4-5, math 6-8)" in line


def test_domain_experts_read_from_a_command_line_or_yaml():
    for value in ("4,2,3", "[4, 2, 3]"):
        overrides = [
            "model.moe.domain_routing=isolated",
            "model.moe.n_routed_experts=9",
            f"model.moe.domain_experts={value}",
        ]
        assert load_run_config("genesis-demo", overrides=overrides).model.moe.domain_experts == [4, 2, 3]
    with pytest.raises(ConfigError, match="model.moe.domain_experts' expects int"):
        load_run_config("genesis-demo", overrides=["model.moe.domain_routing=isolated", "model.moe.domain_experts=4,x"])


@pytest.mark.parametrize(
    ("counts", "experts", "message"),
    [
        ([4, 2], 9, "each of the 3 domains at least one routed expert, 9 in all"),
        ([5, 2, 3], 9, "9 in all"),
        ([9, 0, 0], 9, "at least one"),
    ],
)
def test_domain_experts_that_do_not_fit_the_domains_are_refused(counts, experts, message):
    config = moe_config(domain_routing="isolated", n_routed_experts=experts, experts_per_token=1)
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config.moe, n_domains=3, domain_experts=counts)
    with pytest.raises(ConfigError, match="needs model.moe.domain_routing=isolated"):
        moe_config(domain_experts=[4, 4])


def test_unequal_groups_route_tagged_tokens_inside_their_domains_experts():
    torch.manual_seed(0)
    layer = unequal_layer([4, 2, 3], experts_per_token=1)
    domains = torch.tensor([[0] * 12 + [1] * 12 + [2] * 12 + [255] * 24], dtype=torch.uint8)
    experts = chosen_experts(layer, torch.randn(1, 60, 32), domains)[:, 0]
    owner = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    assert torch.equal(owner[experts[:36]], domains[0, :36].long())
    assert len(experts[:12].unique()) > 1  # a domain's several groups all take tokens
    assert len(owner[experts[36:]].unique()) > 1  # untagged tokens route freely


def test_group_loss_of_a_domain_owning_several_groups_is_their_summed_probability():
    torch.manual_seed(0)
    layer = unequal_layer([4, 2, 2], group_loss_weight=1.0)  # groups of two: domain 0 owns groups 0 and 1
    layer.gate.weight.data.normal_()
    x, domains = torch.randn(1, 12, 32), torch.tensor([[0, 1, 2] * 4])
    layer(x, domains=domains)
    groups = layer.gate(x.view(12, 32)).scores.view(12, 4, 2).sum(-1).softmax(-1)
    by_domain = torch.stack([groups[:, :2].sum(-1), groups[:, 2], groups[:, 3]], dim=-1)
    expected = F.nll_loss(by_domain.log(), domains[0])
    assert float(layer.take_losses()["group"]) == pytest.approx(float(expected), rel=1e-5)


def test_unequal_alf_balances_among_each_domains_experts():
    layer = unequal_layer([4, 2, 3], experts_per_token=1, bias_update_rate=0.1)
    layer.load_since_step.copy_(torch.tensor([5.0, 1, 1, 1, 2, 2, 9, 0, 0]))
    layer.after_optimizer_step(1)
    bias = layer.gate.e_score_correction_bias  # each domain's mean bias stays 0: no domain favoured
    assert bias.tolist() == pytest.approx([-0.15, 0.05, 0.05, 0.05, 0.0, 0.0, -0.4 / 3, 0.2 / 3, 0.2 / 3])


def test_isolated_refusals():
    with pytest.raises(ConfigError, match="at least one routed expert per domain: 2 routed experts for 3 domains"):
        moe_config(domain_routing="isolated", n_domains=3, n_routed_experts=2, experts_per_token=1)
    with pytest.raises(ConfigError, match=r"do not divide into 3 domains .*domain_experts=\[3,3,2\]"):
        moe_config(domain_routing="isolated", n_domains=3, n_routed_experts=8)
    with pytest.raises(ConfigError, match="needs model.moe.n_domains"):
        MoE(moe_config(domain_routing="isolated"), layer_idx=0)


def test_domain_prior_is_the_older_spelling_of_domain_routing_prior():
    assert moe_config(domain_prior=True, n_domains=2).moe.domain_routing == "prior"
    assert moe_config(domain_routing="prior", n_domains=2).moe.domain_prior
    assert moe_config().moe.domain_routing == "none" and not moe_config().moe.domain_prior  # the default
    with pytest.raises(ConfigError, match="exclude each other"):
        moe_config(domain_prior=True, domain_routing="isolated", n_domains=2)


def test_isolated_collapse_is_judged_within_each_group(caplog):
    layer = isolated_layer(collapse_steps=2)  # groups of 2, k = 2: every token takes its whole group
    for step in range(3):
        layer.load_since_step.copy_(torch.tensor([90.0, 90.0, 5.0, 5.0, 5.0, 5.0]))  # one domain dominates
        layer.after_optimizer_step(step)
    assert not layer.collapse_warned
    layer = MoE(moe_config(domain_routing="isolated", n_domains=2, n_routed_experts=8, collapse_steps=2), 0).train()
    for step in range(3):
        layer.load_since_step.copy_(torch.tensor([40.0, 0, 0, 0, 10, 10, 10, 10]))  # expert 0 takes its group
        layer.after_optimizer_step(step)
    assert layer.collapse_warned


def test_balanced_load_is_no_collapse_where_a_token_takes_half_its_group():
    # groups of 4 at k = 2: balanced, every expert takes half of its group's tokens
    layer = MoE(moe_config(domain_routing="isolated", n_domains=2, n_routed_experts=8, collapse_steps=2), 0).train()
    for step in range(3):
        layer.load_since_step.copy_(torch.tensor([30.0, 30, 30, 30, 5, 5, 5, 5]))
        layer.after_optimizer_step(step)
    assert not layer.collapse_warned
    for step in range(3):
        layer.load_since_step.copy_(torch.tensor([50.0, 40, 20, 10, 5, 5, 5, 5]))  # expert 0 in 5 of 6 tokens
        layer.after_optimizer_step(step)
    assert layer.collapse_warned
