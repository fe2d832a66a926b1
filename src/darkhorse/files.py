"""Writing outputs so a crash never leaves half a file, and reading JSON with errors a user can act on.

Every output darkhorse writes (checkpoints, prepared data, downloads, exports, GGUF files) is built
under a hidden temp dir beside its target, `.NAME.partial-PID-XXXXXXXX/NAME`, fsynced, then renamed onto
the target and the parent dir fsynced: after a crash the target is either the old one or the new one,
and what is left over is a `.partial-` dir that `remove_partial_writes` clears (the next write of the same
target does, and a run clears its run dir on start). Deleting a directory goes the same way round:
`remove_dir` first renames it to a hidden `.partial-` name, so a delete that is killed half-way never
leaves a half-deleted directory under its valid name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from darkhorse.errors import DarkhorseError

PARTIAL_MARK = ".partial-"  # in the name of every temp dir an atomic write stages in


def _partial_name(name: str) -> str:
    """Prefix of a temp dir staging `name` for this process (its pid tells a dead writer's leftovers)."""
    return f".{name}{PARTIAL_MARK}{os.getpid()}-"


def _owner_alive(partial: Path) -> bool:
    """Whether the process that made the `.partial-PID-` dir `partial` still runs (False: a leftover)."""
    pid = partial.name.partition(PARTIAL_MARK)[2].partition("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or a dir with everything under it, to disk before it is renamed into place."""
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):  # files before the dirs that list them
            _fsync(child)
    _fsync(path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staged(target: str | Path, *, force: bool, is_dir: bool) -> Iterator[Path]:
    target = Path(target)
    if target.exists() and not force:
        raise DarkhorseError(f"{target} already exists; pass --force to replace it")
    with _naming_output(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(target.parent, target.name)  # what an earlier, killed write of it left
        holder = Path(tempfile.mkdtemp(prefix=_partial_name(target.name), dir=target.parent))
    staged = holder / target.name
    try:
        with _naming_output(target):
            if is_dir:
                staged.mkdir()
            yield staged
            if not is_dir:  # whatever wrote it (llama.cpp, a library's mkstemp), a file gets the mode open() gives
                staged.chmod(0o666 & ~_umask())
            _fsync_tree(staged)
            if is_dir and target.exists():
                target.rename(holder / "replaced")  # a dir cannot be renamed over; the old one goes with the holder
            os.replace(staged, target)
            _fsync(target.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def _naming_output(target: Path) -> Iterator[None]:
    """An OSError while staging `target` (a full disk, a read-only dir) names `target`, not the hidden
    temp path it happened on, nor nothing (a failed write has no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and (exc.filename is None or PARTIAL_MARK in os.fsdecode(exc.filename)):
            exc.filename, exc.filename2 = str(target), None
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, *, force: bool) -> Iterator[Path]:
    """A path to write the file into; it becomes `target` only if the block finishes.

    An existing `target` is replaced only with `force` (the CLI's --force). The path's parent is a
    private temp dir, removed afterwards whatever happens.
    """
    target = Path(target)
    if target.is_dir():
        raise DarkhorseError(f"{target} is a directory; give a file name")
    with _staged(target, force=force, is_dir=False) as staged:
        yield staged


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, force: bool) -> Iterator[Path]:
    """An empty dir to fill; it becomes `target` (replacing an old one) only if the block finishes.

    An existing `target` is replaced only with `force` (the CLI's --force). The dir's parent is a
    private temp dir, removed afterwards whatever happens: scratch files may go there.
    """
    with _staged(target, force=force, is_dir=True) as staged:
        yield staged


def remove_partial_writes(folder: str | Path, name: str | None = None) -> None:
    """Temp dirs left in `folder` by atomic writes (of `name`, default any) or deletes whose process is
    gone; they never hold anything usable. A live process's are left alone: it is still writing."""
    pattern = "*" if name is None else glob.escape(name)
    for stale in Path(folder).glob(f".{pattern}{PARTIAL_MARK}*"):
        if stale.is_dir() and not _owner_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)


def remove_dir(folder: str | Path) -> None:
    """Delete `folder`: renamed to a hidden `.partial-` name first (one atomic step), then removed, so
    a kill half-way leaves a leftover `remove_partial_writes` clears, never a half-deleted `folder`."""
    folder = Path(folder)
    trash = Path(tempfile.mkdtemp(prefix=_partial_name(folder.name), dir=folder.parent))
    folder.rename(trash / folder.name)
    _fsync(folder.parent)
    shutil.rmtree(trash)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; invalid JSON is a DarkhorseError naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DarkhorseError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return parse_json_object(text, path)


def parse_json_object(text: str, source: str | Path) -> dict[str, Any]:
    """The JSON object in `text` (read from `source`); anything else is a DarkhorseError naming `source`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DarkhorseError(f"{source}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise DarkhorseError(f"{source}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise DarkhorseError(f"{source}: expected a JSON object, found {type(data).__name__}")
    return data


def contained(folder: str | Path, name: object, source: str | Path) -> Path:
    """`folder / name` for a file name that a file (`source`) gives, refused when it could leave `folder`.

    The check is on the name itself (absolute, or any `..` part), not on where symlinks lead: a Hugging
    Face cache snapshot is a dir of symlinks into a blob store, and those are the user's own layout."""
    if not isinstance(name, str) or not name.strip():
        raise DarkhorseError(f"{source}: expected a file name, found {name!r}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name:
        raise DarkhorseError(f"{source}: file name {name!r} points outside {folder}; refusing to read it")
    return Path(folder) / name


JSON_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
              dict: "an object"}  # fmt: skip


def check_fields(
    path: str | Path, data: dict[str, Any], types: dict[str, type], nullable: Collection[str] | None = None
) -> None:
    """Refuse a JSON object whose fields have the wrong JSON type, naming the file and the field.

    `types` maps field -> int, float (an integer passes too), str, bool, list or dict; a missing field passes
    (whoever reads it decides whether it is needed), and so does null, for the `nullable` fields only when
    they are given. A bool is never a number."""
    if not isinstance(data, dict):
        raise DarkhorseError(f"{path}: expected a JSON object, found {type(data).__name__}")
    for key, expected in types.items():
        if key not in data or data[key] is None and (nullable is None or key in nullable):
            continue
        value = data[key]
        allowed = (int, float) if expected is float else expected
        if isinstance(value, bool) and expected is not bool or not isinstance(value, allowed):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise DarkhorseError(f"{path}: field '{key}' must be {JSON_TYPES[expected]}, got {shown}")
