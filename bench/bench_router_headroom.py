"""Headroom of a domain-isolated checkpoint's router (issue 16): how well each token's domain can be read
off the hidden state the router sees, by the router's own linear form refitted, and by unconstrained probes.

Everything but the isolated MoE layers' gate weights is frozen. First the probes, on the first isolated
layer's router input (which no gate changes): a linear softmax over the domains, a 2-layer MLP, and the MLP
given also the causal running mean of the row's inputs (a learned read of the context). Then the gates
themselves are refitted, end to end and with the tags withheld (routing as inference sees it), to the group
loss alone (cross-entropy of the tag against the group scores group-limited routing ranks by), on the train
split. Each read is scored on the held-out documents (read from their start, in rows of `--seq-len`) as the
token's group: the share of tokens right and I(domain; group) as a share of H(domain). The refitted model's
own held-out routing report (I(domain; expert) per layer) and val bits per byte follow, against the
checkpoint's; `--out` saves the refitted checkpoint. Quality figures only, so machine load does not matter.

    .venv/bin/python bench/bench_router_headroom.py CHECKPOINT PREPARED_DIR [--steps 300] [--seq-len 128 256]
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse import checkpoint as ckpt
from darkhorse.data.prepared import open_prepared
from darkhorse.eval.perplexity import score_prepared
from darkhorse.model.moe import group_scores
from darkhorse.train.routing import (
    document_rows,
    entropy_bits,
    held_out_isolation,
    isolation_lines,
    moe_layers,
    mutual_information,
)


def train_windows(tokens: torch.Tensor, domains: torch.Tensor, batch: int, seq_len: int):
    """Random training windows and their tags, as the trainer draws them."""
    starts = torch.randint(0, len(tokens) - seq_len, (batch,)).tolist()
    return (torch.stack([t[s : s + seq_len] for s in starts]) for t in (tokens, domains))


def read_score(predicted: torch.Tensor, domains: torch.Tensor, n_domains: int) -> str:
    """Share of tokens whose predicted domain is theirs, and I(domain; predicted) as a share of H(domain)."""
    confusion = torch.zeros(n_domains, n_domains, dtype=torch.long)
    confusion.index_put_((domains, predicted), torch.ones_like(domains), accumulate=True)
    share = mutual_information(confusion) / entropy_bits(confusion.sum(1))
    return f"{float((predicted == domains).float().mean()):.1%} of tokens, {share:.1%} of H(domain)"


def running_mean(x: torch.Tensor) -> torch.Tensor:
    """[rows, seq, D] -> at each position the mean of the row's inputs so far."""
    seen = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
    return x.cumsum(1) / seen


