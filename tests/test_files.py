"""Atomic writes (a failed writer leaves the old output and no debris) and the JSON-object reader."""

from __future__ import annotations

import os

import pytest

from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir, atomic_file, read_json_object, remove_dir, remove_partial_writes


def test_atomic_file_replaces_only_when_the_writer_finishes(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer died"), atomic_file(target, force=True) as temp:
        temp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_file(target, force=True) as temp:
        assert temp.name == "out.txt" and temp.parent != tmp_path  # staged under its own name, elsewhere
        temp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_file_refuses_an_existing_output_without_force_and_a_directory(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    refused = pytest.raises(DarkhorseError, match="out.txt already exists; pass --force to replace it")
    with refused, atomic_file(tmp_path / "out.txt", force=False):
        pytest.fail("the block must not run")
    with pytest.raises(DarkhorseError, match="is a directory"), atomic_file(tmp_path, force=True):
        pytest.fail("the block must not run")
    with atomic_file(tmp_path / "new" / "deeper.txt", force=False) as temp:  # parents are created
        temp.write_text("x")
    assert (tmp_path / "new" / "deeper.txt").read_text() == "x"


def test_atomic_dir_replaces_an_old_dir_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target, force=True) as temp:
        (temp / "b").write_text("half")
        (temp.parent / "scratch").write_text("scratch space beside the staged dir is removed too")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(target, force=True) as temp:
        assert temp.is_dir() and not any(temp.iterdir())
        (temp / "sub").mkdir()
        (temp / "sub" / "b").write_text("new")
    assert [p.name for p in target.iterdir()] == ["sub"] and (target / "sub" / "b").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(DarkhorseError, match="already exists"), atomic_dir(target, force=False):
        pytest.fail("the block must not run")


def test_remove_partial_writes_clears_what_a_killed_write_left(tmp_path):
    (tmp_path / ".out.partial-abc123" / "out").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / ".hidden").mkdir()
    remove_partial_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "out"]


def test_the_next_write_clears_leftovers_of_dead_writers_only(tmp_path):
    dead = tmp_path / ".out.partial-999999999-abc"  # a pid no process has: its writer was killed
    live = tmp_path / f".out.partial-{os.getppid()}-abc"  # a live process still writing
    for leftover in (dead, live):
        (leftover / "out").mkdir(parents=True)
    with atomic_dir(tmp_path / "out", force=False) as staged:
        (staged / "file").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_remove_dir_never_leaves_a_half_deleted_dir_under_its_name(tmp_path, monkeypatch):
    folder = tmp_path / "step-000002"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a").write_text("a")

    def killed(path, *args, **kwargs):  # the delete stops half-way, as a kill would stop it
        raise KeyboardInterrupt

    monkeypatch.setattr("darkhorse.files.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(folder)
    assert not folder.exists() and [p.name.startswith(".step-000002.partial-") for p in tmp_path.iterdir()] == [True]


def test_read_json_object_names_file_and_line(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json_object(good) == {"a": 1}
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(DarkhorseError, match=r"^.*bad\.json:4: invalid JSON \(Expecting value\)$"):
        read_json_object(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(DarkhorseError, match=r"list\.json: expected a JSON object, found list"):
        read_json_object(listed)


def test_an_atomic_file_gets_the_mode_open_gives_whatever_wrote_it(tmp_path):
    target = tmp_path / "model.gguf"
    with atomic_file(target, force=False) as temp:
        os.close(os.open(temp, os.O_CREAT | os.O_WRONLY, 0o600))  # as a writer using mkstemp would
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
