"""The one decode engine: every decode (generate, chat, eval, serve, the trainer's samples) runs its steps
through `Decoder.advance`, the one place a forward step runs and each row's next token is sampled. What
a decode is asked for is a `SamplingOptions` (infer/sampling.py), checked there.

A `Decoder` holds a forward step over a fixed number of cache rows (infer/dense_forward.py's: `DenseForward`
for plain dense GQA fp32 models, the model's computation in fewer, larger ops with the KV cache written in
place; `Transformer.forward` with its caches for every other model) and each row's `Sampler`. `advance`
feeds some rows their tokens, at one position shared by all of them (no attention mask) or at each row's
own (a (rows,) tensor: a masked attention), and samples: greedy rows take their maximum without the
sampler (a lone greedy row of the native step the id the step computed in C with its logits); the other
rows sample in groups, one call per `Sampler` (its options and seeded generator).

Two callers drive it:

- `Engine.steps` (generate, chat, eval; `generate`, `decode` and `stream` are views of it): a fixed batch of
  prompts sharing one sampler and one write position. Ragged prompts are not padded: every row starts at
  position 0, the batch is prefilled up to its shortest prompt, and from there each step feeds every row one
  token: the next prompt token to a row still reading its prompt, the sampled one to the others. Each row
  sees exactly its own tokens at its own positions, so a row decodes as it would alone (equal-length prompts
  exactly; a longer prompt's tail goes through token by token, the same numbers up to float rounding), and
  the step loop does its bookkeeping in tensors that `generate` reads once at the end (a lone row, which
  writes every step until it stops, only checks its stop id on a Python int: after the native step has
  streamed the weights through the cache, every small torch op per token runs cold). Rows interact only
  through an MoE capacity limit (`moe.capacity_factor > 0`), which counts the whole batch, and through the
  shared generator when sampling with a seed.
- `ContinuousBatch` (what `darkhorse serve` runs): requests join and leave between steps, each with its
  own sampler. A joining prompt is prefilled in its own cache row; each step feeds every live row its last
  token at its own position in one batched `advance` (the unmasked shared-position step when they happen
  to agree). Live rows stay first in the cache: a leaving row's slot takes the last live row, moved.

`speculative="mtp"` is the one decode that leaves `advance`: it decodes greedily with the model's MTP
module drafting a token per step and the model verifying it (infer/speculative.py): the same tokens, fewer
forwards when the drafts are right.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from darkhorse.errors import DarkhorseError
from darkhorse.infer.dense_forward import forward_step
from darkhorse.infer.sampling import SamplingOptions
from darkhorse.infer.speculative import SpeculationStats, check_mtp, mtp_steps
from darkhorse.model import Transformer


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode while decoding, its mode restored after. A model already in eval mode is left
    alone: `eval()` walks every module, which a server stepping per token paid ~10% of its decode time for."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next id of each row of `logits` (batch, vocab); temperature 0 means greedy (deterministic).

    `seen` (batch, vocab, bool) marks each row's tokens so far, for the repetition penalty."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        # CTRL-style penalty: make already-seen tokens less likely whatever the logit's sign.
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or so small it would divide by zero in float32
        return logits.argmax(dim=-1)
    # shifted so the best logit is 0 first: a tiny temperature then scales the rest to -inf, never to inf/nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Sampler:
    """One decode's sampling: its options and its random generator (seeded: reproducible). Rows that share a
    sampler draw together from one generator (an `Engine.steps` batch); a served request has its own."""

    def __init__(self, options: SamplingOptions, device: torch.device) -> None:
        self.options, self.greedy = options, options.greedy
        seed = options.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None


class Decoder:
    """The one place a decode step runs and samples: a forward step over `rows` cache rows up to `max_len`
    positions (infer/dense_forward.py's `forward_step`, output head cut to `head` rows) and each row's
    sampler. `Engine.steps` and `ContinuousBatch` both decode through `advance`."""

    def __init__(
        self, model: Transformer, vocab_size: int, rows: int, max_len: int, head: int, *, per_row: bool = False
    ) -> None:
        self.vocab_size, self.head = vocab_size, head
        self.device = model.embed.weight.device
        self.step = forward_step(model, rows, max_len, head, per_row=per_row)
        self.samplers: list[Sampler | None] = [None] * rows
        self.seen: torch.Tensor | None = None  # (rows, head): tokens each row was fed, for the repetition penalty

    def seat(self, row: int, sampler: Sampler) -> None:
        """Give cache row `row` to a new sequence that samples with `sampler`."""
        self.samplers[row] = sampler
        if self.seen is None and sampler.options.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(self.samplers), self.head, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[row] = False

    def move(self, source: int, target: int) -> None:
        """Move row `source`'s sequence (its cache and sampler) into row `target`."""
        self.step.move_row(source, target)
        self.samplers[target] = self.samplers[source]
        if self.seen is not None:
            self.seen[target] = self.seen[source]

    def advance(
        self, feed: torch.Tensor, start_pos: int | torch.Tensor, *, row: int = 0, all_positions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `feed` (n, seq) to rows `row`..`row + n` at `start_pos` (one int, or each row's own as a (n,)
        tensor) and sample each row's next token with its sampler: (logits, sampled ids (n,)). The logits are
        the last position's (n, head), or with `all_positions` every position's (n, seq, head)."""
        rows = slice(row, row + len(feed))
        if self.seen is not None:
            self.seen[rows].scatter_(1, feed, True)
        if row or all_positions:  # a continuous batch's prefill
            logits = self.step(feed, start_pos, row=row, all_positions=all_positions)
        else:  # the plain `step(tokens, start_pos)` every forward step takes
            logits = self.step(feed, start_pos)
        last = logits[:, -1] if all_positions else logits
        if self.head > self.vocab_size:
            last = last[:, : self.vocab_size]
        samplers = self.samplers[rows]
        if len(samplers) == 1 and samplers[0].greedy and self.step.argmax is not None and self.head == self.vocab_size:
            # one greedy row of the native step: its id, computed in C while the logits were in cache
            return logits, torch.full((1,), self.step.argmax, device=self.device)
        # greedy: sample_next's argmax without its copies; max's indices are argmax's (the first maximum of a
        # row) and on CPU a few times faster
        sampled = last.max(dim=-1).indices
        groups: dict[int, tuple[Sampler, list[int]]] = {}
        for index, sampler in enumerate(samplers):
            if not sampler.greedy:
                groups.setdefault(id(sampler), (sampler, []))[1].append(index)
        for sampler, indices in groups.values():
            picked = slice(None) if len(indices) == len(samplers) else torch.tensor(indices, device=self.device)
            seen = self.seen[rows][picked, : self.vocab_size] if self.seen is not None else None
            options = sampler.options
            sampled[picked] = sample_next(
                last[picked],
                seen if seen is not None else torch.zeros(0, dtype=torch.bool),
                temperature=options.temperature,
                top_k=options.top_k,
                top_p=options.top_p,
                repetition_penalty=options.repetition_penalty,
                generator=sampler.generator,
            )
        return logits, sampled


class Engine:
    """Decodes prompts (lists of token ids) with `model`; `vocab_size` masks the output head's
    padding rows that no tokenizer id maps to (default: the whole head). `speculation` counts the drafts of
    its speculative decodes. Each method takes `SamplingOptions`, or its fields as keywords (or both: the
    keywords replace those fields)."""

    def __init__(self, model: Transformer, vocab_size: int | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size or model.config.padded_vocab_size
        self.speculation = SpeculationStats()

    def decode(
        self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, **changes
    ) -> Iterator[list[int | None]]:
        """Per step, each row's new token, or None for a row still reading its prompt or finished."""
        for sampled, writing in self.steps(prompts, options, **changes):
            yield [token if write else None for token, write in zip(sampled.tolist(), writing.tolist(), strict=True)]

    @torch.inference_mode()
    def steps(
        self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, **changes
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per step, as tensors: each row's sampled id, and whether the row wrote it (False while it
        still reads its prompt or after it finished).

        A row finishes after writing a stop id (yielded), `max_new_tokens` tokens, or at the end of
        the model's context; decoding ends when every row has finished. The rows share one sampler, so a
        seed makes the whole batch's sampling reproducible (a row's draws depend on the rows beside it).
        """
        options = SamplingOptions.of(options, **changes)
        model = self.model
        lengths = [len(prompt) for prompt in prompts]
        if not lengths or min(lengths) == 0:
            raise DarkhorseError("the prompt is empty: give at least one token")
        context = model.config.max_seq_len
        if max(lengths) >= context:
            raise DarkhorseError(
                f"the prompt has {max(lengths)} tokens but the model's context is {context}; shorten it"
            )
        if options.speculative:
            check_mtp(model)
        device = model.embed.weight.device
        max_new_tokens = options.max_new_tokens
        ends = [n + max(0, min(max_new_tokens, context - n)) for n in lengths]  # each row's last position + 1
        end = max(ends)
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=device)  # the prompts
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        longest, first_end = max(lengths), min(ends)
        prompt_len = torch.tensor(lengths, device=device)
        row_end = torch.tensor(ends, device=device)
        stop = torch.tensor(sorted(options.stop_ids), dtype=torch.long, device=device)
        stop_id = int(stop[0]) if len(stop) == 1 else -1  # -1: no id matches
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        with evaluating(model):
            if options.speculative:
                yield from mtp_steps(model, tokens, lengths, ends, self.vocab_size, stop, self.speculation)
                return
            decoder = Decoder(model, self.vocab_size, len(prompts), end, self.vocab_size)
            sampler = Sampler(options, device)
            for row in range(len(prompts)):
                decoder.seat(row, sampler)
            start = min(lengths)
            feed, feed_pos = tokens[:, :start], 0
            wrote = torch.ones(1, dtype=torch.bool, device=device)  # what a lone row's every step yields
            for pos in range(start, end):
                _, sampled = decoder.advance(feed, feed_pos)
                if len(prompts) == 1:  # one row: its prompt was all prefilled, so it writes every step until
                    yield sampled, wrote  # a stop id; no tensor bookkeeping (the last step is end - 1)
                    if int(sampled) in options.stop_ids:
                        return
                    feed, feed_pos = sampled[:, None], pos
                    continue
                if pos < longest:  # some rows still read their prompt: they are fed its next token
                    reading = pos < prompt_len
                    feed = torch.where(reading, tokens[:, pos], sampled)
                    writing = ~reading & ~finished
                else:
                    feed = sampled
                    writing = ~finished
                yield sampled, writing
                done = torch.isin(sampled, stop) if len(stop) > 1 else sampled == stop_id
                if pos + 1 >= first_end:  # some rows reach their last position
                    done |= pos + 1 >= row_end
                finished |= writing & done
                if bool(finished.all()):
                    return
                feed, feed_pos = feed[:, None], pos

    def generate(
        self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, **changes
    ) -> list[list[int]]:
        """Each prompt's new tokens, ending with its stop id when it wrote one."""
        steps = list(self.steps(prompts, options, **changes))  # the steps' tensors, read once at the end
        if not steps:
            return [[] for _ in prompts]
        sampled = torch.stack([s for s, _ in steps], dim=1).tolist()
        writing = torch.stack([w for _, w in steps], dim=1).tolist()
        return [
            [token for token, write in zip(row, writes, strict=True) if write]
            for row, writes in zip(sampled, writing, strict=True)
        ]

    def stream(self, prompt: Sequence[int], options: SamplingOptions | None = None, **changes) -> Iterator[int]:
        """One prompt's new tokens as they are decoded: the batch-of-one case of `decode`."""
        for (token,) in self.decode([prompt], options, **changes):
            if token is not None:
                yield token


class Row:
    """One request of a `ContinuousBatch`: its prompt, its `SamplingOptions` (or their fields as keywords)
    and what it has decoded. `logprobs` k: record each new token's logprob and the k likeliest (id, logprob);
    `prompt_logprobs`: the same for the prompt's tokens (None for the first, which nothing predicts).
    Logprobs are over the model's whole output head, as `darkhorse eval` scores."""

    def __init__(
        self,
        prompt: Sequence[int],
        options: SamplingOptions | None = None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        **changes,
    ) -> None:
        self.prompt = list(prompt)
        self.options = SamplingOptions.of(options, **changes)
        self.logprobs = logprobs
        self.want_prompt_logprobs = prompt_logprobs
        self.tokens: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prompt_token_logprobs: list[float | None] = []
        self.prompt_top_logprobs: list[list[tuple[int, float]] | None] = []
        self.finish_reason: str | None = None  # "stop" (a stop id), "length", or "cancelled"

    def _record(self, logits: torch.Tensor, token: int) -> None:
        if self.logprobs is not None:
            logprobs = F.log_softmax(logits.float(), dim=-1)
            self.token_logprobs.append(float(logprobs[token]))
            self.top_logprobs.append(_top(logprobs, self.logprobs))


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = logprobs.topk(k) if k else (logprobs[:0], logprobs[:0].long())
    return list(zip(ids.tolist(), values.tolist(), strict=True))


class ContinuousBatch:
    """Up to `max_rows` requests decoding together, joining and leaving between steps (see the module
    docstring). Live rows are kept first in the cache, so a step runs over exactly those."""

    def __init__(self, engine: Engine, max_rows: int) -> None:
        self.engine = engine
        self.model = engine.model
        self.max_rows = max_rows
        self.context = self.model.config.max_seq_len
        # the whole output head: logprobs are over it; sampling looks at the tokenizer's ids only
        head = self.model.config.padded_vocab_size
        self.decoder = Decoder(self.model, engine.vocab_size, max_rows, self.context, head, per_row=True)
        self.rows: list[Row] = []  # row i lives in cache row i
        self.decoding = 0  # rows[:decoding] have been prefilled; the rest join at the next step

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.max_rows

    def add(self, row: Row) -> None:
        """Queue `row` to join at the next step (its prompt is checked now)."""
        if self.full:
            raise DarkhorseError(f"the batch is full ({self.max_rows} rows)")
        if not row.prompt:
            raise DarkhorseError("the prompt is empty: give at least one token")
        if len(row.prompt) >= self.context:
            raise DarkhorseError(
                f"the prompt has {len(row.prompt)} tokens but the model's context is {self.context}; shorten it"
            )
        if row.options.speculative:
            raise DarkhorseError("continuous batching decodes without speculation")
        self.rows.append(row)

    def remove(self, row: Row) -> None:
        """Free `row`'s slot (a client went away); the last live row moves into it."""
        if row in self.rows:
            row.finish_reason = row.finish_reason or "cancelled"
            self._drop(self.rows.index(row))

    def _drop(self, index: int) -> None:
        last = len(self.rows) - 1
        prefilled = index < self.decoding
        if prefilled and index != self.decoding - 1:  # the last prefilled row fills the gap
            self._move(self.decoding - 1, index)
            index = self.decoding - 1
        if prefilled:
            self.decoding -= 1
        if index != last:  # a joining row moves down (nothing cached yet: just its place)
            self.rows[index] = self.rows[last]
        self.rows.pop()

    def _move(self, source: int, target: int) -> None:
        self.decoder.move(source, target)
        self.rows[target] = self.rows[source]

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int | None]]:
        """Decode one token for every prefilled row (one batched forward), then prefill the joining rows
        (each its own forward, sampling its first token). Returns each row that moved with its new token
        (None: it ended without one); finished rows have `finish_reason` set and have left the batch."""
        model = self.model
        moved: list[tuple[Row, int | None]] = []
        with evaluating(model):
            live = self.rows[: self.decoding]
            if live:
                device = self.decoder.device
                feed = torch.tensor([[row.tokens[-1]] for row in live], device=device)
                positions = [len(row.prompt) + len(row.tokens) - 1 for row in live]
                # one shared position needs no attention mask
                at = positions[0] if len(set(positions)) == 1 else torch.tensor(positions, device=device)
                logits, sampled = self.decoder.advance(feed, at)
                for row, row_logits, token in zip(live, logits, sampled.tolist(), strict=True):
                    moved.append((row, self._take(row, row_logits, token)))
            for index in range(self.decoding, len(self.rows)):
                row = self.rows[index]
                moved.append((row, self._prefill(index, row)))
            self.decoding = len(self.rows)
        for index in reversed(range(len(self.rows))):
            if self.rows[index].finish_reason is not None:
                self._drop(index)
        return moved

    def _prefill(self, index: int, row: Row) -> int | None:
        prompt = torch.tensor([row.prompt], device=self.decoder.device)
        self.decoder.seat(index, Sampler(row.options, self.decoder.device))
        logits, sampled = self.decoder.advance(prompt, 0, row=index, all_positions=row.want_prompt_logprobs)
        if row.want_prompt_logprobs:
            logprobs = F.log_softmax(logits[0, :-1].float(), dim=-1)
            picked = logprobs.gather(-1, prompt[0, 1:, None])[:, 0].tolist()
            row.prompt_token_logprobs = [None, *picked]
            row.prompt_top_logprobs = [None, *(_top(lp, row.logprobs or 0) for lp in logprobs)]
            logits = logits[:, -1]
        if self._limit(row) <= 0:
            row.finish_reason = "length"
            return None
        return self._take(row, logits[0], int(sampled[0]))

    def _limit(self, row: Row) -> int:
        """New tokens `row` may write: its budget, within the model's context."""
        return min(row.options.max_new_tokens, self.context - len(row.prompt))

    def _take(self, row: Row, logits: torch.Tensor, token: int) -> int:
        """Append `row`'s sampled `token` (its `logits`: the whole head, for logprobs); note whether it finished."""
        row.tokens.append(token)
        row._record(logits, token)
        if token in row.options.stop_ids:
            row.finish_reason = "stop"
        elif len(row.tokens) >= self._limit(row):
            row.finish_reason = "length"
        return token
