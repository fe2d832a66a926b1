"""One rank of the expert-parallel check, started by torchrun: `ep_worker.py` (exits 1 on a mismatch).

Every rank builds the same MoE layer and batch (same seed). The reference runs the whole batch
through the whole layer in this process; the expert-parallel layer runs this rank's half of the
batch with this rank's half of the experts, tokens crossing ranks by all-to-all. Outputs, input
gradients and this rank's expert gradients must equal the reference's.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import torch
import torch.distributed as dist

from darkhorse.config import ModelConfig, MoEConfig
from darkhorse.model.moe import MoE
from darkhorse.train.expert_parallel import apply_expert_parallel, full_expert_tensor


def main() -> int:
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # test_torchrun's run_ranks() asks for stacks on a hang
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    moe = MoEConfig(n_routed_experts=8, experts_per_token=2, moe_intermediate_size=32, first_k_dense=0)
    config = ModelConfig(dim=64, n_heads=4, n_kv_heads=4, ffn="moe", moe=moe)
    torch.manual_seed(0)
    whole = MoE(config, 0).train()
    x = torch.randn(2 * size, 16, 64, requires_grad=True)
    weights = torch.randn(2 * size, 16, 64)
    reference = whole(x)
    (reference * weights).sum().backward()

    torch.manual_seed(0)
    layer = MoE(config, 0).train()
    apply_expert_parallel(layer, rank, size)
    rows, local = slice(2 * rank, 2 * rank + 2), 8 // size
    mine = x.detach()[rows].clone().requires_grad_()
    out = layer(mine)
    (out * weights[rows]).sum().backward()
    checks = {
        "output": torch.allclose(out, reference[rows], atol=1e-5),
        "input grad": torch.allclose(mine.grad, x.grad[rows], atol=1e-5),
        "gathered weights": torch.equal(
            full_expert_tensor(layer.experts.up_proj.detach(), size), whole.experts.up_proj
        ),
    }
    for name in ("gate_proj", "up_proj", "down_proj"):  # this rank's experts saw every rank's tokens
        want = getattr(whole.experts, name).grad[rank * local : (rank + 1) * local]
        checks[f"{name} grad"] = torch.allclose(getattr(layer.experts, name).grad, want, atol=1e-5)
    dist.destroy_process_group()
    failed = [name for name, ok in checks.items() if not ok]
    print(f"rank {rank}: {'mismatch in ' + ', '.join(failed) if failed else 'equal'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
