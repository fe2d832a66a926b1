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
from collections.abc import Iterator
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


@contextlib.contextmanager
def _staged(target: str | Path, *, force: bool, is_dir: bool) -> Iterator[Path]:
    target = Path(target)
    if target.exists() and not force:
        raise DarkhorseError(f"{target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(target.parent, target.name)  # what an earlier, killed write of it left
    holder = Path(tempfile.mkdtemp(prefix=_partial_name(target.name), dir=target.parent))
    staged = holder / target.name
    try:
        if is_dir:
            staged.mkdir()
        yield staged
        _fsync_tree(staged)
        if is_dir and target.exists():
            target.rename(holder / "replaced")  # a dir cannot be renamed over; the old one goes with the holder
        os.replace(staged, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DarkhorseError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise DarkhorseError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
