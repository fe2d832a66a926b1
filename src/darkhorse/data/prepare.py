"""`prepare`: raw files -> a prepared directory (see `prepared.py` for the format).

Two streaming passes over the inputs: the first trains the tokenizer (skipped when one is given), the
second tokenizes and writes. A reader thread parses files into chunks of documents while the main thread
encodes the previous chunk with `encode_batch` (Rust threads on all cores, GIL released) and appends
the ids to the output files with `ndarray.tofile`, so memory holds a couple of chunks whatever the
corpus size. A document longer than `PIECE_CHARS` (1 Mi characters) is tokenized in pieces cut just
before a space (a pre-token boundary, so the ids are the same), at most `CHUNK_BYTES` of text per
`encode_batch` call: the tokenizer's working memory (~150 bytes per character) stays bounded at about
0.6 GiB however long one document is, and the rest is a few copies of the document's own text. A
`--force` run replaces only a directory `prepare` wrote. Everything is written into a hidden temp
directory that is renamed into place last.

Each document is one training sequence framed as `<|bos|>...<|eos|>` (chat records are rendered with both
already; plain text gets them added). Whether a document is validation data is decided by a hash of its
text, so the split is deterministic and identical documents never straddle train and val. Each token also
gets a loss-mask byte: 1 for the assistant's part of a chat record (`chat_format.assistant_spans`) and for
all of plain text, 0 for the prompt (`<|bos|>`, system and user turns), so chat SFT learns the replies.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from darkhorse.config import MAX_DOMAINS
from darkhorse.data.chat_format import Part, assistant_spans
from darkhorse.data.prepared import (
    DOMAIN_DTYPE,
    FORMAT,
    MASK_DTYPE,
    SPLITS,
    TOKEN_DTYPE,
    PreparedData,
    looks_prepared,
    open_prepared,
    sha256_file,
)
from darkhorse.data.readers import ChatRenderer, Document, InputReader, expand_inputs
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir, remove_dir

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_TOKENIZER_SAMPLE_BYTES = 128 << 20  # BPE merges for a small vocab settle long before this
CHUNK_BYTES = 4 << 20  # text per encode_batch call: big enough to keep all cores busy
PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of at most this many characters


def is_validation(text_bytes: bytes, val_fraction: float) -> bool:
    """Deterministic per-document split: the same text always lands in the same split."""
    digest = hashlib.blake2b(text_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def loss_mask(
    ids: list[int], chat: bool, special_ids: dict[str, int], offsets: list[tuple[int, int]] | None = None,
    assistant_chars: tuple[tuple[int, int], ...] | None = None,
) -> np.ndarray:  # fmt: skip
    """1 where a token is a training target: the assistant's part of a conversation, all of plain text.

    A conversation rendered by a model's own template marks the assistant's characters instead of
    darkhorse's markers: a token counts when its characters overlap them (`offsets` per token)."""
    if assistant_chars is not None and offsets is not None:
        return np.array(
            [any(start < end_c and end > start_c for start_c, end_c in assistant_chars) for start, end in offsets],
            dtype=MASK_DTYPE,
        )
    if not chat:
        return np.ones(len(ids), dtype=MASK_DTYPE)
    mask = np.zeros(len(ids), dtype=MASK_DTYPE)
    for start, end in assistant_spans(ids, special_ids):
        mask[start:end] = 1
    return mask


@dataclass
class _SplitWriter:
    """Appends one split's tokens, domain ids and loss mask to disk and keeps its counts."""

    directory: Path
    name: str
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    loss_tokens: int = 0
    domain_tokens: dict[int, int] = field(default_factory=dict)
    domain_documents: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token_file = open(self.directory / f"{self.name}.bin", "wb")  # noqa: SIM115 (closed in close())
        self.domain_file = open(self.directory / f"{self.name}.domains.bin", "wb")  # noqa: SIM115
        self.mask_file = open(self.directory / f"{self.name}.mask.bin", "wb")  # noqa: SIM115

    def write(self, ids: list[list[int]], domains: list[int], masks: list[np.ndarray], text_bytes: int) -> None:
        if not ids:
            return
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        np.fromiter(itertools.chain.from_iterable(ids), dtype=TOKEN_DTYPE, count=total).tofile(self.token_file)
        domain_ids = np.asarray(domains, dtype=DOMAIN_DTYPE)
        np.repeat(domain_ids, lengths).tofile(self.domain_file)
        mask = np.concatenate(masks)
        mask.tofile(self.mask_file)
        self.loss_tokens += int(np.count_nonzero(mask))
        self.tokens += total
        self.documents += len(ids)
        self.bytes += text_bytes
        for domain, count in zip(domains, lengths.tolist(), strict=True):
            self.domain_tokens[domain] = self.domain_tokens.get(domain, 0) + count
            self.domain_documents[domain] = self.domain_documents.get(domain, 0) + 1

    def close(self) -> None:
        self.token_file.close()
        self.domain_file.close()
        self.mask_file.close()

    def summary(self, domain_names: list[str]) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "loss_tokens": self.loss_tokens,
            "domains": {
                domain_names[domain]: {"tokens": self.domain_tokens[domain], "documents": documents}
                for domain, documents in sorted(self.domain_documents.items())
            },
        }


