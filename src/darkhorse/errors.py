"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class DarkhorseError(Exception):
    """A problem with the user's input, config or files that they can fix."""


class ConfigError(DarkhorseError):
    """A config key, value or combination that cannot work."""


PATH_NOTE = "darkhorse path: "  # how `naming` tags an exception with the file it was about


@contextlib.contextmanager
def naming(path: str | os.PathLike, kind: type[Exception] = Exception) -> Iterator[None]:
    """Tag an exception of `kind` raised inside the block with `path` (unless it names one already), so
    the CLI's error line can say which file a library error was about."""
    try:
        yield
    except kind as exc:
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
