"""A user's own tasks: a JSON Lines file of `{"prompt", "answer"}` or `{"messages", "answer"}` records.

Each record becomes a chat record for `exact_match.evaluate_exact_match` (the prompt as a user turn, or
the messages as they are, then the answer as the assistant's turn). Optional "domain" and "skill" tags
group the report. Every problem is named `file:line`, and nothing is evaluated until the whole file
has been read, so a bad line costs no model time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from darkhorse.errors import DarkhorseError

ROLES = ("system", "user", "assistant")


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DarkhorseError(f'{where}: \'messages\' must be a non-empty list of {{"role", "content"}} objects')
    for index, message in enumerate(value):
        if not (
            isinstance(message, Mapping) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        ):
            raise DarkhorseError(f"{where}: message {index} needs a role ({', '.join(ROLES)}) and text content")
    if value[-1]["role"] == "assistant":
        raise DarkhorseError(f"{where}: the messages must end with the user's turn; the reply goes in 'answer'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def task_record(record: Any, where: str) -> dict[str, Any]:
    """The chat record (prompt messages + expected answer as the assistant turn) of one task line."""
    if not isinstance(record, Mapping):
        raise DarkhorseError(f'{where}: expected a JSON object with "prompt" (or "messages") and "answer"')
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise DarkhorseError(f'{where}: "answer" must be a non-empty string or number')
    if "messages" in record:
        messages = _messages(record["messages"], where)
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise DarkhorseError(f'{where}: needs a non-empty "prompt" string or a "messages" list')
    return {
        "domain": record.get("domain"),
        "skill": record.get("skill"),
        "messages": [*messages, {"role": "assistant", "content": str(answer)}],
    }


def read_tasks(path: str | Path) -> list[dict[str, Any]]:
    """All records of a task file, checked; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise DarkhorseError(f"--tasks {path}: no such file")
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DarkhorseError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DarkhorseError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            records.append(task_record(record, where))
    if not records:
        raise DarkhorseError(f"--tasks {path}: no task records (the file is empty)")
    return records
