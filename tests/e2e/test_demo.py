"""`darkhorse demo`: guards on OUT and the budget, and a --quick run through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from darkhorse.cli import SUBCOMMANDS, main
from darkhorse.commands.demo import (
    MARKER,
    QUICK,
    _claim_out_dir,
    _export_skipped,
    _goal_lines,
    _next_commands,
    probe_step_seconds,
)
from darkhorse.config import load_run_config
from darkhorse.data.demo_corpus import SKILLS
from darkhorse.errors import DarkhorseError
from darkhorse.eval.exact_match import ExactMatchReport, Outcome


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--preset", "--minutes", "--max-steps", "--quick", "--seed", "--force", "held-out"):
        assert option in text


def test_refuses_someone_elses_directory_without_force(tmp_path, capsys):
    precious = tmp_path / "mine" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(precious.parent)]) == 2
    assert "--force" in capsys.readouterr().err
    assert precious.read_text() == "keep me" and sorted(precious.parent.iterdir()) == [precious]


def test_rejects_a_file_as_out_and_a_bad_budget(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["demo", "--quick", "--out", str(a_file)]) == 2
    for budget in (["--max-steps", "0"], ["--minutes", "-1"]):  # argparse refuses them: exit 2, a usage line
        with pytest.raises(SystemExit) as refused:
            main(["demo", *budget, "--out", str(tmp_path / "d")])
        assert refused.value.code == 2 and f"argument {budget[0]}: must be > 0" in capsys.readouterr().err
    for fixed in (["--max-steps", "300"], ["--quick"]):
        assert main(["demo", *fixed, "--min-steps", "100", "--out", str(tmp_path / "d")]) == 2
        assert "--min-steps is a floor under --minutes" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_an_earlier_demo_is_replaced_but_other_files_stay(tmp_path):
    out = tmp_path / "demo"
    (out / "run" / "final").mkdir(parents=True)
    (out / "data").mkdir()
    (out / "eval.json").write_text("{}")
    (out / MARKER).write_text("{}")
    (out / "my-notes.txt").write_text("mine")
    _claim_out_dir(out, force=False)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "my-notes.txt"]
    with pytest.raises(DarkhorseError, match="not a darkhorse demo"):
        (out / MARKER).unlink()
        _claim_out_dir(out, force=False)
    _claim_out_dir(out, force=True)
    assert (out / "my-notes.txt").read_text() == "mine"


@pytest.mark.parametrize("preset", ["genesis-demo", "demo-cpu"])
def test_next_commands_are_real_commands_that_fit_the_model(preset):
    out, checkpoint = Path("runs/demo"), Path("runs/demo/run/final")
    commands = _next_commands(out, checkpoint, out / "prepared", load_run_config(preset))
    assert all(command.split()[1] in SUBCOMMANDS for command in commands)
    assert any(command.startswith("darkhorse chat --checkpoint runs/demo/run/final") for command in commands)
    export = "darkhorse export --checkpoint runs/demo/run/final --format gguf --out runs/demo/demo.gguf"
    assert (export in commands) == (_export_skipped(load_run_config(preset)) is None)


def test_a_model_llama_cpp_cannot_run_gets_no_export_command_but_a_line_that_says_why():
    """genesis-demo's smear (model.smear=attn) has no llama.cpp architecture; model.smear=none exports."""
    for smear, exported in (("attn", False), ("kv", False), ("embed", False), ("none", True)):
        config = load_run_config("genesis-demo", overrides=[f"model.smear={smear}"])
        commands = _next_commands(Path("runs/demo"), Path("runs/demo/run/final"), Path("runs/demo/prepared"), config)
        assert any(command.startswith("darkhorse export") for command in commands) == exported
        reason = f"no GGUF export for this model: model.smear={smear} (each token's embedding mixed with the previous"
        assert _export_skipped(config) is None if exported else _export_skipped(config).startswith(reason)
    assert load_run_config("genesis-demo").model.smear == "attn"


