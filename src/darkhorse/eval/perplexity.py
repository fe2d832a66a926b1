"""Perplexity and bits per byte of a model on text, with exact byte accounting.

Bytes are counted per target token, nanochat's convention: each token is worth the UTF-8 bytes it
stands for (`token_byte_lengths`), a special token (`<|bos|>`, `<|eos|>`, chat markers) 0 bytes, and
bits per byte is the nats of the targets that carry bytes over ln 2 times their bytes. Because every
target knows its own bytes, masked data (chat records scored on the assistant's part, as trained) gets
an exact figure too; the trainer's val bits per byte uses the same `target_bytes`.

Each document is scored on its own, lm-evaluation-harness's `loglikelihood_rolling` convention: the
document's tokens follow one prefix token (the tokenizer's bos, else eos), and a document longer than
the window is cut into disjoint runs of `window` targets, each full run seeing only the token before
it and the last, shorter run as much earlier context as the window holds. On the same documents and
window, `lm_eval --model hf` on the HF export reports the same bits per byte
(tests/eval/test_lm_eval_parity.py; docs/benchmarks.md explains the conventions).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from darkhorse.data.prepared import PreparedData, open_prepared
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.model.transformer import IGNORE_INDEX

BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte pieces: one byte each
METASPACE = "\u2581"  # SentencePiece's word-boundary mark, a space in the text
DEFAULT_BATCH_TOKENS = 16384


def _uses_byte_level(node: Any) -> bool:
    """Whether a tokenizer.json decoder (possibly a Sequence) contains a ByteLevel step."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_uses_byte_level(value) for value in node.values())
    if isinstance(node, list):
        return any(_uses_byte_level(value) for value in node)
    return False


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (int64, one entry per id); special tokens are 0.

    Exact for byte-level BPE (darkhorse's, GPT-2, Llama 3, Qwen), where each character of a token's
    string is one byte; SentencePiece pieces count their text with the word mark as a space and a
    byte piece as one byte."""
    backend = tokenizer.backend
    special = {token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special}
    added = {token_id: added.content for token_id, added in backend.get_added_tokens_decoder().items()}
    byte_level = _uses_byte_level(json.loads(backend.to_str()).get("decoder"))
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for token_id in range(tokenizer.vocab_size):
        token = backend.id_to_token(token_id)
        if token_id in special or token is None:
            continue
        if token_id in added:  # a non-special added token is literal text
            lengths[token_id] = len(added[token_id].encode("utf-8"))
        elif byte_level:
            lengths[token_id] = len(token)
        elif BYTE_FALLBACK.fullmatch(token):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(token.replace(METASPACE, " ").encode("utf-8"))
    return lengths


def target_bytes(token_bytes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bytes behind each target id; 0 where the target is IGNORE_INDEX (masked or padding)."""
    valid = targets.ne(IGNORE_INDEX)
    return torch.where(valid, token_bytes[targets.clamp(min=0)], 0)


@dataclass
class Tally:
    """Sums over scored targets: `nats`/`tokens` give the loss, `byte_nats`/`bytes` bits per byte
    (the targets that carry bytes, i.e. not special tokens)."""

    tokens: int = 0
    nats: float = 0.0
    byte_nats: float = 0.0
    bytes: int = 0
    documents: int = 0

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float | None:
        return self.byte_nats / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


@dataclass
class TextScore:
    source: str
    window: int
    masked: bool
    overall: Tally
    by_domain: dict[str, Tally] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "window": self.window,
            "masked": self.masked,
            **self.overall.to_dict(),
            "by_domain": {name: tally.to_dict() for name, tally in self.by_domain.items()},
        }


def document_spans(tokens: np.ndarray, bos_id: int | None, eos_id: int) -> tuple[int, list[tuple[int, int]]]:
    """(prefix id, [(start, end)] of each document's scored tokens) in a prepared token stream.

    With a bos token, documents begin at each bos and the bos is the prefix; without one (Qwen),
    documents end at each eos and eos is the prefix, as lm-evaluation-harness prefixes them."""
    if bos_id is not None and tokens.size and tokens[0] == bos_id:
        starts = np.flatnonzero(tokens == bos_id)
        ends = [*starts[1:].tolist(), len(tokens)]
        return bos_id, [(int(s) + 1, int(e)) for s, e in zip(starts, ends, strict=True) if e > s + 1]
    ends = (np.flatnonzero(tokens == eos_id) + 1).tolist()
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    starts = [0, *ends[:-1]]
    return eos_id, [(s, e) for s, e in zip(starts, ends, strict=True) if e > s]


def _rows(
    tokens: np.ndarray, spans: Sequence[tuple[int, int]], prefix: int, window: int, eos_id: int
) -> list[tuple[np.ndarray, int, int]]:
    """lm-eval's rolling windows: (input+target ids, targets to skip, stream position of the first
    scored target) per window. Windows predict disjoint runs of `window` tokens; a full window sees only
    the token before its run, the last, shorter one is filled with earlier context up to `window`.
    lm-eval's documents have no eos, so a document that needs several windows has them laid over its
    text, and its final eos is scored in a row of its own (with a full window of context)."""
    rows = []
    for start, end in spans:
        full = np.concatenate([[prefix], tokens[start:end]]).astype(np.int64)
        length = end - start
        if length <= window:
            rows.append((full, 0, start))
            continue
        text_length = length - 1 if tokens[end - 1] == eos_id else length
        for offset in range(0, text_length, window):
            count = min(window, text_length - offset)
            first = max(0, offset + count - window)
            rows.append((full[first : offset + count + 1], offset - first, start + offset))
        if text_length < length:
            rows.append((full[length - window : length + 1], window - 1, end - 1))
    return rows


