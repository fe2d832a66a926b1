"""`darkhorse prepare` / `darkhorse download`: exit codes, one-line errors, and help that tells the truth."""

from __future__ import annotations

import inspect
import json

import pytest

from darkhorse.cli import main
from darkhorse.commands import download as download_command
from darkhorse.commands import prepare as prepare_command
from darkhorse.data.prepare import prepare
from darkhorse.data.readers import TXT_SPLITS
from darkhorse.data.sources import SOURCES


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_prepare_command_writes_a_prepared_directory(tmp_path, capsys):
    raw = _write(
        tmp_path / "train.jsonl", [json.dumps({"domain": "math", "text": f"{i} + {i} = {2 * i}"}) for i in range(60)]
    )
    assert main(["prepare", "--input", str(raw), "--out", str(tmp_path / "out"), "--vocab-size", "300"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["domains"] == ["math"] and meta["vocab_size"] <= 300
    assert "next: darkhorse train --preset tiny-cpu" in capsys.readouterr().err  # one domain: the dense preset


def test_prepare_on_domain_tagged_data_suggests_a_genesis_preset(tmp_path, capsys):
    records = [json.dumps({"domain": ("math", "code")[i % 2], "text": f"{i} + {i} = {2 * i}"}) for i in range(60)]
    raw = _write(tmp_path / "tagged.jsonl", records)
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(raw), "--out", str(out), "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    assert f"next: darkhorse train --preset genesis-tiny --data {out} --out runs/genesis" in err
    assert "(2 domains: the MoE run ends with a domain x expert routing report)" in err


def test_prepare_command_errors_are_one_line_with_exit_2(tmp_path, capsys):
    raw = _write(tmp_path / "bad.jsonl", ['{"text": "ok"}', '{"text": oops'])
    assert main(["prepare", "--input", str(raw), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"darkhorse: error: {raw}:2: malformed JSON")
    assert not (tmp_path / "out").exists()

    args = [
        "prepare",
        "--input",
        str(raw),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--skip-bad",
        "--vocab-size",
        "300",
    ]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_prepare_help_quotes_the_real_defaults(capsys):
    defaults = inspect.signature(prepare).parameters
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {defaults['vocab_size'].default})" in help_text
    assert f"(default {defaults['val_fraction'].default})" in help_text
    assert f"(default {defaults['tokenizer_sample_bytes'].default / 2**20:g})" in help_text
    assert prepare_command.TXT_DOCUMENTS == TXT_SPLITS


def test_download_command_names_every_source_and_converts_local_files(tmp_path, capsys):
    assert set(download_command.NAMES) == set(SOURCES)
    local = _write(tmp_path / "p.jsonl", [json.dumps({"instruction": "Hi?", "input": "", "output": "Hello."})])
    argv = ["download", "open-platypus", "--from-file", str(local), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "wrote 1 conversations" in capsys.readouterr().out
    assert main(["download", "nope", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("darkhorse: error: unknown dataset 'nope'")
