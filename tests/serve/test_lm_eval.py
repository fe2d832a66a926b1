"""lm-evaluation-harness's `local-completions` against the server (a real uvicorn on 127.0.0.1): its
loglikelihoods, read from prompt logprobs with echo and tokenized by the server's own /tokenize, give the
bits per byte `darkhorse eval --text` gives on the same documents (one of them several windows long)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from darkhorse.cli import main
from tests.eval.test_lm_eval_parity import TASK_YAML, documents
from tests.serve.conftest import MODEL_NAME

pytest.importorskip("lm_eval")

# lm-eval's API models send a window plus one context token and ask for one more: max_length 256 keeps the
# prompt at 255 tokens, inside the tiny model's 256-token context, with 254 scored tokens per window.
MAX_LENGTH, WINDOW = 256, 254


@pytest.mark.slow
def test_local_completions_loglikelihoods_equal_darkhorse_eval(tmp_path, live, tiny_dense_checkpoint, tiny_words):
    tokenizer = live.app.state.server.tokenizer
    # lm-eval 0.4.13's remote tokenizer takes `bos_token_id or eos_token_id` as the prefix, so darkhorse's bos
    # (id 0) reads as missing: name it, as `darkhorse eval` prefixes documents with it
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents(tiny_words)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "darkhorse_text.yaml").write_text(TASK_YAML.format(data=data))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
               "OPENAI_API_KEY": "none", "NO_PROXY": "127.0.0.1"}  # fmt: skip
    model_args = (f"base_url={live.url}/v1/completions,model={MODEL_NAME},tokenizer_backend=remote,"
                  f"max_length={MAX_LENGTH},num_concurrent=4,max_retries=1,"
                  f"custom_prefix_token_id={tokenizer.bos_id}")  # fmt: skip
    lm_eval = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "darkhorse_text", "--include_path", str(tmp_path / "tasks"), "--batch_size", "2",
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(lm_eval, env={**os.environ, **offline}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]["darkhorse_text"]["bits_per_byte,none"]

    out = tmp_path / "darkhorse.json"
    assert main(["eval", "--checkpoint", str(tiny_dense_checkpoint), "--text", str(data), "--window", str(WINDOW),
                 "--json", str(out), "--device", "cpu"]) == 0  # fmt: skip
    ours = json.loads(out.read_text())["models"][0]["text"]
    assert ours["window"] == WINDOW
    assert theirs == pytest.approx(ours["bits_per_byte"], rel=1e-4)  # the same sums, up to float rounding
