"""Learning-rate schedules and the optimizer split (Muon on matrices, incl. 3-D expert stacks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from darkhorse.config import TrainConfig, load_run_config
from darkhorse.model import Transformer
from darkhorse.model.moe import Router
from darkhorse.train.optim import Lion, Muon, build_optimizers, newton_schulz_dtype, split_parameters
from darkhorse.train.schedule import build_schedulers, lr_multiplier


def test_wsd_warms_up_holds_for_80_percent_then_decays_to_a_tenth():
    multiplier = lr_multiplier(TrainConfig(schedule="wsd", max_steps=1000, warmup_steps=50))
    curve = [multiplier(step) for step in range(1000)]
    assert curve[0] == pytest.approx(1 / 50) and curve[49] == pytest.approx(1.0)
    assert all(value == 1.0 for value in curve[50:800])  # stable until the last 20%
    assert curve[800] == pytest.approx(1.0) and curve[801] < 1.0
    assert all(a >= b for a, b in zip(curve[800:], curve[801:], strict=False))  # decays monotonically
    assert curve[-1] == pytest.approx(0.1)


def test_cosine_decays_from_the_end_of_warmup_to_min_lr_ratio():
    multiplier = lr_multiplier(TrainConfig(schedule="cosine", max_steps=200, warmup_steps=20, min_lr_ratio=0.1))
    assert multiplier(19) == pytest.approx(1.0)
    assert multiplier(20 + 179 // 2) == pytest.approx(0.55, abs=0.01)  # halfway: midpoint of 1 and 0.1
    assert multiplier(199) == pytest.approx(0.1)
    constant = lr_multiplier(TrainConfig(schedule="constant", max_steps=200, warmup_steps=0))
    assert {constant(s) for s in range(200)} == {1.0}


def test_lambda_lr_state_round_trips():
    train = TrainConfig(schedule="cosine", max_steps=10, warmup_steps=2, lr=1.0)
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    (scheduler,) = build_schedulers([optimizer], train)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    restored_optimizer = torch.optim.SGD([param], lr=1.0)
    (restored,) = build_schedulers([restored_optimizer], train)
    restored.load_state_dict(scheduler.state_dict())
    optimizer.step()
    scheduler.step()
    restored_optimizer.step()
    restored.step()
    assert restored.get_last_lr() == scheduler.get_last_lr() == [lr_multiplier(train)(5)]


class ToyMoE(nn.Module):
    """Embedding, a 2-D matrix, a 3-D expert stack, a norm gain, a buffer and a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.experts = nn.Parameter(torch.randn(3, 8, 8) * 0.1)
        self.norm = nn.Parameter(torch.ones(8))
        self.register_buffer("routing_bias", torch.zeros(3))
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.embed(tokens)) * self.norm
        x = torch.einsum("bd,eod->beo", x, self.experts).sum(1)
        return self.lm_head(x)


def test_parameters_split_into_matrices_embeddings_and_vectors():
    model = ToyMoE()
    hidden, embeddings, head, vectors = split_parameters(model)
    assert {id(p) for p in hidden} == {id(model.proj.weight), id(model.experts)}
    assert [id(p) for p in embeddings] == [id(model.embed.weight)]  # the tied head is the same tensor, listed once
    assert head == []
    assert [id(p) for p in vectors] == [id(model.norm)]
    for optimizer in build_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu")):
        for group in optimizer.param_groups:
            assert not any(p is model.routing_bias for p in group["params"])  # buffers are never optimized


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_router_lr_takes_the_routers_to_their_own_element_wise_group(optimizer):
    config = load_run_config("genesis-tiny", overrides=["model.n_layers=3", "model.vocab_size=64", "model.mtp_depth=0"])
    model = Transformer(config.model)
    routers = {id(m.weight) for m in model.modules() if isinstance(m, Router)}
    assert len(routers) == 2  # genesis-tiny's first layer is dense

    def routers_group(train: TrainConfig) -> tuple[str, float, bool]:
        """(optimizer, lr, whether the group holds the routers alone) of the one group with the routers."""
        (found,) = [
            (type(built).__name__, group["lr"], {id(p) for p in group["params"]} == routers)
            for built in build_optimizers(model, train, torch.device("cpu"))
            for group in built.param_groups
            if {id(p) for p in group["params"]} & routers
        ]
        return found

    default = TrainConfig(optimizer=optimizer, lr=3e-3, muon_lr=0.02)
    assert routers_group(default) == (("Muon", 0.02, False) if optimizer == "muon" else ("AdamW", 3e-3, False))
    assert routers_group(TrainConfig(optimizer=optimizer, lr=3e-3, muon_lr=0.02, router_lr=1e-3)) == (
        "AdamW",
        1e-3,
        True,
    )


