"""Training batches: random windows from memory-mapped prepared directories, mixed by weight.

Every batch is a pure function of (seed, step, micro-step), never of iterator state, so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen. With
several sources, window number i of the run goes to a source by a fixed interleaving whose
counts track the weights to within one window at every point (exact whenever the weights
divide the count), and a generator seeded by (seed, split, i) picks where in that source the
window starts, so the windows do not depend on how a step is cut into micro-batches either.

With `loss_mask` (train.loss_mask), a target whose token the source's loss mask marks 0 (a chat prompt,
see `prepared.py`) becomes IGNORE_INDEX, which the model's cross-entropy skips: the window still shows
the prompt as context, but only the replies are learned. Sources without a mask file count every token.

Batch-size and sequence-length warm-up (train.batch_warmup_steps, train.seq_warmup_steps) cut step s's
windows to its `shape(s)`: the first rows of each micro-batch, the first tokens of each window. The windows
themselves (which ones, where they start) stay those of the full shape, so batches are still a function of
the step alone and a resumed run sees the same ones.

With `align` (train.align_windows), a window starts at the beginning of the document (BOS) in which its
random start falls, so no reply is learned from a window that cut its prompt off: with short chat records
(the demo's ~40 tokens in 128-token windows) random starts give 24% of the learned tokens that way.

With `source_steps` (train.source_steps) the sources are a curriculum instead of a mix: step s reads
source min(s // source_steps, last) alone (the windows' starts are drawn as always), so a run's first phase
sees exactly the batches a run on its first source alone would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from darkhorse.data.prepared import SPLITS, PreparedData, open_prepared
from darkhorse.errors import DarkhorseError
from darkhorse.model.transformer import IGNORE_INDEX

RAW_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
MIN_WARMUP_SEQ = 16  # sequence-length warm-up grows windows in steps of this many tokens, from this many


@dataclass
class Batch:
    inputs: torch.Tensor  # (batch, seq_len) int64
    targets: torch.Tensor  # (batch, seq_len) int64, inputs shifted by one; IGNORE_INDEX where masked
    domains: torch.Tensor | None  # (batch, seq_len) uint8 domain ids, when every source has them
    sources: list[int]  # which source each row came from


def parse_data_spec(spec: str) -> tuple[Path, float]:
    """`PATH` or `PATH:WEIGHT` (a colon that is not followed by a number belongs to the path)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(weight) or weight <= 0:
            raise DarkhorseError(f"--data {spec}: the weight after ':' must be a positive number")
        return Path(head), weight
    return Path(spec), 1.0


def open_sources(specs: list[tuple[Path, float]], vocab_size: int) -> list[tuple[PreparedData, float]]:
    """Open each source: a prepared dir as is, a raw text file through the cached `prepare` step.

    All sources must share one tokenizer, or their token ids would mean different things.
    """
    if not specs:
        raise DarkhorseError("no training data given: pass --data DIR (a prepared dir) or a .jsonl/.txt file")
    # Raw files are tokenized with the tokenizer of the first prepared source (a given dir, or the
    # first raw file's freshly trained one), so several raw files mix without a tokenizer clash.
    shared_tokenizer = next((Path(p) / "tokenizer.json" for p, _ in specs if Path(p).is_dir()), None)
    sources = []
    for path, weight in specs:
        path = Path(path)
        if path.is_file():
            if path.suffix.lower() not in RAW_SUFFIXES:
                raise DarkhorseError(f"--data {path}: expected a prepared dir or a {'/'.join(RAW_SUFFIXES)} file")
            from darkhorse.data.prepare import prepare_cached

            path = prepare_cached(path, vocab_size=vocab_size, tokenizer=shared_tokenizer)
            shared_tokenizer = shared_tokenizer or path / "tokenizer.json"
        sources.append((open_prepared(path), float(weight)))
    first = sources[0][0]
    for data, _ in sources[1:]:
        if data.tokenizer_sha256 != first.tokenizer_sha256 or data.vocab_size != first.vocab_size:
            raise DarkhorseError(
                f"--data {data.path} uses a different tokenizer than {first.path} (tokenizer_sha256 or "
                "vocab_size in meta.json differ); prepare all sources with the same tokenizer"
            )
    return sources


def source_of_window(index: int, weights: list[float]) -> int:
    """Which source window `index` comes from: a fixed interleaving that tracks `weights`.

    Source 0 takes window n exactly when round(n * p0) steps up, which keeps its count within
    half a window of n * p0 at all times; the remaining windows are shared among the other
    sources by the same rule, one source at a time.
    """
    remaining = sum(weights)
    for source, weight in enumerate(weights[:-1]):
        share = weight / remaining
        taken_before = math.floor(index * share + 0.5)
        if math.floor((index + 1) * share + 0.5) > taken_before:
            return source
        index -= taken_before
        remaining -= weight
    return len(weights) - 1