def test_goal_lines_judge_addition_sort_and_all_skills():
    """9/10 addition and 10/10 sort meet the 90% goals; with 0/5 python the whole is 19/25 = 76% >= 70%."""
    right = {"addition": 9, "sort": 10, "python": 0}
    totals = {"addition": 10, "sort": 10, "python": 5}
    outcomes = [
        Outcome("math", skill, "q", "1", "1" if i < right[skill] else "2")
        for skill, total in totals.items()
        for i in range(total)
    ]
    assert _goal_lines(ExactMatchReport(outcomes)) == [
        "goal >= 90% on held-out addition: 90.0% (met)",
        "goal >= 90% on held-out sort: 100.0% (met)",
        "goal >= 70% over all skills: 76.0% (met)",
    ]
    outcomes[0] = Outcome("math", "addition", "q", "1", "2")
    assert _goal_lines(ExactMatchReport(outcomes))[::2] == [
        "goal >= 90% on held-out addition: 80.0% (not met)",
        "goal >= 70% over all skills: 72.0% (met)",
    ]


def test_step_probe_times_a_real_step_and_keeps_a_thread_setting(capsys, prepared_dir):
    import torch
    from rich.console import Console

    threads = torch.get_num_threads()
    small = ["model.vocab_size=64", "model.n_layers=1", "train.batch_size=2", "train.seq_len=16", "train.device=cpu"]
    config = load_run_config("tiny-cpu", overrides=small)
    try:
        assert probe_step_seconds(config, prepared_dir, Console()) > 0
        assert torch.get_num_threads() in {1, threads}
    finally:
        torch.set_num_threads(threads)
    assert "step time here (1 thread:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_second_mix_starts_half_way_in_the_first_ones_tokenizer_and_source_steps_0_turns_it_off(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    second = json.loads((out / "prepared-second" / "meta.json").read_text())
    assert second["tokenizer_sha256"] == json.loads((out / "prepared" / "meta.json").read_text())["tokenizer_sha256"]
    assert second["splits"]["val"]["tokens"] == 0  # validation stays the first mix's
    records = [json.loads(line) for line in (out / "data" / "second.jsonl").read_text().splitlines()]
    assert any(r["skill"] == "word_problem" and ": " in r["reasoning"] for r in records)  # + and - in columns
    final = json.loads((out / "run" / "final" / "meta.json").read_text())
    assert [Path(source["path"]).name for source in final["data"]] == ["prepared", "prepared-second"]
    assert final["config"]["train"]["source_steps"] == QUICK["max_steps"] // 2

    assert main(["demo", "--quick", "--out", str(out), "train.source_steps=0"]) == 0
    final = json.loads((out / "run" / "final" / "meta.json").read_text())
    assert [Path(source["path"]).name for source in final["data"]] == ["prepared"]
    assert not (out / "prepared-second").exists() and not (out / "data" / "second.jsonl").exists()


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_through_the_console_script(tmp_path):
    script = Path(sys.executable).with_name("darkhorse")
    completed = subprocess.run(
        [str(script), "demo", "--quick", "--out", "runs/demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "120", "HOME": str(tmp_path)},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = completed.stdout
    for text in ("held-out exact match", "skill addition", "domain lists", "goal >= 90%", "where everything went"):
        assert text in out
    assert "I(domain; expert)" in out, "the default demo model is Genesis: its routing table is shown"
    assert "darkhorse chat --checkpoint runs/demo/run/final" in out
    demo = tmp_path / "runs" / "demo"
    report = json.loads((demo / "eval.json").read_text())
    assert set(report["by_skill"]) == set(SKILLS)
    assert set(report["by_domain"]) == {"math", "lists", "code"}
    assert report["overall"]["total"] == 2 * len(SKILLS)
    assert report["preset"] == "genesis-demo" and set(report["routing"]["domains"]) == {"math", "lists", "code"}
    assert (demo / "run" / "final" / "model.safetensors").is_file()
    assert (demo / "prepared" / "meta.json").is_file() and (demo / "data" / "heldout.jsonl").is_file()