def _parts(document: Document, tok: Tokenizer) -> list[Part]:
    """How a document is encoded: a conversation we rendered in its parts (message text as plain text), one a
    model's own template rendered as it is, and plain text as plain text between the tokenizer's bos and eos
    (so `<|system|>` written in a document is never a control token)."""
    if document.parts is not None:
        return list(document.parts)
    if document.assistant_chars is not None:
        return [(document.text, True)]
    return [(tok.bos_token or "", True), (document.text, False), (tok.eos_token, True)]


def pieces(text: str, limit: int = PIECE_CHARS) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `limit` characters covering `text`, each cut just before a space
    that follows a non-space: there the pre-tokenizer splits anyway, so encoding the pieces gives the
    ids of the whole text. A stretch without such a space is cut at `limit`."""
    ranges = []
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit + 1)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = start + limit
        ranges.append((start, cut))
        start = cut
    ranges.append((start, len(text)))
    return ranges


def encode_in_pieces(
    encode: Callable[[list[str]], list[Any]], texts: list[str], chunk_chars: int, *, offsets: bool = False
) -> list[Any]:
    """`encode(texts)` (per text a list of ids, or of (start, end) offsets with `offsets`) with long
    texts sent as `pieces` and about `chunk_chars` characters per call, so memory stays bounded. The
    pieces' results are joined: ids as one uint32 array, offsets shifted back into the whole text."""
    results: list[Any] = [None] * len(texts)
    parts: dict[int, list[Any]] = {}
    pending: list[tuple[int, int, str, bool]] = []  # (text index, piece start, piece, whole text)
    size = 0

    def flush() -> None:
        for (index, start, _, whole), result in zip(pending, encode([p[2] for p in pending]), strict=True):
            if whole:
                results[index] = result
            elif offsets:
                parts.setdefault(index, []).extend((a + start, b + start) for a, b in result)
            else:
                parts.setdefault(index, []).append(np.asarray(result, dtype=TOKEN_DTYPE))
        pending.clear()

    for index, text in enumerate(texts):
        ranges = pieces(text, min(PIECE_CHARS, chunk_chars))
        for start, end in ranges:
            pending.append((index, start, text[start:end], len(ranges) == 1))
            size += end - start
            if size >= chunk_chars:
                flush()
                size = 0
    flush()
    for index, joined in parts.items():
        results[index] = joined if offsets else np.concatenate(joined)
    return results


def _chunks(readers: list[InputReader], chunk_bytes: int) -> Iterator[tuple[list[Document], int]]:
    """(documents, input bytes consumed since the previous chunk), across all readers in order."""
    documents: list[Document] = []
    size = 0
    reported = 0
    done_bytes = 0
    for reader in readers:
        for document in reader:
            documents.append(document)
            size += len(document.text)
            if size >= chunk_bytes:
                position = done_bytes + reader.bytes_read
                yield documents, position - reported
                documents, size, reported = [], 0, position
        done_bytes += reader.size
    yield documents, done_bytes - reported


def _prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run `items` in a background thread, `depth` items ahead (parsing overlaps tokenizing)."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    finished = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(finished)
        except BaseException as exc:  # handed to the consumer, re-raised there
            slots.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="darkhorse-prepare-reader")
    thread.start()
    try:
        while (item := slots.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.1)


def _progress(enabled: bool, console: Any = None) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        console=console,
        transient=False,
    )


