"""Run a darkhorse command as a CPU with native bf16 matmuls (AMX, AVX512-BF16) would train it, on a CPU
without them: Muon's Newton-Schulz iteration (darkhorse's own, in fp32) has every operation's result rounded
to bf16, as the bf16 iteration's are, but its products are fp32 matmuls (a real bf16 matmul is emulated at ~9x
the demo's step on an AVX2 CPU).

Where `train.muon_precision=auto` picks fp32 (no native bf16), this is how the bf16 machines' demo seeds are
measured here. The rounding order inside a product differs from oneDNN's, so it is a proxy: `--check` prints
how far it lands from the real bf16 iteration against how far fp32 lands, on random matrices of each of
genesis-demo's hidden shapes, and fails unless it is closer for every one.

    .venv/bin/python bench/bf16_newton_schulz.py --check
    OMP_NUM_THREADS=1 .venv/bin/python bench/bf16_newton_schulz.py demo --minutes 1 --seed 2 --out /tmp/bf/p2
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.train import optim

darkhorse_orthogonalise = optim.orthogonalise  # before `main` swaps it out


class Bf16Rounding(TorchFunctionMode):
    """Every fp32 tensor a torch function returns, rounded to bf16: fp32 arithmetic on bf16 values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.dtype == torch.float32:
            return result.to(torch.bfloat16).float()  # the mode is off inside its own handler
        return result


def orthogonalise_rounded(
    update: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`optim.orthogonalise` in fp32 with each result rounded to bf16 (`dtype` is ignored: the machine's pick)."""
    with Bf16Rounding():
        return darkhorse_orthogonalise(update, coefficients, steps, eps, torch.float32)


def check() -> int:
    torch.manual_seed(0)
    hidden = optim.split_parameters(Transformer(load_run_config("genesis-demo").model))[0]
    closer = True
    for shape in sorted({tuple(param.shape) for param in hidden}):
        update = torch.randn(*shape)
        args = optim.NS_COEFFICIENTS, 5, 1e-7
        real = darkhorse_orthogonalise(update, *args, torch.bfloat16).float()
        fp32 = darkhorse_orthogonalise(update, *args, torch.float32)
        proxy = orthogonalise_rounded(update, *args)
        proxy_gap, fp32_gap = ((result - real).norm() / real.norm() for result in (proxy, fp32))
        closer = closer and proxy_gap < fp32_gap
        print(f"{str(list(shape)):>14}: proxy {proxy_gap:.4f} from bf16, fp32 {fp32_gap:.4f} (relative Frobenius)")
    return 0 if closer else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    optim.orthogonalise = orthogonalise_rounded
    from darkhorse.cli import main

    sys.exit(main(sys.argv[1:]))
