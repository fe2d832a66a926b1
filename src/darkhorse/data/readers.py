"""Input formats: every supported file streams out as `Document(text, domain)`, one record at a time.

Formats are picked by extension and confirmed by content (`.txt`, `.jsonl`, `.json` as JSON Lines or one
JSON array, `.parquet`; other extensions are sniffed). A record becomes a document by its fields:

* `{"text"}` or `{"domain", "text"}`: the text as is;
* `{"messages": [{"role", "content"}]}` with optional reasoning ("reasoning"/"reasoning_content"/"thinking"
  on the record or on the last assistant message);
* ShareGPT `{"conversations": [{"from", "value"}]}` (OpenHermes-2.5), with an optional top-level "system"
  (OpenThoughts, whose assistant values wrap reasoning in <|begin_of_thought|>...<|end_of_thought|> and the
  answer in <|begin_of_solution|>...<|end_of_solution|>);
* `{"instruction", "input"?, "output"}` (Open-Platypus, Alpaca).

Chat records are rendered by `chat_format.conversation_parts`. A record without "domain" is "general".
Memory holds one record at a time; the exception is `txt_split="file"`, where a whole .txt file is one
document and so is held whole.
Errors name `file:line` (JSON Lines) or `file: element N` (JSON arrays); with `skip_bad`, bad records are
counted and skipped instead.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from darkhorse.data.chat_format import Part, conversation_parts, message_reasoning
from darkhorse.errors import DarkhorseError

DEFAULT_DOMAIN = "general"
TXT_SPLITS = ("paragraphs", "file")
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
THOUGHT_PATTERN = re.compile(
    r"<\|begin_of_thought\|>(?P<thought>.*?)(?:<\|end_of_thought\|>|$)\s*"
    r"(?:<\|begin_of_solution\|>(?P<solution>.*?)(?:<\|end_of_solution\|>|$))?",
    re.DOTALL,
)
SKIP_EXAMPLES = 5  # locations of skipped records kept for the report
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Document:
    text: str
    domain: str = DEFAULT_DOMAIN
    chat: bool = False  # a rendered conversation: its loss mask covers only the assistant's part
    # Set when a model's own chat template rendered it: the [start, end) character ranges the
    # assistant wrote (the loss mask follows them; the template did the framing, so none is added).
    assistant_chars: tuple[tuple[int, int], ...] | None = None
    # Set when darkhorse's chat format rendered it: `text` in (text, is markup) parts, so the message
    # text inside is encoded as plain characters (chat_format.conversation_parts).
    parts: tuple[Part, ...] | None = field(default=None, compare=False)  # `text`, in pieces


# A model's own chat template: (messages, reasoning) -> (text, assistant character ranges).
ChatRenderer = Callable[[Sequence[Mapping[str, Any]], "str | None"], tuple[str, list[tuple[int, int]]]]


class RecordError(ValueError):
    """A record that cannot become a document; the reader adds where it is."""


# ---- records -> conversations and documents ---------------------------------------------------------


def split_thought(value: str) -> tuple[str | None, str]:
    """OpenThoughts' assistant value -> (reasoning, answer); plain values pass through as the answer."""
    match = THOUGHT_PATTERN.search(value)
    if not match:
        return None, value
    solution = match.group("solution")
    answer = solution if solution is not None else value[: match.start()] + value[match.end() :]
    return match.group("thought").strip() or None, answer.strip()


