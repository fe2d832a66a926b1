"""lm-evaluation-harness, the field's standard, on `darkhorse export --format hf` output: its bits_per_byte
(`lm_eval --model hf`, a local `loglikelihood_rolling` task, fully offline) equals `darkhorse eval --text` on
the same documents, including one longer than the model's context (several rolling windows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from darkhorse.cli import main

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASK_YAML = """\
task: darkhorse_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def documents(vocabulary: tuple[str, ...]) -> list[str]:
    """Short documents, one with multi-byte characters, and one longer than the 256-token context."""
    words = list(vocabulary) * 20
    docs = [" ".join(words[k : k + 5 + 7 * k]) + "." for k in range(6)]
    docs.append("Ünïcödé text: café, naïve — 😀 and " + " ".join(words[:30]))
    docs.append(" ".join(words[:400]))
    return docs


def lm_eval_bits_per_byte(tmp_path, words: tuple[str, ...], model: str, model_args: str, *args: str, env=None):
    """(lm-eval's bits per byte of `documents(words)` as the local `darkhorse_text` task, the .jsonl it read):
    `lm_eval run --model MODEL`, offline, in a child process."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents(words)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "darkhorse_text.yaml").write_text(TASK_YAML.format(data=data))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
    lm_eval = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
               "--tasks", "darkhorse_text", "--include_path", str(tmp_path / "tasks"), *args,
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(lm_eval, env={**os.environ, **offline}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    return json.loads(results.read_text())["results"]["darkhorse_text"]["bits_per_byte,none"], data


@pytest.mark.slow
def test_lm_eval_bits_per_byte_equals_darkhorse_eval(tmp_path, tiny_dense_checkpoint, tiny_words):
    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tiny_dense_checkpoint), "--format", "hf", "--out", str(hf_dir)]) == 0
    theirs, data = lm_eval_bits_per_byte(
        tmp_path, tiny_words, "hf", f"pretrained={hf_dir},dtype=float32", "--device", "cpu", "--batch_size", "4"
    )

    out = tmp_path / "darkhorse.json"
    assert main(["eval", "--checkpoint", str(tiny_dense_checkpoint), "--text", str(data), "--json", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    ours = json.loads(out.read_text())["models"][0]["text"]
    assert ours["window"] == 256 and ours["bytes"] == sum(len(doc.encode()) for doc in documents(tiny_words))
    assert theirs == pytest.approx(ours["bits_per_byte"], rel=0.01)  # the bar
    assert theirs == pytest.approx(ours["bits_per_byte"], rel=1e-4)  # in fact: the same sums, up to float rounding
