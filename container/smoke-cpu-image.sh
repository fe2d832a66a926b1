#!/usr/bin/env bash
# CI smoke test of the CPU image (make image-smoke, after make image): `darkhorse serve` runs in the
# container on a tiny checkpoint made on the host and answers, over 127.0.0.1, the web page and one chat
# request. Bounded: the server gets 120 s to come up, each request 60 s.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/darkhorse-cpu:latest}
PYTHON=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
name=darkhorse-smoke-$$
trap 'podman rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$PYTHON" tools/tiny_checkpoint.py "$work/ckpt/final"
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman run -d --name "$name" --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    -p "127.0.0.1:$port:8000" -v "$work/ckpt/final:/ckpt:ro" "$IMAGE" \
    serve --checkpoint /ckpt --host 0.0.0.0 --port 8000 >/dev/null

if ! "$PYTHON" - "http://127.0.0.1:$port" "$name" <<'PY'; then
import json
import subprocess
import sys
import time
import urllib.request

base, name = sys.argv[1:]


def request(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    with urllib.request.urlopen(urllib.request.Request(base + path, data, headers), timeout=60) as response:
        return response.status, response.read().decode()


deadline = time.monotonic() + 120
while True:
    try:
        if request("/health")[0] == 200:
            break
    except OSError:
        pass
    running = subprocess.run(["podman", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
    if running.stdout.strip() != "true" or time.monotonic() > deadline:
        sys.exit("smoke: the server did not come up")
    time.sleep(1)

status, page = request("/")
assert status == 200 and "<title>darkhorse" in page, "smoke: / does not serve the web chat page"
status, text = request("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
reply = json.loads(text)
assert status == 200 and reply["object"] == "chat.completion", text
assert reply["choices"][0]["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] >= 1, text
print(f"smoke: {base} served the page and answered: {reply['choices'][0]['message']!r}")
PY
    echo "smoke: failed; the container's log:" >&2
    podman logs "$name" >&2 || true
    exit 1
fi
