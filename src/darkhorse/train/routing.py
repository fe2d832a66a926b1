"""Routing statistics of MoE models: which experts each layer's router picks, per domain.

A `RoutingCounter` observes a model from outside, through forward hooks: one on the model that
reads the call's per-token `domains`, one on every MoE router whose output is the routing
decision. It counts slots per expert (utilization) and, for forwards given domain ids, a
domain x expert matrix per layer. From those counts come I(domain; expert) in bits (0 when routing
ignores the domain, at most log2(n_domains)) and the JSON report; train/reports.py draws them.
The trainer counts its training forwards; `route_windows` counts a model reading a token stream.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from darkhorse.config import MAX_DOMAINS, MoEConfig
from darkhorse.model.moe import MoE, Routing


def moe_layers(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def mutual_information(counts: torch.Tensor) -> float:
    """I(D; E) in bits from a [domains, experts] count matrix (rows/columns of zeros ignored)."""
    joint = counts.double() / counts.sum().clamp(min=1)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    cells = joint > 0
    return float((joint[cells] * (joint[cells] / outer[cells]).log2()).sum())


def isolated_partition(moe: MoEConfig, domain_names: list[str]) -> str:
    """One line saying which routed experts each domain's group holds (domain_routing=isolated)."""
    size = moe.n_routed_experts // moe.n_groups
    counts = moe.domain_expert_counts()
    names = [domain_names[d] if d < len(domain_names) else f"domain {d}" for d in range(len(counts))]
    firsts = [sum(counts[:d]) for d in range(len(counts))]
    spans = [f"{first}-{first + n - 1}" if n > 1 else str(first) for first, n in zip(firsts, counts, strict=True)]
    groups = ", ".join(f"{name} {span}" for name, span in zip(names, spans, strict=True))
    shared = f" + {moe.n_shared_experts} shared for every token" if moe.n_shared_experts else ""
    free = f"; MoE layers before layer {moe.isolated_from_layer} route freely" if moe.isolated_from_layer else ""
    return (
        f"isolated routing: {moe.n_routed_experts} routed experts in {moe.n_groups} groups of {size} "
        f"(experts {groups}){shared}; untagged tokens route freely{free}"
    )


