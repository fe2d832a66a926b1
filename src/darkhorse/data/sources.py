"""Instruction datasets from the Hugging Face Hub, converted to JSONL records that `prepare` reads.

Each record becomes `{"messages": [{"role", "content"}], "reasoning"?: str}`; the schema conversion is
the same code `prepare` uses on raw files (`readers.record_to_chat`), so a downloaded file and a raw
dump of the same dataset prepare identically. Downloads stream (`datasets` with `streaming=True`), so
`--max-samples` fetches only what it keeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkhorse.data.readers import RecordError, record_to_chat
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_file


@dataclass(frozen=True)
class Source:
    name: str
    repo: str
    schema: str  # what the records look like, for --help and error messages


SOURCES = {
    source.name: source
    for source in (
        Source("openhermes-2.5", "teknium/OpenHermes-2.5", "ShareGPT conversations (system/human/gpt)"),
        Source("open-platypus", "garage-bAInd/Open-Platypus", "instruction/input/output"),
        Source(
            "openthoughts-114k",
            "open-thoughts/OpenThoughts-114k",
            "system + conversations with <|begin_of_thought|> reasoning",
        ),
    )
}


def find_source(name: str) -> Source:
    """Look a dataset up by short name or hub id, ignoring case."""
    wanted = name.lower()
    for source in SOURCES.values():
        if wanted in (source.name, source.repo.lower(), source.repo.split("/")[1].lower()):
            return source
    raise DarkhorseError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")


def convert_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One hub record -> {"messages", "reasoning"?} (our chat JSONL)."""
    chat = record_to_chat(record)
    if chat is None:
        raise RecordError(f"not a chat record (keys: {', '.join(sorted(record))})")
    messages, reasoning = chat
    converted: dict[str, Any] = {
        "messages": [{"role": message["role"], "content": message["content"]} for message in messages]
    }
    if reasoning:
        converted["reasoning"] = reasoning
    return converted


def convert_records(records: Iterable[Mapping[str, Any]], skipped: list[str]) -> Iterator[dict[str, Any]]:
    """Converted records; ones that cannot be converted are noted in `skipped` and left out."""
    for index, record in enumerate(records):
        try:
            yield convert_record(record)
        except RecordError as exc:
            skipped.append(f"record {index}: {exc}")


def _load_stream(source: Source, data_files: list[str] | None) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DarkhorseError("downloads need the `datasets` package: pip install 'darkhorse[interop]'") from None
    if data_files:
        builder = "parquet" if all(str(path).endswith(".parquet") for path in data_files) else "json"
        return datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True)
    return datasets.load_dataset(source.repo, split="train", streaming=True)


def download(
    name: str,
    out_dir: str | Path,
    max_samples: int | None = None,
    force: bool = False,
    data_files: list[str] | None = None,
) -> tuple[Path, int, list[str]]:
    """Write OUT_DIR/<name>.jsonl; returns (path, records written, skipped-record notes).

    `data_files` converts local copies (JSON Lines or parquet, the hub schema) instead of downloading."""
    source = find_source(name)
    if max_samples is not None and max_samples < 1:
        raise DarkhorseError(f"--max-samples must be >= 1, got {max_samples}")
    out_dir = Path(out_dir)
    out_file = out_dir / f"{source.name}.jsonl"
    for path in data_files or []:
        if not Path(path).is_file():
            raise DarkhorseError(f"--from-file {path}: file not found")
    skipped: list[str] = []
    written = 0
    with atomic_file(out_file, force=force) as temp_file, open(temp_file, "w", encoding="utf-8") as handle:
        try:
            stream = _load_stream(source, data_files)
            if max_samples is not None:
                stream = stream.take(max_samples)
            for record in convert_records(stream, skipped):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        except DarkhorseError:
            raise
        except Exception as exc:  # network, hub and file-format errors all end the same way for the user
            where = ", ".join(data_files) if data_files else f"{source.repo} on the Hugging Face Hub"
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            hint = (
                ""
                if data_files
                else f"; without network, download {source.repo}'s files elsewhere and convert them with "
                "--from-file FILE (JSON Lines or parquet)"
            )
            raise DarkhorseError(
                f"could not read {where} ({type(exc).__name__}{': ' + detail[:200] if detail else ''}){hint}"
            ) from None
        if written == 0:
            raise DarkhorseError(f"no usable records from {source.repo}")
    return out_file, written, skipped
