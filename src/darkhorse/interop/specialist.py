"""A specialist cut out of a domain-isolated MoE (model.moe.domain_routing=isolated): the shared experts
and the chosen domains' expert groups, with the router restricted to them (its rows and ALF biases of
the kept experts only). At inference the full model already routes each token inside one group, so the
specialist computes what the full model does on tokens whose group it keeps."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from darkhorse import checkpoint as ckpt
from darkhorse.errors import DarkhorseError

EXPERT_TENSOR = re.compile(r"\.ffn\.(gate\.weight|gate\.e_score_correction_bias|experts\.(gate|up|down)_proj)$")


def cut_specialist(checkpoint: str | Path, domains: list[str], out: str | Path) -> Path:
    """Write to `out` a checkpoint keeping `domains`' expert groups of the isolated `checkpoint`."""
    from darkhorse.model import Transformer
    from darkhorse.model.moe import expert_domains

    model, config, meta = ckpt.load_model(checkpoint)
    moe = config.model.moe
    names = meta.get("domains") or []
    if moe.domain_routing != "isolated" or not names:
        raise DarkhorseError(f"{checkpoint} has no domain expert groups (train with model.moe.domain_routing=isolated)")
    if moe.isolated_from_layer > moe.first_k_dense:
        raise DarkhorseError(
            f"{checkpoint} routes its MoE layers before layer {moe.isolated_from_layer} freely "
            "(model.moe.isolated_from_layer): no specialist can be cut from them"
        )
    unknown = [name for name in domains if name not in names]
    if unknown or not domains:
        raise DarkhorseError(f"--domains {','.join(unknown)}: {checkpoint} has the domains {', '.join(names)}")
    kept = sorted({names.index(name) for name in domains})
    owner = expert_domains(moe)
    experts = torch.cat([(owner == d).nonzero().view(-1) for d in kept])
    counts = moe.domain_expert_counts()
    small_moe = dataclasses.replace(
        moe,
        n_routed_experts=len(experts),
        n_domains=len(kept),
        domain_experts=[counts[d] for d in kept] if moe.domain_experts else [],
        n_groups=len(experts) // (moe.n_routed_experts // moe.n_groups),  # the full model's groups, kept whole
        topk_groups=1,
    )
    small = dataclasses.replace(config, model=dataclasses.replace(config.model, moe=small_moe))
    state = {
        key: value.index_select(0, experts) if EXPERT_TENSOR.search(key) else value
        for key, value in model.state_dict().items()
    }
    for key in [key for key in state if key.endswith(".ffn.group_context.weight")]:  # one row per group
        state[key] = state[key].index_select(0, torch.tensor(kept))
    specialist = Transformer(small.model)
    specialist.load_state_dict(state)
    tokenizer = Path(checkpoint) / "tokenizer.json"
    meta = {**meta, "config": small.to_dict(), "domains": [names[d] for d in kept], "specialist_of": str(checkpoint)}
    return ckpt.save_model_checkpoint(out, specialist, small, tokenizer if tokenizer.exists() else None, meta)
