"""The server over the tiny dense checkpoint: in-process (httpx's ASGI transport) and on a real uvicorn
bound to 127.0.0.1 on a port the system picks. Nothing leaves this machine."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from darkhorse.checkpoint import load_for_inference
from darkhorse.serve.app import create_app

MODEL_NAME = "tiny"


@pytest.fixture(scope="session")
def tiny_model(tiny_dense_checkpoint):
    model, tokenizer, _ = load_for_inference(tiny_dense_checkpoint)
    return model, tokenizer


@pytest.fixture(scope="session")
def app(tiny_model):
    model, tokenizer = tiny_model
    app = create_app(model, tokenizer, model_name=MODEL_NAME, max_batch=8)
    yield app
    app.state.server.scheduler.close()


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="session")
def live(tiny_model):
    model, tokenizer = tiny_model
    with LiveServer(create_app(model, tokenizer, model_name=MODEL_NAME, max_batch=8)) as server:
        yield server


@pytest.fixture(params=["in-process", "uvicorn"])
def connect(request, app):
    """A factory of (httpx.AsyncClient, app) for the transport under test; call it inside the event loop."""
    if request.param == "in-process":
        return lambda: (httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app)
    live = request.getfixturevalue("live")
    return lambda: (httpx.AsyncClient(base_url=live.url), live.app)
