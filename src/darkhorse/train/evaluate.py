"""Validation loss and bits per byte over a fixed set of batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.data.loader import Batch
from darkhorse.data.prepared import PreparedData
from darkhorse.eval.perplexity import target_bytes
from darkhorse.model.transformer import IGNORE_INDEX


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[Batch],
    sources: list[tuple[PreparedData, float]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    token_bytes: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Mean next-token loss over the batches' targets and bits per byte of their source text.

    The loss counts the same targets as training (masked ones are skipped). With `token_bytes` (the
    UTF-8 bytes of each token id, `eval.perplexity.token_byte_lengths`), bits per byte is exact, as
    `darkhorse eval --text` counts it: the nats of the scored targets that carry bytes over their
    bytes, so masked chat data gets a figure too. Without it (data with no tokenizer.json) it falls
    back to the sources' mean bytes per token, which is only right when every target counts, so it
    is None whenever a loss mask removed targets. `model` runs in eval mode and goes back to the mode
    it was in."""
    was_training = model.training
    model.eval()
    nats = tokens = byte_nats = 0.0
    text_bytes: float | None = 0.0
    for batch in batches:
        with autocast():
            logits = model(batch.inputs).logits
        per_token = F.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(batch.targets.shape)
        nats += float(per_token.sum())
        counted = int(batch.targets.ne(IGNORE_INDEX).sum())
        tokens += counted
        if token_bytes is not None:
            nbytes = target_bytes(token_bytes, batch.targets)
            byte_nats += float((per_token * (nbytes > 0)).sum())
            text_bytes += int(nbytes.sum())
        else:
            byte_nats = nats
            text_bytes = _add_bytes(text_bytes, batch, sources) if counted == batch.targets.numel() else None
    model.train(was_training)
    val_loss = nats / tokens if tokens else math.nan
    val_bpb = byte_nats / math.log(2) / text_bytes if text_bytes else None
    return {"val_loss": val_loss, "val_bpb": val_bpb}


def _add_bytes(text_bytes: float | None, batch: Batch, sources: list[tuple[PreparedData, float]]) -> float | None:
    if text_bytes is None:
        return None
    for source in batch.sources:
        per_token = sources[source][0].bytes_per_token("val")
        if per_token is None:
            return None
        text_bytes += per_token * batch.targets.shape[1]
    return text_bytes
