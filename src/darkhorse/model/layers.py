"""Small building blocks shared by every architecture: RMSNorm, rotary embeddings, SwiGLU and the plain MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.config import ModelConfig, RopeScalingConfig
from darkhorse.model import kernels as fused


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as LLaMA and DeepSeek do, then cast back."""

    kernels = "torch"  # or "liger" (model/kernels.py)

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "liger":
            return fused.rms_norm(x, self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm in fp32 with a hand-written backward, bit for bit the gradients autograd gives the composite
    (trained checkpoints must not move): torch has no fused RMSNorm backward on CPU, and autograd replays pow,
    mean, add, rsqrt and two muls through ~15 passes over the rows and their nodes; this makes 8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        x32 = x.float()
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        normed = x32 * rstd
        ctx.save_for_backward(x32, normed, rstd, weight)
        return (normed * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        x32, normed, rstd, weight = ctx.saved_tensors
        grad32 = grad.float()
        grad_weight = (grad32 * normed).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        grad_normed = grad32 * weight.float()
        # x * rstd: rstd's gradient runs back through rsqrt (-rstd^3 / 2), the mean (1 / dim) and the square (2x)
        grad_rstd = (grad_normed * x32).sum(-1, keepdim=True)
        grad_square = (-0.5 * grad_rstd * rstd.pow(3)) / x32.shape[-1]
        grad_x = (grad_normed * rstd).add_(x32 * (2 * grad_square))  # x2 is exact: the same bits as (2 * x) first
        return grad_x.to(grad.dtype), grad_weight.to(weight.dtype) if grad_weight is not None else None, None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction for a context stretched by `scale`."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScalingConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `rotary_dim` channels and the factor to multiply cos/sin by.

    With YaRN, low-frequency channels (wavelength beyond the original context) are interpolated
    by `factor`, high-frequency ones are kept, and a linear ramp blends the two. Llama 3's scaling
    does the same with the ramp set by wavelength: channels that turn fewer than `low_freq_factor`
    times over the original context are interpolated, more than `high_freq_factor` times kept.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.type == "llama3":
        turns = scaling.original_max_seq_len * inv_freq / (2 * math.pi)  # original context / wavelength
        keep = ((turns - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
        return (inv_freq / scaling.factor * (1 - keep) + inv_freq * keep).float(), 1.0
    if scaling.type != "yarn" or scaling.factor <= 1.0:
        return inv_freq.float(), 1.0

    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rotary_dim - 1)
    ramp = (torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    extrapolate_weight = 1.0 - ramp.clamp(0, 1)
    inv_freq = (inv_freq / scaling.factor) * (1 - extrapolate_weight) + inv_freq * extrapolate_weight
    attention_factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return inv_freq.float(), attention_factor


def rope_tables(
    rotary_dim: int, max_len: int, theta: float, scaling: RopeScalingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, rotary_dim), in the half-split (rotate_half) layout."""
    inv_freq, attention_factor = rope_inverse_frequencies(rotary_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., seq, rotary_dim) by position; channel i pairs with i + rotary_dim/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3)... kept in that order: each pair as a complex number times
    e^(i * angle), one op each way. It is `apply_rope` of the de-interleaved channels, re-interleaved, so
    dot products between rows rotated alike equal theirs. `cos`, `sin`: the half-split tables (`rope_tables`),
    whose first half holds one angle per pair."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].float(), sin[..., :half].float()  # tables cast with a bf16 model, too
    x32 = x.float()
    if torch.compiler.is_compiling():  # inductor generates no code for complex ops; it fuses these into one kernel
        even, odd = x32.unflatten(-1, (half, 2)).unbind(-1)
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)
    if x32.storage_offset() % 2 or any(step % 2 for step in x32.stride()[:-1]):
        x32 = x32.contiguous()  # a complex view needs whole pairs at even offsets
    turned = torch.view_as_complex(x32.unflatten(-1, (half, 2))) * torch.complex(cos, sin)
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def apply_rope_pair(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope` on queries and keys; liger's kernel does both at once where all rows share positions."""
    if kernels == "liger" and cos.dim() == 2:
        return fused.rope(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """SwiGLU's silu(gate) * up."""
    return fused.silu_mul(gate, up) if kernels == "liger" else F.silu(gate) * up


class SwiGLU(nn.Module):
    """Gated FFN: down(silu(gate(x)) * up(x))."""

    kernels = "torch"

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), self.kernels))


class MLP(nn.Module):
    """Ungated FFN: down(act(up(x))), act gelu (GPT-2) or relu2 (squared ReLU, Primer / modded-nanogpt)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        h = F.gelu(h, approximate="tanh") if self.activation == "gelu" else F.relu(h).square()
        return self.down_proj(h)


def dense_ffn(config: ModelConfig) -> nn.Module:
    """The dense FFN that `model.ffn_activation` names."""
    if config.ffn_activation == "swiglu":
        return SwiGLU(config.dim, config.ffn_dim)
    return MLP(config.dim, config.ffn_dim, config.ffn_activation)


class Smear(nn.Module):
    """`model.smear`: x_t + scale * sigmoid(gate . rms_norm(x_t)) * x_{t-1} on the token embeddings.

    An induction head (copy what followed the last occurrence of this token) needs each key to know its
    previous token; a 2-layer model must first grow a previous-token head in layer 0 for that, the slow,
    seed-dependent phase of learning to copy. The smear hands layer 0 the previous token directly. The gate is
    read off the current token (a BOS can learn to shut it); `scale` is per channel, so the model can give the
    previous token channels of its own. The gate starts at zero (0.5 after the sigmoid) and `scale` at
    `model.smear_scale`: at 0 the model starts as it would without the smear and `scale` gets a gradient from
    the first step; either way the other weights draw the same initial values.
    With `model.smear=kv` only layer 0's keys and values read the result, with `attn` its queries too; the
    residual stream keeps x_t.
    `model.smear_width` K > 1 adds x_{t-2} .. x_{t-K} the same way, each offset with its own gate and scale
    (`far_gate`, `far_scale`: (K - 1) x dim, kept flat so the optimiser treats them as the vectors they are).
    `flops_per_token` counts its 2 x K x dim parameters as a matmul's (the gates' dot products, the mix).
    """

    def __init__(self, dim: int, scale: float = 0.0, width: int = 1) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.full((dim,), scale))
        if width > 1:
            self.far_gate = nn.Parameter(torch.zeros((width - 1) * dim))
            self.far_scale = nn.Parameter(torch.full(((width - 1) * dim,), scale))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """`x` (batch, seq, dim) the tokens' embeddings, `previous` (batch, seq, width, dim) the embeddings 1 ..
        width positions back (zeros where there is none)."""
        normed = F.rms_norm(x, (x.shape[-1],))
        gate = torch.sigmoid(normed @ self.gate)
        mixed = x + gate.unsqueeze(-1) * self.scale * previous[:, :, 0]
        if not hasattr(self, "far_gate"):
            return mixed
        far_gate, far_scale = self.far_gate.view(-1, x.shape[-1]), self.far_scale.view(-1, x.shape[-1])
        gates = torch.sigmoid(normed @ far_gate.T)
        return mixed + (gates.unsqueeze(-1) * far_scale * previous[:, :, 1:]).sum(2)
