"""The causal domain posterior (model.moe.domain_posterior) of an isolated MoE checkpoint against each token's
own group scores (weight 0, how exported HF/GGUF models route): held-out routing with the tags withheld (per
MoE layer: share of H(domain), group accuracy per token and per document; with --slide also in rows that
slide by half a row, so that no token past a document's first row loses its context to a row restart) and
val bits per byte, each weight's bpb as a ratio to weight 0. A checkpoint trained with
model.moe.group_context is measured with it, then once more without it (its weights zeroed: how exports
route). Quality figures only, so machine load does not matter.

    .venv/bin/python bench/bench_domain_posterior.py CHECKPOINT PREPARED_DIR [--weights 0,0.5,1] \
        [--seq-len 128 256] [--slide]
"""

import argparse

import torch

from darkhorse.checkpoint import load_for_inference
from darkhorse.data.prepared import open_prepared
from darkhorse.eval.perplexity import score_prepared
from darkhorse.train.routing import held_out_isolation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prepared")
    parser.add_argument("--weights", default="0,0.5,1", help="domain_posterior weights (default 0,0.5,1)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 256], help="held-out row lengths")
    parser.add_argument(
        "--slide", action="store_true", help="also read each row length sliding by half a row (no restart every row)"
    )
    args = parser.parse_args()
    model, tokenizer, _ = load_for_inference(args.checkpoint)
    data = open_prepared(args.prepared)
    tokens = torch.from_numpy(data.tokens("val").astype("int64"))
    domains = torch.from_numpy(data.domains("val").astype("int64"))
    base = None
    settings = [(float(w), "") for w in args.weights.split(",")]
    if model.config.moe.group_context:
        settings.append((0.0, ", group context off (as exports route)"))
    for weight, label in settings:
        if label:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name.endswith("group_context.weight"):
                        parameter.zero_()
        model.config.moe.domain_posterior = weight  # every MoE layer shares this config
        with torch.inference_mode():
            score = score_prepared(model, tokenizer, data, "val")
            bpb = score.overall.to_dict()["bits_per_byte"]
            base = base or bpb
            by_domain = ", ".join(f"{k} {v.to_dict()['bits_per_byte']:.3f}" for k, v in score.by_domain.items())
            print(f"domain_posterior {weight:g}{label}: val bpb {bpb:.4f} ({bpb / base:.4f}x weight 0; {by_domain})")
            readings = [(seq_len, None) for seq_len in args.seq_len]
            readings += [(seq_len, seq_len // 2) for seq_len in args.seq_len if args.slide]
            for seq_len, stride in readings:
                report = held_out_isolation(
                    model, tokens, domains, seq_len, tokenizer.bos_id, data.domain_names, stride=stride
                )
                sliding = f" sliding by {stride}" if stride else ""
                for row in report["layers"]:
                    print(
                        f"  rows of {seq_len}{sliding}, layer {row['layer']}: "
                        f"{row['share_of_domain_entropy']:.1%} of H(domain), "
                        f"group accuracy {row.get('token_group_accuracy', 0):.1%} of tokens, "
                        f"{row.get('document_group_accuracy', 0):.1%} of {row.get('documents', 0)} documents",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