class RoutingCounter:
    """Counts the experts the MoE routers of `model` choose: per layer, slots per expert (`load`)
    and a [MAX_DOMAINS, experts] domain x expert matrix (`domain_counts`, from forwards that are
    given `domains`). `training_only` skips forwards in eval mode (evaluation, sampling).

    Under gradient checkpointing the recompute in backward routes again, so every count doubles
    (shares and mutual information unchanged). `remove()` detaches the hooks."""

    def __init__(self, model: nn.Module, *, training_only: bool = False, record_groups: bool = False) -> None:
        self.training_only = training_only
        self.layers = moe_layers(model)
        self.load: dict[int, torch.Tensor] = {}
        self.domain_counts: dict[int, torch.Tensor] = {}
        # record_groups: per layer, the first expert of each full-sequence call's tokens ([batch, seq] per call)
        self.token_experts: dict[int, list[torch.Tensor]] | None = (
            {layer.layer_idx: [] for layer in self.layers} if record_groups else None
        )
        self._domains: torch.Tensor | None = None
        self._handles = []
        if not self.layers:
            return
        self._handles.append(model.register_forward_pre_hook(self._read_domains, with_kwargs=True))
        for layer in self.layers:
            n_experts, device = layer.moe.n_routed_experts, layer.gate.weight.device
            self.load[layer.layer_idx] = torch.zeros(n_experts, dtype=torch.int64, device=device)
            self.domain_counts[layer.layer_idx] = torch.zeros(MAX_DOMAINS, n_experts, dtype=torch.int64, device=device)
            self._handles.append(layer.gate.register_forward_hook(partial(self._count, layer.layer_idx)))

    def _read_domains(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._domains = kwargs.get("domains")

    @torch.no_grad()
    def _count(self, layer_idx: int, router: nn.Module, args: tuple, routing: Routing) -> None:
        if self.training_only and not router.training:
            return
        experts = routing.experts.reshape(-1)
        ones = torch.ones_like(experts)
        self.load[layer_idx].index_add_(0, experts, ones)  # index_add_, not bincount: no host sync on a GPU
        if self._domains is None:
            return
        # an MTP module at depth k routes the last seq - k positions of every row
        batch, seq = self._domains.shape
        routed = routing.experts.shape[0] // batch
        if self.token_experts is not None and routed == seq:
            self.token_experts[layer_idx].append(routing.experts[:, 0].view(batch, seq).cpu())
        rows = self._domains[:, seq - routed :].reshape(-1, 1).long().expand_as(routing.experts).reshape(-1)
        counts = self.domain_counts[layer_idx]
        counts.view(-1).index_add_(0, rows * counts.shape[1] + experts, ones)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def utilization(self) -> tuple[list[int], torch.Tensor]:
        """(layer ids, [layers, experts] share of each layer's routed slots)."""
        if not self.load:
            return [], torch.zeros(0, 0)
        loads = torch.stack([load.cpu() for load in self.load.values()]).double()
        return list(self.load), loads / loads.sum(-1, keepdim=True).clamp(min=1)

    def mutual_information_by_layer(self) -> dict[int, float]:
        """I(domain; expert) in bits per MoE layer that saw domain-tagged tokens."""
        return {
            layer: mutual_information(counts.cpu()) for layer, counts in self.domain_counts.items() if counts.sum() > 0
        }

    def domain_report(self, domain_names: list[str] | None = None) -> dict[str, Any]:
        """JSON-ready domain x expert counts and mutual information per MoE layer (domains seen only)."""
        if not self.domain_counts:
            return {"domains": [], "layers": []}
        all_counts = {layer: counts.cpu() for layer, counts in self.domain_counts.items()}
        seen = torch.stack(list(all_counts.values())).sum((0, 2)).nonzero().flatten().tolist()
        names = [domain_names[d] if domain_names and d < len(domain_names) else f"domain {d}" for d in seen]
        layers = []
        for layer, counts in all_counts.items():
            rows = counts[seen]
            layers.append(
                {"layer": layer, "mutual_information_bits": mutual_information(rows), "counts": rows.tolist()}
            )
        return {"domains": names, "domain_ids": seen, "layers": layers}


def route_windows(
    model: nn.Module,
    tokens: torch.Tensor,
    domains: torch.Tensor,
    seq_len: int,
    batch_size: int = 16,
    record_groups: bool = False,
) -> RoutingCounter:
    """Routing counts of `model` in eval mode (tags steer nothing: routing as inference sees it)
    reading the 1-D `tokens`, whose per-token domain ids are `domains`, in windows of `seq_len`."""
    usable = (len(tokens) // seq_len) * seq_len
    windows, window_domains = tokens[:usable].view(-1, seq_len), domains[:usable].view(-1, seq_len)
    return route_rows(model, windows, window_domains, batch_size, record_groups)


@torch.no_grad()
def route_rows(
    model: nn.Module,
    windows: torch.Tensor,
    window_domains: torch.Tensor,
    batch_size: int = 16,
    record_groups: bool = False,
) -> RoutingCounter:
    """`route_windows` over ready [N, seq] rows of tokens and their domain ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = RoutingCounter(model, record_groups=record_groups)
    try:
        for start in range(0, len(windows), batch_size):
            rows = slice(start, start + batch_size)
            model(windows[rows].long().to(device), domains=window_domains[rows].to(device))
    finally:
        counter.remove()
        model.train(was_training)
    return counter


def document_rows(
    tokens: torch.Tensor, domains: torch.Tensor, starts: torch.Tensor, seq_len: int, stride: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each document (a new one at each True of `starts`) cut into rows of `seq_len` from its start, as
    inference reads a prompt: (tokens, domains, real) [N, seq_len], the end of each document's last row
    padded with token 0 of an untagged domain (after the real tokens, so it changes nothing they see).

    With a `stride` < seq_len the rows slide: each starts `stride` tokens after the one before, so a token
    past the document's first row is read with at least seq_len - stride tokens of its document before it
    (no restart every row). Each token counts once, in the first row that holds it: the tokens a row only
    repeats are context, untagged and not `real`."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride {stride} must be between 1 and seq_len {seq_len}")
    bounds = [*starts.nonzero().flatten().tolist(), len(tokens)]
    pieces = []  # (row start, row end, first token the row counts)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        pieces.append((start, min(start + seq_len, end), start))
        while pieces[-1][1] < end:
            row_start = pieces[-1][0] + stride
            pieces.append((row_start, min(row_start + seq_len, end), pieces[-1][1]))
    rows = torch.zeros(len(pieces), seq_len, dtype=torch.long)
    row_domains = torch.full((len(pieces), seq_len), MAX_DOMAINS - 1, dtype=torch.long)
    real = torch.zeros(len(pieces), seq_len, dtype=torch.bool)
    for row, (start, end, counted) in enumerate(pieces):
        rows[row, : end - start] = tokens[start:end]
        row_domains[row, counted - start : end - start] = domains[counted:end]
        real[row, counted - start : end - start] = True
    return rows, row_domains, real


def entropy_bits(counts: torch.Tensor) -> float:
    p = counts.double()[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def held_out_isolation(
    model: nn.Module,
    tokens: torch.Tensor,
    domains: torch.Tensor,
    seq_len: int,
    bos_id: int | None,
    domain_names: list[str],
    max_tokens: int = 1 << 16,
    stride: int | None = None,
) -> dict[str, Any]:
    """How much routing knows the domain on held-out text with the tags withheld, per MoE layer:
    I(domain; expert), the share of H(domain) it reaches, and the share of tokens and of documents
    (split at `bos_id`; else at domain changes) whose expert group is their domain's (a document's
    group: the one most of its tokens pick). Each document is read on its own from its start, in rows of
    `seq_len`, as inference reads a prompt; with a `stride` the rows slide (`document_rows`). Reads at most
    `max_tokens` tokens."""
    usable = min(len(tokens), max_tokens)
    tokens, domains = tokens[:usable], domains[:usable].long()
    if not usable:  # no held-out text (e.g. a fine-tune's tiny val split): nothing to route
        return {"domains": domain_names, "tokens": 0, "tags": "withheld", "layers": []}
    starts = tokens == bos_id if bos_id is not None else torch.ones_like(domains, dtype=torch.bool)
    if bos_id is None:
        starts[1:] = domains[1:] != domains[:-1]
    starts[0] = True
    rows, row_domains, real = document_rows(tokens, domains, starts, seq_len, stride)
    counter = route_rows(model, rows, row_domains, record_groups=True)
    layers = []
    for layer in counter.layers:
        counts = counter.domain_counts[layer.layer_idx][: len(domain_names)].cpu()
        if counts.sum() == 0:  # e.g. an MTP block, which plain reading does not run
            continue
        h_domain = entropy_bits(counts.sum(1))
        mi = mutual_information(counts)
        row = {"layer": layer.layer_idx, "mutual_information_bits": mi, "domain_entropy_bits": h_domain}
        row["share_of_domain_entropy"] = mi / h_domain if h_domain > 0 else 0.0
        # an isolated layer's groups are domains (not a specialist's, nor a free layer's before isolated_from_layer)
        if (
            layer.moe.domain_routing == "isolated"
            and layer.routes_by_domain()
            and layer.moe.n_domains == len(domain_names)
        ):
            groups = layer.expert_domain[torch.cat(counter.token_experts[layer.layer_idx])[real]]
            row.update(group_accuracy(groups, domains, starts, layer.moe.n_domains))
        layers.append(row)
    moe = counter.layers[0].moe if counter.layers else None
    report = {
        "domains": domain_names,
        "tokens": usable,
        "tags": "withheld",
        "domain_posterior": moe.domain_posterior if moe else 0.0,
        "group_context": bool(moe and moe.group_context),
        "rows": seq_len,
        "stride": stride or seq_len,
    }
    return {**report, "layers": layers}


def group_accuracy(groups: torch.Tensor, domains: torch.Tensor, starts: torch.Tensor, n_groups: int) -> dict[str, Any]:
    """Per token, whether its expert group is its domain's (`groups`: the domain owning each token's
    group); per document (a new one at each True of `starts`), whether the group most of its tokens pick
    is. Tokens tagged >= n_groups are left out."""
    starts = starts.clone()
    starts[0] = True
    document = starts.long().cumsum(0) - 1
    tagged = domains < n_groups
    groups, domains, document = groups[tagged], domains[tagged], document[tagged]
    votes = torch.zeros(int(document.max()) + 1 if len(document) else 0, n_groups, dtype=torch.long)
    votes.index_put_((document, groups), torch.ones_like(groups), accumulate=True)
    seen = votes.sum(1) > 0
    document_domain = torch.zeros(len(votes), dtype=torch.long).scatter_(0, document, domains)
    return {
        "token_group_accuracy": float((groups == domains).float().mean()) if len(groups) else 0.0,
        "document_group_accuracy": float((votes.argmax(1) == document_domain)[seen].float().mean())
        if bool(seen.any())
        else 0.0,
        "documents": int(seen.sum()),
    }


def isolation_lines(report: dict[str, Any]) -> list[str]:
    """`held_out_isolation`'s report as one line per layer."""
    lines = []
    for row in report["layers"]:
        posterior = f", domain posterior {report['domain_posterior']:g}" if report.get("domain_posterior") else ""
        context = ", group context" if report.get("group_context") else ""
        if report.get("stride", report.get("rows")) != report.get("rows"):
            context += f", rows of {report['rows']} sliding by {report['stride']}"
        line = (
            f"held-out routing, tags withheld{context}{posterior}, layer {row['layer']}: I(domain; expert) = "
            f"{row['mutual_information_bits']:.2f} bits, {row['share_of_domain_entropy']:.0%} of H(domain)"
        )
        if "token_group_accuracy" in row:
            line += (
                f"; group predicted for {row['token_group_accuracy']:.0%} of tokens, "
                f"{row['document_group_accuracy']:.0%} of {row['documents']} documents"
            )
        lines.append(line)
    return lines


