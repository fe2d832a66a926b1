"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class DarkhorseError(Exception):
    """A problem with the user's input, config or files that they can fix."""


class ConfigError(DarkhorseError):
    """A config key, value or combination that cannot work."""


class CorruptFileError(DarkhorseError):
    """A file whose bytes a library cannot parse (a truncated safetensors file, ...)."""


@contextlib.contextmanager
def parsing(path: str | os.PathLike, what: str, *kinds: type[Exception]) -> Iterator[None]:
    """Turn a parser's own exception (`kinds`) inside the block into a CorruptFileError naming `path`."""
    try:
        yield
    except kinds as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CorruptFileError(f"{os.fspath(path)}: not a valid {what} ({first})") from None


PATH_NOTE = "darkhorse path: "  # how `naming` tags an exception with the file it was about


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Tag an exception raised inside the block with `path` (unless it names one already), so the CLI's
    error line can say which file a library error was about."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, DarkhorseError) and path_of(exc) is None:
            exc.add_note(f"{PATH_NOTE}{os.fspath(path)}")
        raise


def path_of(exc: BaseException) -> str | None:
    """The file an exception is about: an OSError's own filename, else the one `naming` noted."""
    filename = getattr(exc, "filename", None)
    if filename is not None:
        return os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)
    notes = [note for note in getattr(exc, "__notes__", ()) if note.startswith(PATH_NOTE)]
    return notes[0][len(PATH_NOTE) :] if notes else None


class RankFailure(DarkhorseError):
    """Another rank of a torchrun launch died or hung: every surviving rank reports it, not only rank 0."""