def _sharegpt_messages(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("'conversations' is not a non-empty list")
    messages = []
    reasoning = None
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise RecordError(f"conversations[{index}] has no text 'value'")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RecordError(
                f"conversations[{index}] has from={turn.get('from')!r}; expected system, human/user or gpt/assistant"
            )
        content = turn["value"]
        if role == "assistant":
            reasoning, content = split_thought(content)
        if role == "system" and messages and messages[0]["role"] == "system":
            continue  # the record-level system prompt already stands first
        messages.append({"role": role, "content": content})
    return messages, reasoning


def _instruction_messages(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise RecordError("'instruction' and 'output' must both be strings")
    prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], None


def record_to_chat(record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None] | None:
    """(messages, reasoning) for a chat-shaped record of any supported schema; None for text records."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise RecordError("'messages' is not a list")
        reasoning = message_reasoning(record)
        system = record.get("system")
        if isinstance(system, str) and system.strip() and not (messages and _role(messages[0]) == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        return messages, reasoning
    if "conversations" in record:
        return _sharegpt_messages(record)
    if "instruction" in record and "output" in record:
        return _instruction_messages(record)
    return None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, Mapping) else None


def record_to_document(record: Any, chat_renderer: ChatRenderer | None = None) -> Document:
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    domain = record.get("domain", DEFAULT_DOMAIN)
    if not isinstance(domain, str) or not domain.strip():
        raise RecordError("'domain' must be a non-empty string")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise RecordError("record has an empty or non-string 'text'")
        return Document(text, domain.strip())
    chat = record_to_chat(record)
    if chat is None:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError(
            "record has no text: expected 'text', 'messages', 'conversations' or 'instruction'/'output' "
            f"(its keys: {keys})"
        )
    messages, reasoning = chat
    try:
        if chat_renderer is not None:
            text, spans = chat_renderer(messages, reasoning)
            return Document(text, domain.strip(), chat=True, assistant_chars=tuple(spans))
        parts = tuple(conversation_parts(messages, reasoning))
        return Document("".join(text for text, _ in parts), domain.strip(), chat=True, parts=parts)
    except DarkhorseError as exc:
        raise RecordError(str(exc)) from None


# ---- files -> documents ---------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """'txt', 'jsonl', 'json-array' or 'parquet', from the extension and the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        raise DarkhorseError(f"{path}: not a parquet file (no PAR1 header)")
    if suffix == ".txt":
        return "txt"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[" and suffix != ".jsonl":
        return "json-array"
    if first == b"{":
        return "jsonl"
    if suffix in (".jsonl", ".json"):
        if not first:
            return "jsonl"  # empty file: no records; the empty-corpus check reports it
        raise DarkhorseError(f"{path}:1: expected JSON objects (one per line), got {head[:20]!r}")
    return "txt"


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Input paths as files: directories contribute their supported files, sorted."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise DarkhorseError(f"input directory {path} holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif not path.exists():
            raise DarkhorseError(f"input file not found: {path}")
        else:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise DarkhorseError(f"cannot read input file {path}: {exc.strerror}") from None
            files.append(path)
    if not files:
        raise DarkhorseError("no input files given (--input PATH)")
    return files


@dataclass
class InputReader:
    """Streams one file's documents; `bytes_read` follows progress, bad records are counted."""

    path: Path
    txt_split: str = "paragraphs"
    skip_bad: bool = False
    bytes_read: int = 0
    skipped: int = 0
    skip_examples: list[str] = field(default_factory=list)
    chat_renderer: ChatRenderer | None = None  # None: darkhorse's chat format

    def __post_init__(self) -> None:
        if self.txt_split not in TXT_SPLITS:
            raise DarkhorseError(f"txt split must be one of {', '.join(TXT_SPLITS)}, got {self.txt_split!r}")
        self.format = detect_format(self.path)
        self.size = self.path.stat().st_size

    def __iter__(self) -> Iterator[Document]:
        self.bytes_read = self.skipped = 0
        self.skip_examples = []
        readers = {"txt": self._txt, "jsonl": self._jsonl, "json-array": self._json_array, "parquet": self._parquet}
        try:
            yield from readers[self.format]()
        except OSError as exc:
            raise DarkhorseError(f"cannot read input file {self.path}: {exc.strerror or exc}") from None
        self.bytes_read = self.size

    def _bad(self, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise DarkhorseError(f"{where}: {reason} (use --skip-bad to skip such records)")
        self.skipped += 1
        if len(self.skip_examples) < SKIP_EXAMPLES:
            self.skip_examples.append(f"{where}: {reason}")

    def _document(self, record: Any, where: str) -> Document | None:
        try:
            return record_to_document(record, self.chat_renderer)
        except RecordError as exc:
            self._bad(where, str(exc))
            return None

    def _lines(self, handle: BinaryIO) -> Iterator[tuple[int, str]]:
        for number, raw in enumerate(handle, start=1):
            self.bytes_read += len(raw)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DarkhorseError(f"{self.path}:{number}: not UTF-8 text") from None

    def _txt(self) -> Iterator[Document]:
        with open(self.path, "rb") as handle:
            if self.txt_split == "file":
                lines = [line for _, line in self._lines(handle)]
                text = "".join(lines)
                if text.strip():
                    yield Document(text)
                return
            paragraph: list[str] = []
            for _, line in self._lines(handle):
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield Document("".join(paragraph).rstrip("\r\n"))
                    paragraph = []
            if paragraph:
                yield Document("".join(paragraph).rstrip("\r\n"))

    def _jsonl(self) -> Iterator[Document]:
        with open(self.path, "rb") as handle:
            for number, line in self._lines(handle):
                if not line.strip():
                    continue
                where = f"{self.path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    self._bad(where, f"malformed JSON ({exc.msg} at column {exc.colno})")
                    continue
                except RecursionError:
                    self._bad(where, "JSON nested too deeply")
                    continue
                document = self._document(record, where)
                if document is not None:
                    yield document

    def _json_array(self) -> Iterator[Document]:
        for index, record in enumerate(self._array_elements()):
            document = self._document(record, f"{self.path}: element {index}")
            if document is not None:
                yield document

    def _array_elements(self) -> Iterator[Any]:
        """Elements of a top-level JSON array, decoded one at a time so memory stays bounded."""
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        buffer, pos, index = "", 0, 0
        expect = "["
        with open(self.path, "rb") as handle:

            def refill() -> bool:
                nonlocal buffer, pos
                chunk = handle.read(_READ_CHUNK)
                self.bytes_read += len(chunk)
                try:
                    buffer = buffer[pos:] + utf8.decode(chunk, final=not chunk)
                except UnicodeDecodeError:
                    raise DarkhorseError(f"{self.path}: not UTF-8 text") from None
                pos = 0
                return bool(chunk)

            while True:
                while pos < len(buffer) and buffer[pos].isspace():
                    pos += 1
                if pos == len(buffer):
                    if not refill():
                        if expect == "end":
                            return
                        raise DarkhorseError(f"{self.path}: JSON array ends early (after element {index})")
                    continue
                char = buffer[pos]
                if expect == "end":
                    raise DarkhorseError(f"{self.path}: unexpected data after the JSON array")
                if expect == "[":
                    if char != "[":
                        raise DarkhorseError(f"{self.path}: expected a JSON array")
                    pos, expect = pos + 1, "first"
                    continue
                if char == "]" and expect in ("first", ","):
                    pos, expect = pos + 1, "end"
                    continue
                if expect == ",":
                    if char != ",":
                        raise DarkhorseError(f"{self.path}: element {index}: expected ',' or ']' in JSON array")
                    pos, expect = pos + 1, "value"
                    continue
                try:
                    record, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as exc:
                    if refill():
                        continue
                    raise DarkhorseError(f"{self.path}: element {index}: malformed JSON ({exc.msg})") from None
                except RecursionError:
                    raise DarkhorseError(f"{self.path}: element {index}: JSON nested too deeply") from None
                pos, expect = end, ","
                yield record
                index += 1

    def _parquet(self) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DarkhorseError(
                f"{self.path}: reading parquet needs pyarrow (pip install 'darkhorse[interop]')"
            ) from None
        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for damaged files
            raise DarkhorseError(f"{self.path}: unreadable parquet file ({exc})") from None
        total_rows = max(parquet.metadata.num_rows, 1)
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                document = self._document(record, f"{self.path}: row {row}")
                if document is not None:
                    yield document
            self.bytes_read = self.size * row // total_rows