@pytest.mark.parametrize("scalar_optimizer", ["adamw", "lion"])
def test_muon_trains_2d_and_3d_matrices(scalar_optimizer):
    torch.manual_seed(0)
    model = ToyMoE()
    train = TrainConfig(optimizer="muon", scalar_optimizer=scalar_optimizer, lr=1e-2, muon_lr=0.02)
    optimizers = build_optimizers(model, train, torch.device("cpu"))
    assert isinstance(optimizers[0], Muon)
    assert isinstance(optimizers[1], Lion if scalar_optimizer == "lion" else torch.optim.AdamW)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens = torch.randint(0, 16, (32,))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(tokens), tokens)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} was not updated"


def test_expert_muon_orthogonalises_each_expert_on_its_own():
    torch.manual_seed(0)
    stack = nn.Parameter(torch.zeros(2, 6, 6))
    optimizer = Muon([stack], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    # expert 1's gradient is 100x expert 0's: a joint normalisation would leave expert 0 ~unchanged
    stack.grad = torch.stack([torch.randn(6, 6), 100 * torch.randn(6, 6)])
    optimizer.step()
    update_norms = stack.detach().flatten(1).norm(dim=1).tolist()
    assert update_norms[0] == pytest.approx(update_norms[1], rel=0.2)
    singular_values = torch.linalg.svdvals(stack.detach()[0])
    assert singular_values.min() > 0.3 and singular_values.max() < 1.5  # roughly orthogonal (NS, bf16)
    # its state dict round-trips like any optimizer's (the resume path)
    restored = Muon([stack], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.state[stack]["momentum_buffer"].shape == (2, 6, 6)  # one momentum, the stack's shape
    optimizer.zero_grad()  # the stack's gradient too, or the next step would add to this one's
    assert stack.grad is None


def test_muon_steps_matrices_and_stacks_as_torch_muon_steps_each_matrix_and_resumes():
    """torch's per-matrix Muon (momentum, nesterov, decay, lr scale, tall and wide): a matrix bit for
    bit, a stack batched over its experts up to bf16 rounding (batched and single matmuls may round
    differently), also across a state-dict round trip mid-run."""
    torch.manual_seed(0)
    options = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "original"}
    for shape in [(3, 8, 5), (3, 5, 8)]:
        start, matrix_start = torch.randn(shape), torch.randn(shape[1:])
        grads = [(torch.randn(shape), torch.randn(shape[1:])) for _ in range(4)]
        stack, matrix = nn.Parameter(start.clone()), nn.Parameter(matrix_start.clone())
        experts = [nn.Parameter(m.clone()) for m in [*start, matrix_start]]
        ours, reference = Muon([stack, matrix], **options), torch.optim.Muon(experts, **options)
        for step, (grad, matrix_grad) in enumerate(grads):
            if step == 2:  # what resume does: a fresh optimizer loads the saved state
                saved = ours.state_dict()
                ours = Muon([stack, matrix], **options)
                ours.load_state_dict(saved)
            stack.grad, matrix.grad = grad.clone(), matrix_grad.clone()
            for expert, row in zip(experts, [*grad, matrix_grad], strict=True):
                expert.grad = row.clone()
            ours.step()
            reference.step()
            torch.testing.assert_close(
                stack.detach(), torch.stack([e.detach() for e in experts[:-1]]), atol=1e-4, rtol=0
            )
            assert torch.equal(matrix.detach(), experts[-1].detach()), (shape, step)


def test_muon_steps_matrices_of_one_shape_together_as_torch_muon_steps_each():
    """Same-shape matrices share one batched Newton-Schulz (a small model's many small ones cost overhead):
    the same update as torch's per-matrix Muon up to bf16 rounding, tall and wide, a lone shape bit for bit."""
    torch.manual_seed(0)
    options = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "original"}
    starts = [torch.randn(8, 5), torch.randn(8, 5), torch.randn(5, 8), torch.randn(5, 8), torch.randn(6, 6)]
    ours = [nn.Parameter(start.clone()) for start in starts]
    theirs = [nn.Parameter(start.clone()) for start in starts]
    optimizer, reference = Muon(ours, **options), torch.optim.Muon(theirs, **options)
    for _ in range(3):
        for mine, other in zip(ours, theirs, strict=True):
            mine.grad = torch.randn_like(mine)
            other.grad = mine.grad.clone()
        optimizer.step()
        reference.step()
        for mine, other in zip(ours[:4], theirs[:4], strict=True):
            torch.testing.assert_close(mine.detach(), other.detach(), atol=1e-4, rtol=0)
        assert torch.equal(ours[4].detach(), theirs[4].detach())