@torch.inference_mode()
def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    token_bytes: torch.Tensor,
    *,
    bos_id: int | None,
    eos_id: int,
    mask: np.ndarray | None = None,
    domains: np.ndarray | None = None,
    domain_names: Sequence[str] = (),
    window: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    source: str = "",
) -> TextScore:
    """Score a token stream of framed documents (as `prepare` writes them); `mask` 0 marks context-only
    targets, `domains` tags each token. `window` defaults to the model's context."""
    window = window or model.config.max_seq_len
    if not 1 <= window <= model.config.max_seq_len:
        raise DarkhorseError(f"--window must be between 1 and the model's context {model.config.max_seq_len}")
    device = model.embed.weight.device
    prefix, spans = document_spans(tokens, bos_id, eos_id)
    rows = sorted(_rows(tokens, spans, prefix, window, eos_id), key=lambda row: len(row[0]))
    names = list(domain_names) or ["all"]
    n_domains = max(len(names), int(domains.max()) + 1 if domains is not None and domains.size else 1)
    sums = torch.zeros(4, n_domains, dtype=torch.float64, device=device)  # tokens, nats, byte nats, bytes
    token_bytes = token_bytes.to(device)
    per_batch = max(1, batch_tokens // window)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(rows), per_batch):
            batch = rows[first : first + per_batch]
            width = max(len(ids) for ids, _, _ in batch) - 1
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            target_domains = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (ids, skip, position) in enumerate(batch):
                n = len(ids) - 1
                inputs[row, :n] = torch.from_numpy(ids[:-1])
                row_targets = torch.from_numpy(ids[1 + skip :].copy())
                if mask is not None:
                    row_targets[torch.from_numpy(mask[position : position + n - skip] == 0)] = IGNORE_INDEX
                targets[row, skip:n] = row_targets
                if domains is not None:
                    scored_domains = domains[position : position + n - skip].astype(np.int64)
                    target_domains[row, skip:n] = torch.from_numpy(scored_domains)
            inputs, targets, target_domains = inputs.to(device), targets.to(device), target_domains.to(device)
            logits = model(inputs).logits.float()
            nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
            nats = nats.view(targets.shape).double()
            scored = targets.ne(IGNORE_INDEX)
            nbytes = target_bytes(token_bytes, targets)
            for index, value in enumerate((scored.double(), nats, nats * (nbytes > 0), nbytes.double())):
                sums[index].index_add_(0, target_domains.flatten(), value.flatten())
    finally:
        model.train(was_training)
    tallies = [Tally(int(t), float(n), float(bn), int(b)) for t, n, bn, b in sums.T.tolist()]
    if domains is not None:
        for start, _ in spans:
            tallies[int(domains[start])].documents += 1
    else:
        tallies[0].documents = len(spans)
    overall = Tally(
        sum(t.tokens for t in tallies),
        sum(t.nats for t in tallies),
        sum(t.byte_nats for t in tallies),
        sum(t.bytes for t in tallies),
        sum(t.documents for t in tallies),
    )
    by_domain = {names[i]: tally for i, tally in enumerate(tallies) if tally.documents} if domains is not None else {}
    return TextScore(source=source, window=window, masked=mask is not None, overall=overall, by_domain=by_domain)


def score_prepared(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    data: PreparedData,
    split: str = "val",
    *,
    all_tokens: bool = False,
    window: int | None = None,
    source: str | None = None,
) -> TextScore:
    """Score one split of a prepared directory, which must use the model's tokenizer."""
    if data.tokenizer_sha256 and data.tokenizer_sha256 != tokenizer.sha256:
        raise DarkhorseError(
            f"{data.path} was prepared with another tokenizer than the checkpoint's; "
            f"prepare the text again with --tokenizer CHECKPOINT/tokenizer.json, or pass the raw file to --text"
        )
    if not (data.path / f"{split}.bin").exists() or not len(data.tokens(split)):
        raise DarkhorseError(f"{data.path}: the {split} split holds no tokens; choose another --split")
    tokens = data.tokens(split)
    mask = None if all_tokens else data.loss_mask(split)
    if mask is not None and mask.all():
        mask = None  # plain text: every target counts anyway
    domains = data.domains(split)
    names = data.domain_names
    return score_tokens(
        model,
        tokens,
        token_byte_lengths(tokenizer),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        mask=mask,
        domains=domains if domains is not None and len(names) > 1 else None,
        domain_names=names,
        window=window,
        source=source or f"{data.path} ({split})",
    )


def score_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    split: str = "val",
    all_tokens: bool = False,
    window: int | None = None,
) -> TextScore:
    """Score a prepared directory's `split`, or every document of a raw file (any format `prepare`
    reads: plain text, text or chat JSONL, ...), tokenized with the model's tokenizer."""
    from darkhorse.data.prepare import prepare

    path = Path(path)
    if path.is_dir():
        return score_prepared(model, tokenizer, open_prepared(path), split, all_tokens=all_tokens, window=window)
    if not path.is_file():
        raise DarkhorseError(f"--text {path}: no such file or prepared directory")
    copy = Tokenizer(tokenizer.backend, None, dict(tokenizer.settings))  # prepare re-points what it saves
    with tempfile.TemporaryDirectory(prefix="darkhorse-eval-") as work:
        data = prepare([path], Path(work) / "prepared", tokenizer=copy, val_fraction=0.0, progress=False)
        return score_prepared(model, tokenizer, data, "train", all_tokens=all_tokens, window=window, source=str(path))
