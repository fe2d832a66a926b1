"""The web chat page as a person uses it: a real headless Chromium (Debian's package) opens `/` of a real
`darkhorse serve` on 127.0.0.1, started with --api-key, and is driven over the Chrome DevTools Protocol:
keys typed, buttons clicked, the page read back and screenshotted. Every wait is bounded."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

websocket = pytest.importorskip("websocket", reason="websocket-client drives Chromium (pip install websocket-client)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DARKHORSE = [sys.executable, "-m", "darkhorse"]  # this checkout (conftest puts its src/ on PYTHONPATH)
API_KEY = "test-key"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Run in the background, output to a file (a pipe nobody reads would fill and stall the process)."""
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "LANG": "C.UTF-8"})


def wait_until(ready, what: str, process: subprocess.Popen, log: Path, timeout: float = 90):
    """Poll `ready()` until it returns something truthy; fail with the process's output if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}): {log.read_text()[-2000:]}")
        value = ready()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what}: not ready in {timeout} s")


@pytest.fixture
def server(tiny_dense_checkpoint, tmp_path):
    port = free_port()
    command = [*DARKHORSE, "serve", "--checkpoint", str(tiny_dense_checkpoint), "--port", str(port)]
    log = tmp_path / "server.log"
    process = start([*command, "--api-key", API_KEY], log)
    url = f"http://127.0.0.1:{port}/"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, "darkhorse serve", process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


class Page:
    """One Chromium tab over the DevTools protocol (flattened sessions on the browser's websocket)."""

    def __init__(self, endpoint: str):
        self.socket = websocket.create_connection(endpoint, timeout=60, suppress_origin=True)
        self.last_id = 0
        self.exceptions: list[str] = []  # uncaught JavaScript errors, from Runtime.exceptionThrown
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session=True)

    def call(self, method: str, session: bool = False, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(reply["params"]["exceptionDetails"])[:2000])
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        text = self.js("document.body.innerText")
        pytest.fail(f"page: `{expression}` still false after {timeout} s; the page says {text!r}")

    def type_into(self, selector: str, text: str, then: str | None = None) -> None:
        """Focus a field, type `text` over what it holds, and press `then` (e.g. "Enter") if given."""
        self.js(f"document.querySelector({json.dumps(selector)}).select()")
        self.call("Input.insertText", session=True, text=text)
        if then == "Enter":
            for kind in ("keyDown", "keyUp"):
                self.call("Input.dispatchKeyEvent", session=True, type=kind, key="Enter", code="Enter",
                          windowsVirtualKeyCode=13)  # fmt: skip

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element (what a person does, not element.click())."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")  # fmt: skip
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)  # fmt: skip

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            self.socket.close()


@pytest.fixture
def page(tmp_path):
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    browser = start(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--window-size=1000,900", f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "about:blank"],
        log,
    )  # fmt: skip
    port_file = profile / "DevToolsActivePort"
    try:
        lines = wait_until(lambda: port_file.exists() and port_file.read_text().split(), "chromium", browser, log, 60)
        tab = Page(f"ws://127.0.0.1:{lines[0]}{lines[1]}")
        yield tab
        tab.close()
        browser.wait(timeout=30)
    finally:
        if browser.poll() is None:
            browser.kill()
            browser.wait(timeout=30)


def test_page_streams_replies_with_a_foldable_think_block(server, page, tmp_path):
    page.call("Page.navigate", session=True, url=server)
    page.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent !== ''")
    assert "401" in page.js("document.getElementById('model').textContent")  # no key yet: the server refuses
    assert "set the API key" in page.js("document.getElementById('model').textContent")

    page.click("#settings summary")
    page.type_into("#api-key", API_KEY)
    page.type_into("#max-tokens", "24")  # leaving the key field (its change event) reloads the model list
    page.wait_for("!document.getElementById('model').textContent.includes('401')")

    # Count DOM updates inside the reply: a streamed reply grows in many steps, a buffered one in one.
    page.js("window.updates = 0; new MutationObserver((records) => { window.updates += records.length; }).observe("
            "document.getElementById('messages'), {childList: true, subtree: true, characterData: true})")  # fmt: skip
    page.type_into("#prompt", "after one?", then="Enter")
    page.wait_for("document.querySelectorAll('.msg.assistant[data-done]').length === 1")
    reply = page.js("document.querySelector('.msg.assistant').innerText")
    assert page.js("document.querySelector('.msg.error')") is None, reply
    assert page.js("document.querySelector('.msg.user .content').textContent") == "after one?"
    assert page.js("window.updates") > 5, reply
    assert " tokens, " in page.js("document.querySelector('.msg.assistant .stats').textContent")

    think = ".msg.assistant .think"
    assert page.js(f"document.querySelector('{think} .reasoning').textContent.length > 0"), reply
    was_open = page.js(f"document.querySelector('{think}').open")
    page.click(f"{think} summary")
    assert page.js(f"document.querySelector('{think}').open") is (not was_open)
    page.click(f"{think} summary")
    assert page.js(f"document.querySelector('{think}').open") is was_open

    # A second turn, thinking switched off, carries the first: the page keeps the conversation.
    page.click("#think")
    page.type_into("#prompt", "after two?", then="Enter")
    page.wait_for("document.querySelectorAll('.msg.assistant[data-done]').length === 2")
    second = "document.querySelectorAll('.msg.assistant')[1]"
    assert page.js("document.querySelector('.msg.error')") is None, page.js(f"{second}.innerText")
    assert page.js(f"{second}.querySelector('.content').textContent.trim().length > 0")
    assert page.js(f"{second}.querySelector('.think')") is None
    assert page.js("conversation.map((message) => message.role).join()") == "user,assistant,user,assistant"

    shot = base64.b64decode(page.call("Page.captureScreenshot", session=True, format="png")["data"])
    (tmp_path / "chat.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    assert page.exceptions == []
