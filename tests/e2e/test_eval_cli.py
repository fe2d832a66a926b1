"""`darkhorse eval` through the CLI: every part on a checkpoint compared with an imported HF model, JSON and
the bar chart written; bad inputs are one line (exit 2) and leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def darkhorse(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "darkhorse", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_eval_compares_a_checkpoint_with_an_hf_model(tmp_path, tiny_dense_checkpoint, llama_dir):
    llama_dir(tmp_path / "llama")
    (tmp_path / "docs.txt").write_text("one two three four five\n\nred orange yellow green blue indigo\n")
    tasks = []
    for name, word in (("counting", "one"), ("colours", "red")):
        tasks.append(tmp_path / f"{name}.jsonl")
        tasks[-1].write_text(json.dumps({"prompt": f"after {word}?", "answer": "x"}) + "\n")
    out = tmp_path / "eval.json"
    done = darkhorse("eval", "--checkpoint", tiny_dense_checkpoint, "--compare", tmp_path / "llama", "--suite",
                     "--suite-per-skill", "1", "--text", tmp_path / "docs.txt", "--tasks", *tasks, "--max-new-tokens",
                     "6", "--json", out, "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "prompt suite" in done.stdout and "side by side" in done.stdout
    models = json.loads(out.read_text())["models"]
    assert [m["checkpoint"] for m in models] == [str(tiny_dense_checkpoint), str(tmp_path / "llama")]
    for model in models:
        assert len(model["suite"]["rows"]) == 8 and model["suite"]["checked"] == 6
        assert {"thinking_used", "thinking", "answer", "tokens", "seconds"} <= set(model["suite"]["rows"][0])
        assert model["skills"]["overall"]["total"] == 6
        assert model["text"]["documents"] == 2 and model["text"]["bits_per_byte"] > 0
        assert set(model["tasks"]) == {"counting", "colours"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = darkhorse("eval", "--checkpoint", tiny_dense_checkpoint, "--json", out)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_bad_eval_inputs_are_one_line_and_write_nothing(tmp_path, tiny_dense_checkpoint):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n{oops\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    cases = {
        ("--tasks", bad): "bad.jsonl:2: malformed JSON",
        ("--tasks", tmp_path / "empty.jsonl"): "no task records",
        ("--text", tmp_path / "latin1.txt"): "latin1.txt:1: not UTF-8",
        ("--text", tmp_path / "missing"): "no such file",
    }
    for args, message in cases.items():
        out = tmp_path / "out.json"
        done = darkhorse("eval", "--checkpoint", tiny_dense_checkpoint, *args, "--json", out, "--device", "cpu")
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("darkhorse: error: ") and message in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".out.json*"))
    missing = darkhorse("eval", "--checkpoint", tmp_path / "nowhere")
    assert missing.returncode == 2 and "not found" in missing.stderr
