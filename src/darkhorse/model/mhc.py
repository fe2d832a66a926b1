"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880), `model.residual: mhc`.

The residual stream is widened to n = `mhc.expansion` copies. Around each sublayer F (attention,
FFN) a `HyperConnection` computes, from the RMS-normalised flattened streams x (n*D values):

    pre  = sigmoid(a_pre  * x W_pre  + b_pre)        [n]    how much of each stream F reads
    post = 2 sigmoid(a_post * x W_post + b_post)     [n]    how much of F's output each stream gets
    res  = SinkhornKnopp(a_res * x W_res + b_res)    [n, n] doubly-stochastic stream mixing
    streams' = res @ streams + post^T F(pre @ streams)

A doubly-stochastic `res` keeps the residual path norm-preserving (products of such matrices stay
doubly stochastic). The biases start at pre = 1/n, post = 1, res ~ identity, so a fresh model
behaves like the plain pre-norm residual. Engines (HF DeepseekV3/Llama, llama.cpp) have no such
connections: exporters check `config.residual == "mhc"` and refuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.config import ModelConfig

IDENTITY_LOGIT = 4.0  # diagonal logit of the initial mixing matrix: ~0.95 on the diagonal for n = 4


def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """Project [..., n, n] logits onto (approximately) doubly-stochastic matrices: exp, then alternate
    row and column normalisation; columns sum to 1 exactly after the last step, rows to ~1."""
    matrix = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        matrix = matrix / (matrix.sum(dim=-1, keepdim=True) + eps)
        matrix = matrix / (matrix.sum(dim=-2, keepdim=True) + eps)
    return matrix


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(batch, seq, D) -> (batch, seq, n, D): every stream starts as a copy of the input."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def merge_streams(streams: torch.Tensor) -> torch.Tensor:
    """Sum of the streams (the final RMSNorm follows, so sum and mean are the same up to scale)."""
    return streams.sum(dim=-2)


class HyperConnection(nn.Module):
    """Dynamic pre/post/residual weights around one sublayer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = self.n = config.mhc.expansion
        self.sinkhorn_iters = config.mhc.sinkhorn_iters
        self.eps = config.norm_eps
        self.proj = nn.Parameter(torch.randn((2 + n) * n, n * config.dim) * config.init_std)
        pre_logit = math.log(1 / (n - 1)) if n > 1 else 6.0  # sigmoid -> 1/n (or ~1 for one stream)
        res_bias = torch.full((n, n), 0.0).fill_diagonal_(IDENTITY_LOGIT).flatten()
        self.bias = nn.Parameter(torch.cat([torch.full((n,), pre_logit), torch.zeros(n), res_bias]))
        self.scale = nn.Parameter(torch.full((3,), 0.01))  # small: start close to the static biases

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre [.., n], post [.., n], res [.., n, n]) for streams (batch, seq, n, D)."""
        n = self.n
        flat = F.rms_norm(streams.flatten(-2).float(), (streams.shape[-2] * streams.shape[-1],), eps=self.eps)
        mix = F.linear(flat, self.proj.float())
        scale = torch.repeat_interleave(self.scale, torch.tensor([n, n, n * n], device=self.scale.device))
        pre, post, res = (mix * scale + self.bias).split([n, n, n * n], dim=-1)
        return pre.sigmoid(), 2 * post.sigmoid(), sinkhorn_knopp(res.unflatten(-1, (n, n)), self.sinkhorn_iters)

    def forward(self, streams: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        pre, post, res = self.coefficients(streams)
        dtype = streams.dtype
        out = sublayer(torch.einsum("bsn,bsnd->bsd", pre.to(dtype), streams))
        mixed = torch.einsum("bsij,bsjd->bsid", res.to(dtype), streams)
        return mixed + post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2)