def test_muon_precision_auto_is_bf16_only_where_bf16_matmuls_run_natively(monkeypatch):
    """An AVX2 CPU emulates bf16 matmuls (~50x slower than fp32's): there Newton-Schulz runs in fp32."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert newton_schulz_dtype("bf16", cpu) == torch.bfloat16 and newton_schulz_dtype("fp32", cuda) == torch.float32
    assert newton_schulz_dtype("auto", cuda) == torch.bfloat16
    for avx512_bf16, amx, expected in [
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert newton_schulz_dtype("auto", cpu) == expected
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ((muon, _),) = [build_optimizers(model, TrainConfig(optimizer="muon", muon_precision="fp32"), cpu)]
    assert muon.ns_dtype == torch.float32


def test_muon_in_fp32_steps_as_in_bf16_up_to_bf16_rounding():
    torch.manual_seed(0)
    starts = [torch.randn(8, 5), torch.randn(8, 5), torch.randn(3, 5, 8), torch.randn(6, 6)]
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        params = [nn.Parameter(start.clone()) for start in starts]
        optimizer = Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="original", ns_dtype=dtype)
        torch.manual_seed(1)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn_like(param)
            optimizer.step()
        runs[dtype] = [(param.detach() - start) for param, start in zip(params, starts, strict=True)]
    for bf16_step, fp32_step in zip(runs[torch.bfloat16], runs[torch.float32], strict=True):
        assert (bf16_step - fp32_step).norm() < 0.03 * fp32_step.norm()


def test_muon_loads_the_per_expert_state_of_older_checkpoints():
    """Until 2026-11-30 a stack's momentum was saved as one entry per expert: such a checkpoint resumes."""
    stack, matrix = nn.Parameter(torch.randn(3, 4, 4)), nn.Parameter(torch.randn(4, 4))
    momenta = torch.randn(3, 4, 4), torch.randn(4, 4)
    old = {
        "state": {**{i: {"momentum_buffer": momenta[0][i]} for i in range(3)}, 3: {"momentum_buffer": momenta[1]}},
        "param_groups": [{**Muon([stack, matrix]).state_dict()["param_groups"][0], "params": [0, 1, 2, 3]}],
    }
    optimizer = Muon([stack, matrix])
    optimizer.load_state_dict(old)
    assert torch.equal(optimizer.state[stack]["momentum_buffer"], momenta[0])
    assert torch.equal(optimizer.state[matrix]["momentum_buffer"], momenta[1])


def test_lion_update_is_the_sign_of_the_interpolated_momentum():
    param = nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    optimizer = Lion([param], lr=0.1, weight_decay=0.0)
    param.grad = torch.tensor([0.3, -2.0, 0.0])
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([0.9, -0.9, 0.5]))
    assert math.isclose(optimizer.state[param]["exp_avg"][1].item(), -2.0 * 0.01, rel_tol=1e-6)


@pytest.mark.parametrize("optimizer", [Lion, Muon])
def test_a_step_with_a_closure_computes_the_gradient_first_and_returns_its_loss(optimizer):
    """torch's optimizer protocol (LBFGS-style callers): step(closure) re-evaluates, with grad on."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 4))
    before = weight.detach().clone()
    opt = optimizer([weight], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = weight.square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.equal(loss, before.square().sum())
    assert not torch.equal(weight.detach(), before)  # it stepped on the gradient the closure made


def test_untied_head_and_embeddings_take_their_own_learning_rates():
    model = ToyMoE()
    model.lm_head.weight = nn.Parameter(torch.randn(16, 8) * 0.02)  # untie
    train = TrainConfig(lr=1e-3, embedding_lr=0.2, head_lr=4e-3)
    for kind in ("adamw", "muon"):
        train.optimizer = kind
        lr_of = {
            id(p): group["lr"]
            for optimizer in build_optimizers(model, train, torch.device("cpu"))
            for group in optimizer.param_groups
            for p in group["params"]
        }
        assert lr_of[id(model.embed.weight)] == 0.2 and lr_of[id(model.lm_head.weight)] == 4e-3
        assert lr_of[id(model.norm)] == 1e-3
