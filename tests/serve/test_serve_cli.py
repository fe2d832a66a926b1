"""`darkhorse serve` itself: a real process on 127.0.0.1 answering the openai client, and one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from darkhorse.cli import main


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert main(["serve", "--checkpoint", str(tmp_path), "--max-batch", "0"]) == 2
    assert main(["serve", "--checkpoint", str(tmp_path), "--threads", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("darkhorse: error: ") for line in lines)


@pytest.mark.slow
def test_serve_answers_the_openai_client(tiny_dense_checkpoint):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "darkhorse", "serve", "--checkpoint", str(tiny_dense_checkpoint),
               "--port", str(port), "--api-key", "sesame"]  # fmt: skip
    server = subprocess.Popen(command, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "darkhorse serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [tiny_dense_checkpoint.parent.name]  # not "final"
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "after one?"}])
        # a chat reply is not cut at the completions default of 16 tokens: it stops on its own or runs longer
        # (which, depends on the tiny model's weights, which float rounding in its training moves)
        finish, count = reply.choices[0].finish_reason, reply.usage.completion_tokens
        assert (finish == "stop" and count >= 1) or (finish == "length" and count > 16), (finish, count)
    finally:
        server.terminate()
        server.wait(timeout=30)