@torch.no_grad()
def router_inputs(model: nn.Module, layer: nn.Module, rows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """[rows, seq, D] what `layer`'s router reads for each row (tags withheld)."""
    caught = []
    handle = layer.gate.register_forward_pre_hook(lambda module, args: caught.append(args[0].detach().float()))
    try:
        for start in range(0, len(rows), batch):
            model.hidden_states(rows[start : start + batch])
    finally:
        handle.remove()
    return torch.cat(caught).view(rows.shape[0], rows.shape[1], -1)


def fit_probe(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> nn.Module:
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (4096,))
        loss = F.cross_entropy(probe(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


def probes(model, layer, data, args, held_rows, held_domains, real) -> None:
    """Unconstrained reads of the first isolated layer's router input: the ceiling of a better router."""
    n = len(data.domain_names)
    tokens, domains = data_train(data)
    rows, tags = train_windows(tokens, domains, 8 * args.probe_batches, args.seq_len[0])
    train_x, held_x = router_inputs(model, layer, rows), router_inputs(model, layer, held_rows)
    train_ctx = torch.cat([train_x, running_mean(train_x)], -1)
    held_ctx = torch.cat([held_x, running_mean(held_x)], -1)
    tagged = tags < n
    dim = train_x.shape[-1]
    reads = {
        "linear softmax probe": (nn.Linear(dim, n), train_x, held_x),
        "MLP probe (256 hidden)": (nn.Sequential(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, n)), train_x, held_x),
        "MLP probe + causal row mean": (
            nn.Sequential(nn.Linear(2 * dim, 256), nn.GELU(), nn.Linear(256, n)),
            train_ctx,
            held_ctx,
        ),
    }
    for name, (probe, fit_x, test_x) in reads.items():
        fit_probe(probe, fit_x[tagged], tags[tagged], args.probe_steps, 3e-3)
        with torch.no_grad():
            predicted = probe(test_x[real]).argmax(-1)
        print(f"layer {layer.layer_idx} {name}: {read_score(predicted, held_domains[real], n)}", flush=True)


def data_train(data) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(a.astype("int64")) for a in (data.tokens("train"), data.domains("train")))


def own_groups(model, layers, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per isolated layer, [rows, seq] the group each token's own scores rank first (tags withheld)."""
    caught = {layer.layer_idx: [] for layer in layers}
    hooks = [
        layer.gate.register_forward_hook(
            lambda module, args, out, i=layer.layer_idx: caught[i].append(
                group_scores(out.scores + module.e_score_correction_bias, module.moe.n_groups).argmax(-1)
            )
        )
        for layer in layers
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(rows), 16):
                model.hidden_states(rows[start : start + 16])
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(c).view(rows.shape) for i, c in caught.items()}


def refit_gates(model, layers, data, args) -> None:
    """The isolated layers' gate weights fitted to the group loss alone, end to end with the tags withheld."""
    gates = [layer.gate.weight for layer in layers]
    for gate in gates:
        gate.requires_grad_(True)
    optimizer = torch.optim.AdamW(gates, lr=args.lr, weight_decay=0.0)
    scores = {}
    hooks = [
        layer.gate.register_forward_hook(lambda m, a, out, i=layer.layer_idx: scores.__setitem__(i, out.scores))
        for layer in layers
    ]
    tokens, domains = data_train(data)
    started = time.process_time()
    for step in range(1, args.steps + 1):
        batch, tags = train_windows(tokens, domains, 8, args.seq_len[0])
        model.hidden_states(batch)  # no tags: each layer routes by its own scores, as inference does
        flat = tags.reshape(-1)
        tagged = flat < len(data.domain_names)
        loss = sum(
            F.cross_entropy(
                group_scores(scores[layer.layer_idx][tagged], layer.moe.n_groups) / args.temperature, flat[tagged]
            )
            for layer in layers
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            print(
                f"refit step {step}: group loss {float(loss.detach()):.4f} ({time.process_time() - started:.0f} s CPU)"
            )
    for hook in hooks:
        hook.remove()
    for gate in gates:
        gate.requires_grad_(False)


def report(label: str, model, tokenizer, data, args) -> None:
    with torch.inference_mode():
        score = score_prepared(model, tokenizer, data, "val")
    by_domain = ", ".join(f"{k} {v.to_dict()['bits_per_byte']:.3f}" for k, v in score.by_domain.items())
    print(f"{label}: val bpb {score.overall.to_dict()['bits_per_byte']:.4f} ({by_domain})")
    tokens, domains = (torch.from_numpy(a.astype("int64")) for a in (data.tokens("val"), data.domains("val")))
    for seq_len in args.seq_len:
        lines = isolation_lines(
            held_out_isolation(model, tokens, domains, seq_len, tokenizer.bos_id, data.domain_names)
        )
        print("\n".join(f"  rows of {seq_len}: {line}" for line in lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prepared")
    parser.add_argument("--steps", type=int, default=300, help="gate refit steps (8 windows each)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0, help="of the group scores in the refit's loss")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 256], help="windows, then held-out rows")
    parser.add_argument("--probe-batches", type=int, default=200, help="8 train windows each")
    parser.add_argument("--probe-steps", type=int, default=1500)
    parser.add_argument("--out", help="save the refitted checkpoint here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, config, meta = ckpt.load_model(args.checkpoint)
    tokenizer = ckpt.load_for_inference(args.checkpoint)[1]
    data = open_prepared(args.prepared)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # the trunk's isolated layers (an MTP module's MoE does not run when reading text)
    trunk = {id(module) for module in model.layers.modules()}
    layers = [
        layer
        for layer in moe_layers(model)
        if id(layer) in trunk and layer.moe.domain_routing == "isolated" and layer.routes_by_domain()
    ]
    if not layers:
        raise SystemExit(f"{args.checkpoint} has no isolated MoE layer")
    model.eval()
    n = len(data.domain_names)
    val, val_domains = (
        torch.from_numpy(a.astype("int64")[: 1 << 16]) for a in (data.tokens("val"), data.domains("val"))
    )
    starts = val == tokenizer.bos_id
    starts[0] = True
    held_rows, held_domains, real = document_rows(val, val_domains, starts, args.seq_len[0])
    real &= held_domains < n
    probes(model, layers[0], data, args, held_rows, held_domains, real)
    before = own_groups(model, layers, held_rows)
    report("checkpoint", model, tokenizer, data, args)
    refit_gates(model, layers, data, args)
    after = own_groups(model, layers, held_rows)
    for layer in layers:
        for label, groups in (("own scores", before), ("refitted gate", after)):
            score = read_score(groups[layer.layer_idx][real], held_domains[real], n)
            print(f"layer {layer.layer_idx} {label}, rows of {args.seq_len[0]}: {score}")
    report("refitted gates", model, tokenizer, data, args)
    if args.out:
        tokenizer_file = Path(args.checkpoint) / "tokenizer.json"
        out = ckpt.save_model_checkpoint(
            args.out, model, config, tokenizer_file, {**meta, "gates_refit_of": args.checkpoint}
        )
        print(f"saved {out}")


if __name__ == "__main__":
    main()
