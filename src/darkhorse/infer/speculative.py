"""MTP speculative decoding: the model's own multi-token-prediction module drafts the next token but one,
and the main model verifies the draft in the forward it runs anyway.

At each step the engine knows the token at position p (the model's pick, or the prompt's) and, from
MTP module 1 fed the hidden state at p - 1 and that token, a draft for p + 1. It feeds both tokens to
the main model in one forward of two positions: the logits at p give the true token for p + 1, and if
it equals the draft, the logits at p + 1 give the token for p + 2 as well. Two tokens for one forward
when the draft is right; one, as without speculation, when it is wrong. Caches are written by position,
so a rejected draft's keys and values are simply overwritten by the next step, and greedy output is
the plain decoder's (up to float rounding: a two-position forward sums in another order).

The MTP block has a KV cache of its own, filled at every position from the main model's verified hidden
states and tokens (DeepSeek-V3's layout: module input at position i is the hidden state at i and the
token at i + 1), so each draft sees the whole context, as in training.

A batch shares one write position, so a step accepts its drafts only when every unfinished row's draft
is right; the other rows then still take the one verified token. Greedy only: sampling would need
speculative sampling (accept with probability p/q, resample from the residual), which is not built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer


@dataclass
class SpeculationStats:
    """Counts over an engine's speculative steps: drafts checked and drafts accepted (a step of a batch
    counts once, accepted when every unfinished row's draft was right)."""

    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_mtp(model: Transformer) -> None:
    """Refuse, with the reason, a model MTP speculation cannot decode exactly (`SamplingOptions` refuses
    sampling with it)."""
    if not getattr(model, "mtp", None):
        raise DarkhorseError(
            "--speculative mtp needs a model with an MTP module (model.mtp_depth >= 1, as the genesis presets have)"
        )
    moe = model.config.moe
    if model.config.ffn == "moe" and moe.capacity_factor > 0:
        raise DarkhorseError(
            "--speculative mtp needs model.moe.capacity_factor 0: with a capacity limit a token's experts "
            "depend on how many tokens share the forward"
        )


def mtp_steps(
    model: Transformer,
    tokens: torch.Tensor,
    lengths: list[int],
    ends: list[int],
    vocab_size: int,
    stop: torch.Tensor,
    stats: SpeculationStats,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`Engine.steps`'s contract (per position: each row's id and whether the row wrote it) for greedy
    decoding with MTP drafts; `tokens` (batch, longest prompt) holds the prompts, `ends` each row's last
    position + 1, `stop` the stop ids."""
    batch, device = len(lengths), tokens.device
    mtp, embed = model.mtp[0], model.embed
    start, longest, end = min(lengths), max(lengths), max(ends)
    if start >= end:  # nothing to write (no new tokens asked for)
        return
    cache = model.new_cache(batch, end)
    mtp_cache = mtp.block.attn.new_cache(batch, end, device, embed.weight.dtype)
    prompt_len = torch.tensor(lengths, device=device)
    row_end = torch.tensor(ends, device=device)
    at = torch.zeros(batch, end, dtype=torch.long, device=device)  # the token at each position
    at[:, :longest] = tokens
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def pick(hidden: torch.Tensor) -> torch.Tensor:
        """The greedy next token after each of `hidden`'s positions."""
        return model.lm_head(hidden)[..., :vocab_size].max(dim=-1).indices

    def forward(feed: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and greedy picks of `feed` (batch, seq) placed at `pos`."""
        hidden = model.hidden_states(feed, cache, pos)
        return hidden, pick(hidden)

    def emit(sampled: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampled, writing) for position `pos`; marks the rows it finishes."""
        writing = (pos >= prompt_len) & ~finished
        finished.logical_or_(writing & (torch.isin(sampled, stop) | (pos + 1 >= row_end)))
        return sampled, writing

    hidden = model.hidden_states(tokens[:, :start], cache, 0)
    sampled, mtp_from, pos = pick(hidden[:, -1]), 0, start  # hidden: positions mtp_from .. pos - 1
    while True:
        yield emit(sampled, pos)
        if bool(finished.all()) or pos + 1 >= end:
            return
        at[:, pos] = torch.where(pos < prompt_len, at[:, pos], sampled)
        # MTP entries for the positions since the last draft; the last one drafts position pos + 1
        rope = (model.rope_cos[mtp_from:pos], model.rope_sin[mtp_from:pos])
        drafted = mtp(hidden, embed(at[:, mtp_from + 1 : pos + 1]), rope, cache=mtp_cache, start_pos=mtp_from)
        draft = pick(drafted[:, -1])
        mtp_from = pos
        if pos + 1 < longest or pos + 2 >= end:  # a row still reads its prompt at pos + 1, or no room to gain
            hidden, picks = forward(at[:, pos : pos + 1], pos)
            sampled, pos = picks[:, 0], pos + 1
            continue
        hidden, picks = forward(torch.stack([at[:, pos], draft], dim=1), pos)
        stats.drafted += 1
        if not bool(((picks[:, 0] == draft) | finished).all()):
            hidden, sampled, pos = hidden[:, :1], picks[:, 0], pos + 1
            continue
        stats.accepted += 1
        yield emit(picks[:, 0], pos + 1)
        if bool(finished.all()):
            return
        at[:, pos + 1] = draft
        sampled, pos = picks[:, 1], pos + 2
