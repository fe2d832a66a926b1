"""The model's memory-bound math in two implementations, chosen by `train.kernels`: plain torch
(every device), or liger-kernel's fused Triton kernels (CUDA only).

liger is imported inside the functions, never at module level: the CPU install neither has nor needs
it. Modules that can use it keep a `kernels` attribute ("torch" by default) that `use_kernels` sets.

The output head's loss has a torch fast path too, `linear_cross_entropy`: the head and the
cross-entropy over chunks of tokens, so the [tokens, vocab] logits and their fp32 upcast never exist
whole (liger's fused kernel does the same in Triton).
"""

from __future__ import annotations

import torch
from torch import nn

from darkhorse.errors import DarkhorseError

IGNORE_INDEX = -100  # targets the loss skips (masked tokens)
CHUNK_VALUES = 2**24  # logits per chunk of `linear_cross_entropy` (64 MiB in fp32): 256 tokens at 65K vocab


def liger_available() -> str | None:
    """None when liger-kernel imports, else why not."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as error:  # ImportError, or triton failing to load
        return f"{type(error).__name__}: {error}"
    return None


def resolve_kernels(name: str, device: torch.device) -> str:
    """`train.kernels` for this device: auto is liger on CUDA when it imports, else torch."""
    if name == "torch":
        return "torch"
    if device.type != "cuda":
        if name == "liger":
            raise DarkhorseError(f"train.kernels=liger needs CUDA (this run: {device.type}); use auto or torch")
        return "torch"
    missing = liger_available()
    if missing and name == "liger":
        raise DarkhorseError(f"train.kernels=liger needs liger-kernel (pip install liger-kernel): {missing}")
    return "torch" if missing else "liger"


def use_kernels(model: nn.Module, name: str) -> None:
    """Point every module of `model` that has a choice at `name` ("torch" or "liger")."""
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = name


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """liger's RMSNorm with our casting (rms, scale and weight in fp32, one cast back: its "gemma" mode)."""
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="gemma", in_place=False)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """liger's half-split RoPE of q (batch, heads, seq, dim) and k (batch, kv_heads, seq, dim) at shared
    positions (`cos`, `sin`: (seq, dim)). It rotates contiguous inputs in place."""
    from liger_kernel.transformers.functional import liger_rope

    return liger_rope(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """liger's fused silu(gate) * up."""
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu(gate, up)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0, kernels: str = "torch"
) -> torch.Tensor:
    """Sum over the counted targets of cross_entropy(hidden @ weight.T, soft-capped), without the whole logits.

    `hidden` (..., D), `targets` (...) with IGNORE_INDEX where masked, `weight` [V, D]. Under autocast
    the matmuls run in its dtype, as the plain head would; the softmax is always fp32.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    # On CPU only the counted rows: a loss mask (chat data) leaves about half of them out, whose logits,
    # softmax and gradient matmuls would all be multiplied by zero. Not on an accelerator, where the count
    # would stall the launch queue on the host (not measured there), nor in compiled graphs (a data-dependent
    # shape).
    if hidden.device.type == "cpu" and not torch.compiler.is_compiling():
        counted = targets.ne(IGNORE_INDEX)
        if not bool(counted.all()):
            rows = counted.nonzero().squeeze(1)
            hidden, targets = hidden.index_select(0, rows), targets[rows]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if kernels == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap or None
        )
    chunk = max(1, CHUNK_VALUES // weight.shape[0])
    if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad: detached, the gradients are skipped
        hidden, weight = hidden.detach(), weight.detach()
    with torch.autocast(device, enabled=False):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The head + cross-entropy a chunk of tokens at a time. The gradients are computed in the forward
    (each chunk's logits are freed at once, never kept for backward), as liger does: a training step
    backpropagates the loss anyway, and a call without grad skips them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float, chunk: int):  # noqa: ANN001
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            rows, row_targets = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (rows @ weight.t()).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            counted = row_targets.ne(IGNORE_INDEX)
            picked_ids = torch.where(counted, row_targets, 0).unsqueeze(1)
            log_norm = logits.logsumexp(-1, keepdim=True)
            losses = log_norm.squeeze(1) - logits.gather(1, picked_ids).squeeze(1)
            total = total + torch.where(counted, losses, 0.0).sum()
            if not (want_hidden or want_weight):
                continue
            grad = logits.sub_(log_norm).exp_()  # softmax, in the logits' memory
            grad.scatter_add_(1, picked_ids, torch.full_like(picked_ids, -1, dtype=grad.dtype))
            grad.mul_(counted.unsqueeze(1))
            if softcap:
                grad.mul_(1 - capped.square())
            grad = grad.to(rows.dtype)
            if want_hidden:
                grad_hidden[start : start + chunk] = grad @ weight
            if want_weight:
                grad_weight += grad.t() @ rows
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if want_weight else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total if grad_hidden is not None else None,
            grad_weight * grad_total if grad_weight is not None else None,
            None,
            None,
            None,
        )
