"""lm-evaluation-harness's `local-completions` against the server (a real uvicorn on 127.0.0.1): its
loglikelihoods, read from prompt logprobs with echo and tokenized by the server's own /tokenize, give the
bits per byte `darkhorse eval --text` gives on the same documents (one of them several windows long)."""

from __future__ import annotations

import json

import pytest

from darkhorse.cli import main
from tests.eval.test_lm_eval_parity import lm_eval_bits_per_byte
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
    model_args = (f"base_url={live.url}/v1/completions,model={MODEL_NAME},tokenizer_backend=remote,"
                  f"max_length={MAX_LENGTH},num_concurrent=4,max_retries=1,"
                  f"custom_prefix_token_id={tokenizer.bos_id}")  # fmt: skip
    theirs, data = lm_eval_bits_per_byte(tmp_path, tiny_words, "local-completions", model_args, "--batch_size", "2",
                                         env={"OPENAI_API_KEY": "none", "NO_PROXY": "127.0.0.1"})  # fmt: skip

    out = tmp_path / "darkhorse.json"
    assert main(["eval", "--checkpoint", str(tiny_dense_checkpoint), "--text", str(data), "--window", str(WINDOW),
                 "--json", str(out), "--device", "cpu"]) == 0  # fmt: skip
    ours = json.loads(out.read_text())["models"][0]["text"]
    assert ours["window"] == WINDOW
    assert theirs == pytest.approx(ours["bits_per_byte"], rel=1e-4)  # the same sums, up to float rounding
