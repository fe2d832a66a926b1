"""Fit a group context head (model.moe.group_context) onto a trained domain-isolated checkpoint and compare
held-out routing with it against each token's own scores (how the checkpoint, and its exports, route).

The head reads detached hidden states and the detached own scores, so training it alongside the LM (what
`group_context=true` does) leaves every other weight's training as it was; fitted afterwards onto frozen
weights, as here, it shows what the context feature reaches on a finished run's features without a new
run. Trains on the prepared data's train split with the tags (the group-context loss only, AdamW), then
writes the checkpoint with the head (for bench_domain_posterior.py / `darkhorse eval`) and prints the
held-out report (tags withheld) without and with it. Quality figures only, so machine load does not matter.

    .venv/bin/python bench/bench_group_context.py CHECKPOINT PREPARED_DIR OUT [--steps 300] [--seq-len 128]
"""

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from darkhorse import checkpoint as ckpt
from darkhorse.data.prepared import open_prepared
from darkhorse.model import Transformer
from darkhorse.model.moe import RANKING_ROLES
from darkhorse.train.routing import held_out_isolation, isolation_lines, moe_layers


def with_context_head(checkpoint: str) -> tuple[Transformer, object, dict]:
    """The checkpoint's model rebuilt with model.moe.group_context (the heads zero: routing unchanged)."""
    model, config, meta = ckpt.load_model(checkpoint)
    moe = dataclasses.replace(config.model.moe, group_context=True)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe))
    context = Transformer(config.model)
    missing, unexpected = context.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("group_context.weight") for name in missing), (missing, unexpected)
    return context, config, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prepared")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="training windows and held-out rows")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, config, meta = with_context_head(args.checkpoint)
    data = open_prepared(args.prepared)
    heads = [layer.group_context.weight for layer in moe_layers(model) if layer.group_role in RANKING_ROLES]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for head in heads:
        head.requires_grad_(True)
    optimizer = torch.optim.AdamW(heads, lr=args.lr, weight_decay=0.0)
    tokens = torch.from_numpy(data.tokens("train").astype("int64"))
    domains = torch.from_numpy(data.domains("train").astype("int64"))
    model.train()  # tagged tokens route inside their groups, as in training; the MoE layers keep their losses
    started = time.process_time()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(tokens) - args.seq_len, (args.batch_size,)).tolist()
        batch = torch.stack([tokens[s : s + args.seq_len] for s in starts])
        batch_domains = torch.stack([domains[s : s + args.seq_len] for s in starts])
        model.hidden_states(batch, None, 0, batch_domains)  # MTP modules do not run: their heads stay zero
        losses = [layer.take_losses().get("group_context") for layer in moe_layers(model)]
        loss = sum(term for term in losses if term is not None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            spent = time.process_time() - started
            print(f"step {step}: group-context loss {float(loss.detach()):.4f} ({spent:.0f} s CPU)")
    model.eval()
    tokenizer_file = Path(args.checkpoint) / "tokenizer.json"
    meta = {**meta, "group_context_of": args.checkpoint}
    out = ckpt.save_model_checkpoint(args.out, model, config, tokenizer_file, meta)
    tokenizer = ckpt.load_for_inference(out)[1]
    val, val_domains = (torch.from_numpy(a.astype("int64")) for a in (data.tokens("val"), data.domains("val")))
    for label in ("with the group context", "without it (as exports route)"):
        with torch.inference_mode():
            report = held_out_isolation(model, val, val_domains, args.seq_len, tokenizer.bos_id, data.domain_names)
        print(label + ":\n  " + "\n  ".join(isolation_lines(report)), flush=True)
        with torch.no_grad():
            for head in heads:
                head.zero_()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
