"""How many of a MoE layer's experts a domain's tokens really use (issue 16): the demo's isolated runs lose
bits per byte to `none` even when both learn to copy, and their held-out routing tables show one expert of
each group of 3 idle.

For each checkpoint, training windows are routed as training routes them (train mode, tags given, no
gradient) and, per MoE layer and domain: the effective number of experts the domain's tokens use
(exp of the entropy of their load over the experts), and the router's mean gate row norm (how far the
sigmoid scores are pushed towards 0 or 1: the group loss saturates them). `--alf-steps N` then routes N
more training batches through each checkpoint, applying ALF's bias update after each as training does (no
optimizer step), and prints every MoE layer's load per expert: whether the bias hands a domain's tokens from
one expert to another and back. Quality figures only, so machine load does not matter.

    .venv/bin/python bench/bench_group_collapse.py PREPARED_DIR CHECKPOINT [CHECKPOINT ...] [--windows 64]
        [--alf-steps 8]
"""

import argparse

import torch

from darkhorse import checkpoint as ckpt
from darkhorse.data.prepared import open_prepared
from darkhorse.train.routing import entropy_bits, moe_layers


def effective_experts(load: torch.Tensor) -> float:
    """2 ** entropy of a load vector: 1 when one expert takes every token, n when n share them evenly."""
    return 2 ** entropy_bits(load)


@torch.no_grad()
def report(checkpoint: str, rows: torch.Tensor, tags: torch.Tensor, names: list[str], alf_steps: int, draw) -> None:
    model, config, _ = ckpt.load_model(checkpoint)
    model.train()  # route as training does: tagged tokens inside their group
    caught = {}
    layers = moe_layers(model)
    hooks = [
        layer.gate.register_forward_hook(lambda module, args, out, i=layer.layer_idx: caught.setdefault(i, out))
        for layer in layers
    ]
    routes_by_domain = config.model.moe.domain_routing != "none"
    model(rows, domains=tags if routes_by_domain else None)
    for hook in hooks:
        hook.remove()
    flat = tags.reshape(-1)
    for layer in layers:
        routing = caught[layer.layer_idx]
        n_experts = routing.scores.shape[-1]
        load = torch.zeros(len(names), n_experts)
        load.index_put_((flat, routing.experts[:, 0]), torch.ones(len(flat)), accumulate=True)
        norm = float(layer.gate.weight.norm(dim=1).mean())
        per_domain = ", ".join(f"{name} {effective_experts(load[d]):.1f}" for d, name in enumerate(names))
        print(
            f"{checkpoint} layer {layer.layer_idx}: gate row norm {norm:.2f}; experts used, all tokens "
            f"{effective_experts(load.sum(0)):.1f} of {n_experts}; per domain {per_domain}",
            flush=True,
        )
    for step in range(alf_steps):
        batch, batch_tags = draw(config.train.batch_size)
        for layer in layers:
            layer.load_since_step.zero_()
        model(batch, domains=batch_tags if routes_by_domain else None)
        loads = [layer.load_since_step.int().tolist() for layer in layers]
        for layer in layers:
            layer.after_optimizer_step(step)
        print(f"{checkpoint} ALF step {step}: load per expert, layer by layer {loads}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--windows", type=int, default=64, help="training windows of 128 tokens (default 64)")
    parser.add_argument("--alf-steps", type=int, default=0, help="then this many batches with ALF updates")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = open_prepared(args.prepared)
    tokens, domains = (torch.from_numpy(a.astype("int64")) for a in (data.tokens("train"), data.domains("train")))

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(tokens) - 128, (count,)).tolist()
        return tuple(torch.stack([t[s : s + 128] for s in starts]) for t in (tokens, domains))

    rows, tags = draw(args.windows)
    for checkpoint in args.checkpoints:
        report(checkpoint, rows, tags, data.domain_names, args.alf_steps, draw)


if __name__ == "__main__":
    main()
