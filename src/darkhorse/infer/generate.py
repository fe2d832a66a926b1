"""Autoregressive sampling with the model's KV cache, streamed token by token."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> int:
    """Pick the next id from 1-D `logits`; temperature 0 means greedy (deterministic)."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and seen.numel():
        # CTRL-style penalty: make already-seen tokens less likely whatever the logit's sign.
        previous = logits[seen]
        logits[seen] = torch.where(previous > 0, previous / repetition_penalty, previous * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops at `max_new_tokens`, a stop id or the context end.

    The prompt is run once through the model to fill the cache, then each step feeds one token.
    `vocab_size` masks the padding rows of the output head that no tokenizer id maps to.
    """
    if not prompt_ids:
        raise DarkhorseError("the prompt is empty: give at least one token")
    context = model.config.max_seq_len
    if len(prompt_ids) >= context:
        raise DarkhorseError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; shorten it"
        )
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = set(stop_ids)
    limit = vocab_size or model.config.padded_vocab_size
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    seen = torch.tensor(prompt_ids, device=device)
    tokens = seen.unsqueeze(0)
    position = 0
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens, cache=cache, start_pos=position).logits[0, -1, :limit]
            position += tokens.shape[1]
            next_id = sample_next(
                logits,
                seen,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                generator=generator,
            )
            yield next_id
            if next_id in stop:
                return
            seen = torch.cat([seen, seen.new_tensor([next_id])])
            tokens = seen[-1:].unsqueeze(0)
    finally:
        model.train(was_training)


def stream_text(tokenizer: TextCodec, ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces, holding back bytes of a half-finished character."""
    generated: list[int] = []
    emitted = ""
    for token_id in ids:
        generated.append(token_id)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        emitted = text


def generate_text(model: Transformer, tokenizer: TextCodec, prompt: str, **options) -> str:
    """Complete `prompt` and return only the new text (options as for `generate_tokens`)."""
    options.setdefault("vocab_size", tokenizer.vocab_size)
    options.setdefault("max_new_tokens", 64)
    ids = generate_tokens(model, tokenizer.encode(prompt), **options)
    return "".join(stream_text(tokenizer, ids))