def routing_drift(
    layer_ids: list[int], before: torch.Tensor, after: torch.Tensor, top_k: int, collapse_share: float
) -> dict[str, Any]:
    """How routing moved between two [layers, experts] share matrices (`RoutingCounter.utilization`):
    per layer KL(after || before) of the expert frequencies in nats, load entropy normalised to 1 =
    balanced, dead experts (no slot) and the busiest expert's share of tokens; `collapsed` lists the
    layers whose busiest expert takes >= `collapse_share` of the tokens after but not before."""
    eps = 1e-9

    def entropy(shares: torch.Tensor) -> float:
        nonzero = shares[shares > 0]
        return float(-(nonzero * nonzero.log()).sum() / math.log(len(shares))) if len(shares) > 1 else 1.0

    layers = []
    for row, layer in enumerate(layer_ids):
        p, q = after[row].double(), before[row].double()
        layers.append(
            {
                "layer": layer,
                "kl_vs_base": float((p * ((p + eps) / (q + eps)).log()).sum()),
                "entropy_base": entropy(q),
                "entropy": entropy(p),
                "dead_experts_base": (q == 0).nonzero().flatten().tolist(),
                "dead_experts": (p == 0).nonzero().flatten().tolist(),
                "top_token_share_base": float(q.max()) * top_k,
                "top_token_share": float(p.max()) * top_k,
            }
        )
    collapsed = [r["layer"] for r in layers if r["top_token_share"] >= collapse_share > r["top_token_share_base"]]
    return {"layers": layers, "collapsed": collapsed}
