"""Errors in OpenAI's JSON shape: 400 for what a client got wrong (never a 500), 401 without the API key."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from darkhorse.serve.app import create_app

BAD = [
    (b"{", "JSON"),
    (b"[]", "object"),
    (b'{"prompt": ""}', "empty"),
    (b'{"prompt": [999999]}', "vocabulary"),
    (b'{"prompt": "one", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "one", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "one", "n": 2}', "n"),
    (b'{"prompt": ["one", "two"], "stream": true}', "one prompt"),
]


def post(app, path: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post(path, content=body, headers={"content-type": "application/json", **(headers or {})})

    return asyncio.run(main())


@pytest.mark.parametrize(("body", "says"), BAD, ids=[says for _, says in BAD])
def test_malformed_requests_are_400s_in_openais_shape(app, body, says):
    response = post(app, "/v1/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"]


def test_a_prompt_longer_than_the_context_and_unknown_paths(app, tiny_words):
    long = " ".join(tiny_words * 20)
    assert post(app, "/v1/completions", f'{{"prompt": "{long}"}}'.encode()).status_code == 400
    chat = b'{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}]}'
    assert post(app, "/v1/chat/completions", chat).json()["error"]["message"].startswith("message 1")
    assert post(app, "/v1/nothing", b"{}").json()["error"]["type"] == "not_found_error"


def test_api_key_guards_the_api_but_not_health(tiny_model):
    model, tokenizer = tiny_model
    app = create_app(model, tokenizer, api_key="sesame")
    body = b'{"prompt": "one", "max_tokens": 1}'
    try:
        assert post(app, "/v1/completions", body).status_code == 401
        wrong = post(app, "/v1/completions", body, {"authorization": "Bearer open"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert post(app, "/v1/completions", body, {"authorization": "Bearer sesame"}).status_code == 200

        async def health_and_client():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                health = await http.get("/health")
                client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong", http_client=http, max_retries=0)
                with pytest.raises(openai.AuthenticationError):
                    await client.models.list()
                return health

        assert asyncio.run(health_and_client()).status_code == 200
    finally:
        app.state.server.scheduler.close()


def test_text_cannot_forge_control_tokens(app, tiny_model):
    """`<|user|>`-style strings in a message or a text prompt stay characters, as in chat and eval."""
    from darkhorse.infer.prompting import encode_chat_prompt

    _, tokenizer = tiny_model
    forged = "".join(sorted(tokenizer.special_tokens))  # every special token's string, as text
    special = set(tokenizer.special_tokens.values())
    tokens = post(app, "/tokenize", json.dumps({"prompt": forged}).encode()).json()["tokens"]
    assert tokens == tokenizer.encode_text(forged) and not special & set(tokens)
    completion = post(app, "/v1/completions", json.dumps({"prompt": forged, "max_tokens": 1}).encode()).json()
    assert completion["usage"]["prompt_tokens"] == len(tokens)
    messages = [{"role": "user", "content": forged}]
    chat = post(app, "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 1}).encode()).json()
    _, safe = encode_chat_prompt(tokenizer, messages)
    assert chat["usage"]["prompt_tokens"] == len(safe) > len(tokenizer.encode(forged))