class WindowLoader:
    """Batches of `seq_len + 1`-token windows, deterministic from (seed, step, micro-step)."""

    def __init__(
        self,
        sources: list[tuple[PreparedData, float]],
        *,
        seq_len: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        loss_mask: bool = True,
        align: bool = False,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        batch_warmup_steps: int = 0,
        seq_warmup_steps: int = 0,
        source_steps: int = 0,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.batch_warmup_steps, self.seq_warmup_steps = batch_warmup_steps, seq_warmup_steps
        self.sources = [data for data, _ in sources]
        self.weights = [weight for _, weight in sources]
        self.seq_len, self.batch_size, self.grad_accum, self.seed = seq_len, batch_size, grad_accum, seed
        self.loss_mask, self.align, self.source_steps = loss_mask, align, source_steps
        self.device = torch.device(device)
        for data in self.sources:
            if len(data.tokens("train")) < seq_len + 1:
                raise DarkhorseError(
                    f"{data.path}/train.bin holds {len(data.tokens('train'))} tokens, fewer than one window of "
                    f"train.seq_len + 1 = {seq_len + 1}; lower train.seq_len or add data"
                )
        self.with_domains = all(data.domains("train") is not None for data in self.sources)
        # each prepared dir numbers its domains in the order it met them: batches use the first source's
        # numbers, a domain the first lacks one after them
        names = [name for data in self.sources for name in data.domain_names]
        names = list(dict.fromkeys(names))
        self.domain_ids = [np.array([names.index(n) for n in data.domain_names], np.uint8) for data in self.sources]
        self.val_sources = [i for i, data in enumerate(self.sources) if self._has_val(data)]

    def _has_val(self, data: PreparedData) -> bool:
        return (data.path / "val.bin").exists() and len(data.tokens("val")) >= self.seq_len + 1

    @property
    def train_tokens(self) -> int:
        return sum(len(data.tokens("train")) for data in self.sources)

    def shape(self, step: int) -> tuple[int, int]:
        """(rows, tokens) of each micro-batch of step `step`: (batch_size, seq_len), or less during a warm-up,
        which grows both linearly over its steps (rows from 1, tokens from MIN_WARMUP_SEQ in steps of it)."""
        rows, seq = self.batch_size, self.seq_len
        if step < self.batch_warmup_steps:
            rows = math.ceil(rows * (step + 1) / self.batch_warmup_steps)
        if step < self.seq_warmup_steps:
            grown = MIN_WARMUP_SEQ * math.ceil(seq * (step + 1) / self.seq_warmup_steps / MIN_WARMUP_SEQ)
            seq = min(seq, max(grown, MIN_WARMUP_SEQ))
        return rows, seq

    def tokens_per_step(self, step: int) -> int:
        """Tokens that step `step` trains on, over all micro-batches and ranks."""
        rows, seq = self.shape(step)
        return rows * seq * self.grad_accum * self.world_size

    def batch(self, step: int, micro_step: int) -> Batch:
        """The micro-batch `micro_step` of optimizer step `step` (both 0-based) for this rank.

        Step s reads windows [s * G, (s + 1) * G) with G = batch_size x grad_accum x world_size, each
        rank a distinct block of them, so a step sees the same windows at any world size that keeps G
        (during a warm-up, the first rows and tokens of them: `shape`)."""
        block = (step * self.grad_accum + micro_step) * self.world_size + self.rank
        first_window = block * self.batch_size
        rows, seq = self.shape(step)
        windows = range(first_window, first_window + rows)
        if self.source_steps:
            sources = [min(step // self.source_steps, len(self.sources) - 1)] * rows
        else:
            sources = [source_of_window(index, self.weights) for index in windows]
        return self._gather("train", windows, sources, self.with_domains, seq)

    def val_batches(self, count: int) -> list[Batch]:
        """`count` fixed validation batches (the same at every evaluation), [] without val splits."""
        if not self.val_sources:
            return []
        weights = [self.weights[i] for i in self.val_sources]
        with_domains = all(self.sources[i].domains("val") is not None for i in self.val_sources)
        batches = []
        for index in range(count):
            windows = range(index * self.batch_size, (index + 1) * self.batch_size)
            rows = [self.val_sources[source_of_window(window, weights)] for window in windows]
            batches.append(self._gather("val", windows, rows, with_domains))
        return batches

    def _gather(self, split: str, windows: range, rows: list[int], with_domains: bool, seq: int = 0) -> Batch:
        """Windows of `seq` (default seq_len) + 1 tokens, each from where a full window would start."""
        full_span, span = self.seq_len + 1, (seq or self.seq_len) + 1
        split_id = SPLITS.index(split)
        token_windows = np.empty((len(rows), span), dtype=np.int64)
        domain_windows = np.empty((len(rows), span), dtype=np.uint8) if with_domains else None
        target_windows = np.empty((len(rows), span - 1), dtype=np.int64)
        for row, (window, source) in enumerate(zip(windows, rows, strict=True)):
            data = self.sources[source]
            tokens = data.tokens(split)
            rng = np.random.default_rng([self.seed, split_id, window])
            start = int(rng.integers(0, len(tokens) - full_span + 1))
            starts = data.document_starts(split) if self.align else None
            if starts is not None and len(starts) and starts[0] <= start:
                start = int(starts[np.searchsorted(starts, start, side="right") - 1])
            token_windows[row] = tokens[start : start + span]
            target_windows[row] = token_windows[row, 1:]
            mask = data.loss_mask(split) if self.loss_mask else None
            if mask is not None:
                target_windows[row, mask[start + 1 : start + span] == 0] = IGNORE_INDEX
            if domain_windows is not None:
                domain_windows[row] = self.domain_ids[source][data.domains(split)[start : start + span]]
        inputs, targets = torch.from_numpy(token_windows[:, :-1]), torch.from_numpy(target_windows)
        domains = torch.from_numpy(domain_windows[:, :-1]) if domain_windows is not None else None
        non_blocking = self.device.type == "cuda"
        if non_blocking:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return Batch(
            inputs=inputs.to(self.device, non_blocking=non_blocking),
            targets=targets.to(self.device, non_blocking=non_blocking),
            domains=domains.to(self.device) if domains is not None else None,
            sources=rows,
        )