def _train_tokenizer(
    readers: list[InputReader], vocab_size: int, val_fraction: float, sample_bytes: int, progress: Any
) -> Tokenizer:
    """Train BPE on up to `sample_bytes` of training-split text, streamed."""
    task = progress.add_task("training tokenizer", total=min(sample_bytes, sum(r.size for r in readers)))

    def texts() -> Iterator[str]:
        seen = shown = 0
        for reader in readers:
            for document in reader:
                encoded = document.text.encode("utf-8")
                if is_validation(encoded, val_fraction):
                    continue
                for start, end in pieces(document.text):  # bounded memory for a very long document
                    yield document.text[start:end]
                seen += len(encoded)
                if seen - shown >= 1 << 20:
                    progress.update(task, completed=min(seen, sample_bytes))
                    shown = seen
                if seen >= sample_bytes:
                    return

    tokenizer = Tokenizer.train(texts(), vocab_size=vocab_size)
    progress.update(task, completed=progress.tasks[task].total)
    return tokenizer


def _check_out_dir(out_dir: Path, files: list[Path], force: bool) -> None:
    if out_dir.exists() and not force:
        raise DarkhorseError(f"output {out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise DarkhorseError(f"output {out_dir} exists and is not a directory")
    resolved = out_dir.resolve()
    for path in files:
        if resolved in path.resolve().parents:
            raise DarkhorseError(f"output {out_dir} contains the input {path}; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not looks_prepared(out_dir):
        raise DarkhorseError(
            f"--force replaces only a prepared data dir, and {out_dir} is not one (no darkhorse meta.json); "
            "choose another --out or empty it yourself"
        )


def _resolve_tokenizer(tokenizer: Tokenizer | str | Path | None) -> Tokenizer | None:
    if tokenizer is None:
        return None
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: Tokenizer | str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    force: bool = False,
    skip_bad: bool = False,
    txt_split: str = "paragraphs",
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    console: Any = None,
    chat_renderer: ChatRenderer | None = None,
) -> PreparedData:
    """Tokenize `inputs` into the prepared directory `out_dir` and return it opened.

    `tokenizer` (a Tokenizer or a tokenizer.json path) is reused as is; otherwise a byte-level BPE of
    `vocab_size` is trained. `txt_split` decides what a document is in .txt files: "paragraphs" (split on
    blank lines) or "file". Bad records raise, or with `skip_bad` are counted in meta.json["skipped"].
    `chat_renderer` renders chat records with a model's own template (see `readers.ChatRenderer`)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DarkhorseError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    files = expand_inputs(list(inputs))
    _check_out_dir(out_dir, files, force)
    readers = [InputReader(path, txt_split=txt_split, skip_bad=skip_bad, chat_renderer=chat_renderer) for path in files]
    given_tokenizer = _resolve_tokenizer(tokenizer)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    with atomic_dir(out_dir.resolve(), force=True) as work_dir:  # _check_out_dir applied --force
        with _progress(progress, console) as bar:
            if given_tokenizer is None:
                tok = _train_tokenizer(readers, vocab_size, val_fraction, tokenizer_sample_bytes, bar)
            else:
                tok = given_tokenizer
            meta = _encode_all(readers, tok, work_dir, val_fraction, chunk_bytes, bar)
        tok.save(work_dir / "tokenizer.json")
        meta.update(
            format=FORMAT,
            vocab_size=tok.vocab_size,
            tokenizer_sha256=tok.sha256,
            special_tokens=tok.special_tokens,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            inputs=[{"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size} for path in files],
            settings={
                "val_fraction": val_fraction,
                "txt_split": txt_split,
                "trained_tokenizer": given_tokenizer is None,
            },
        )
        (work_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return open_prepared(out_dir)


def _encode_all(
    readers: list[InputReader], tok: Tokenizer, work_dir: Path, val_fraction: float, chunk_bytes: int, bar: Any
) -> dict[str, Any]:
    domain_ids: dict[str, int] = {}
    writers = {split: _SplitWriter(work_dir, split) for split in SPLITS}
    task = bar.add_task("tokenizing", total=sum(reader.size for reader in readers))
    try:
        for documents, consumed in _prefetched(_chunks(readers, chunk_bytes)):
            if not tok.has_chat_tokens and any(document.parts is not None for document in documents):
                tok.require_special_tokens("chat records")
            # long plain texts are encoded in pieces (memory stays bounded), as text: never control tokens
            encoded = tok.encode_parts_batch(
                [_parts(document, tok) for document in documents],
                run=lambda encode, texts: encode_in_pieces(encode, texts, chunk_bytes),
            )
            templated = [i for i, document in enumerate(documents) if document.assistant_chars is not None]
            spans = encode_in_pieces(
                tok.encode_offsets, [documents[i].text for i in templated], chunk_bytes, offsets=True
            )
            offsets = dict(zip(templated, spans, strict=True))
            batches: dict[str, tuple[list[list[int]], list[int], list[np.ndarray], list[int]]] = {
                s: ([], [], [], []) for s in SPLITS
            }
            for index, (document, ids) in enumerate(zip(documents, encoded, strict=True)):
                text_bytes = document.text.encode("utf-8")
                domain = domain_ids.setdefault(document.domain, len(domain_ids))
                if domain >= MAX_DOMAINS:
                    raise DarkhorseError(f"more than {MAX_DOMAINS} distinct domains (domain {document.domain!r})")
                split = "val" if is_validation(text_bytes, val_fraction) else "train"
                split_ids, split_domains, split_masks, split_bytes = batches[split]
                split_ids.append(ids)
                split_domains.append(domain)
                split_masks.append(
                    loss_mask(ids, document.chat, tok.special_tokens, offsets.get(index), document.assistant_chars)
                )
                split_bytes.append(len(text_bytes))
            for split, (split_ids, split_domains, split_masks, split_bytes) in batches.items():
                writers[split].write(split_ids, split_domains, split_masks, sum(split_bytes))
            bar.advance(task, consumed)
    finally:
        for writer in writers.values():
            writer.close()

    if not domain_ids:
        names = ", ".join(str(reader.path) for reader in readers)
        raise DarkhorseError(f"empty corpus: no documents in {names}")
    if writers["train"].tokens == 0:
        raise DarkhorseError(
            f"all {writers['val'].documents} documents fell into the validation split; lower --val-fraction"
        )
    domain_names = list(domain_ids)
    skipped = [
        {"path": str(reader.path), "count": reader.skipped, "examples": reader.skip_examples}
        for reader in readers
        if reader.skipped
    ]
    return {
        "domains": domain_names,
        "loss_mask": True,
        "splits": {split: writer.summary(domain_names) for split, writer in writers.items()},
        "skipped": skipped,
    }


def default_cache_dir() -> Path:
    root = os.environ.get("DARKHORSE_CACHE") or Path.home() / ".cache" / "darkhorse"
    return Path(root) / "prepared"


def prepare_cached(
    path: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: Tokenizer | str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    progress: bool = True,
    chat_renderer: ChatRenderer | None = None,
    renderer_key: str = "",
    skip_bad: bool = False,
) -> Path:
    """Prepare a raw file into a cache dir keyed by its content and the tokenizer settings; reuse it later.

    The key covers the file's sha256, the format version and either the given tokenizer's hash or the
    vocab size to train, so editing the file or changing a setting prepares afresh. `renderer_key` names
    the `chat_renderer` (e.g. a hash of the chat template) so a different template prepares afresh.
    `skip_bad` skips malformed records (as `prepare`) and is part of the key."""
    path = Path(path)
    if not path.is_file():
        raise DarkhorseError(f"data file not found: {path}")
    tok = _resolve_tokenizer(tokenizer)
    key_parts = {
        "format": FORMAT,
        "input": sha256_file(path),
        "tokenizer": tok.sha256 if tok else f"bpe-{vocab_size}",
        "val_fraction": val_fraction,
        "loss_mask": True,  # entries prepared before loss masks existed are prepared again
    }
    if chat_renderer is not None:
        key_parts["chat_renderer"] = renderer_key
    if skip_bad:
        key_parts["skip_bad"] = True
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    out_dir = default_cache_dir() / f"{path.stem}-{key}"
    if out_dir.exists():
        try:
            open_prepared(out_dir)
            return out_dir
        except DarkhorseError:
            remove_dir(out_dir)  # a damaged entry of our own cache: prepare it again below
    prepare(
        [path], out_dir, vocab_size=vocab_size, tokenizer=tok, val_fraction=val_fraction, force=True,
        progress=progress, chat_renderer=chat_renderer, skip_bad=skip_bad,
    )  # fmt: skip
    return out_dir
