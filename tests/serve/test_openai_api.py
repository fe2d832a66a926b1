"""The official `openai` client against the server, in-process and over a real uvicorn on 127.0.0.1:
completions, chat, streaming, stop strings, usage, and concurrent streams that decode together yet
write exactly what each writes alone."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai

from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import chat_stop_ids, render_chat_prompt
from tests.serve.conftest import MODEL_NAME

TIMEOUT = 60  # seconds per request: bounded even on a loaded machine


def client_for(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    base_url = str(http.base_url).rstrip("/") + "/v1"
    return openai.AsyncOpenAI(base_url=base_url, api_key="none", http_client=http, max_retries=0, timeout=TIMEOUT)


def greedy_text(tiny_model, prompt: str, max_tokens: int, stop_ids: set[int]) -> tuple[str, list[int]]:
    model, tokenizer = tiny_model
    ids = Engine(model, tokenizer.vocab_size).generate([tokenizer.encode(prompt)], max_new_tokens=max_tokens,
                                                       stop_ids=stop_ids)[0]  # fmt: skip
    return tokenizer.decode([i for i in ids if i not in stop_ids]), ids


def test_completion_is_the_engines_greedy_text_with_usage(connect, tiny_model, tiny_words):
    prompt = " ".join(tiny_words[:4])
    expected, ids = greedy_text(tiny_model, prompt, 12, {tiny_model[1].eos_id})

    async def main():
        http, _ = connect()
        async with http:
            return await client_for(http).completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0
            )

    completion = asyncio.run(main())
    (choice,) = completion.choices
    assert choice.text == expected and choice.finish_reason == "length"
    assert completion.model == MODEL_NAME and completion.id.startswith("cmpl-")
    assert completion.usage.prompt_tokens == len(tiny_model[1].encode(prompt))
    assert completion.usage.completion_tokens == 12 == len(ids)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_stop_strings_cut_the_text_streamed_or_not(connect, tiny_model, tiny_words):
    prompt = " ".join(tiny_words[:4])
    full, _ = greedy_text(tiny_model, prompt, 12, {tiny_model[1].eos_id})
    stop = " " + full.split()[3]  # the fourth word to come

    async def main():
        http, _ = connect()
        async with http:
            client = client_for(http)
            plain = await client.completions.create(prompt=prompt, model="x", max_tokens=12, temperature=0, stop=stop)
            streamed = await client.completions.create(prompt=prompt, model="x", max_tokens=12, temperature=0,
                                                       stop=[stop, "never"], stream=True)  # fmt: skip
            chunks = [chunk async for chunk in streamed]
            return plain, chunks

    plain, chunks = asyncio.run(main())
    expected = full[: full.index(stop)]
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (expected, "stop")
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop" and len({c.id for c in chunks}) == 1


def sse_events(lines: list[str]) -> list[dict | str]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def test_chat_streams_by_the_openai_contract(connect, tiny_model):
    """One id, the role first, reasoning apart from content and no special tokens, the finishing chunk,
    the usage chunk with no choices, then [DONE]; the same reply as without streaming."""
    model, tokenizer = tiny_model
    messages = [{"role": "user", "content": "after three?"}]
    request = {"model": MODEL_NAME, "messages": messages, "max_tokens": 24, "temperature": 0}
    prompt = render_chat_prompt(tokenizer, messages)
    ids = Engine(model, tokenizer.vocab_size).generate([tokenizer.encode(prompt)], max_new_tokens=24,
                                                       stop_ids=chat_stop_ids(tokenizer))[0]  # fmt: skip

    async def main():
        http, _ = connect()
        async with http:
            body = {**request, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = [line async for line in response.aiter_lines()]
            whole = await client_for(http).chat.completions.create(**request)
            return sse_events(lines), whole

    events, whole = asyncio.run(main())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage, finishing, deltas = chunks[-1], chunks[-2], chunks[1:-2]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(tokenizer.encode(prompt)), "completion_tokens": len(ids),
        "total_tokens": len(tokenizer.encode(prompt)) + len(ids)}  # fmt: skip
    assert finishing["choices"][0]["finish_reason"] == ("stop" if ids[-1] in chat_stop_ids(tokenizer) else "length")
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-2])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in deltas)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in deltas)
    assert all(not ("content" in c["choices"][0]["delta"] and "reasoning_content" in c["choices"][0]["delta"])
               for c in deltas)  # fmt: skip
    assert reasoning  # the prompt opens a think block: the tiny model's words go there
    assert "<|" not in content + reasoning
    message = whole.choices[0].message
    assert (message.content, message.reasoning_content) == (content, reasoning)
    assert whole.usage.completion_tokens == len(ids)


def test_eight_concurrent_streams_decode_together_as_alone(connect, tiny_words):
    prompts = [" ".join(tiny_words[k : k + 2 + k % 3]) for k in range(0, 24, 3)]  # 8 prompts, ragged

    async def main():
        http, app = connect()
        batch = app.state.server.scheduler.batch
        sizes = []
        step = batch.step
        batch.step = lambda: sizes.append(len(batch.rows)) or step()
        try:
            async with http:
                client = client_for(http)
                options = dict(model=MODEL_NAME, max_tokens=16 + len(prompts), temperature=0)
                alone = [(await client.completions.create(prompt=p, **options)).choices[0].text for p in prompts]

                async def streamed(index: int, prompt: str) -> str:
                    stream = await client.completions.create(prompt=prompt, stream=True, **options)
                    return "".join([chunk.choices[0].text async for chunk in stream])

                together = await asyncio.gather(*(streamed(i, p) for i, p in enumerate(prompts)))
        finally:
            del batch.step
        return alone, together, max(sizes)

    alone, together, widest = asyncio.run(main())
    assert together == alone
    assert widest >= 4  # the streams shared batched steps


def test_models_health_and_tokenizer_endpoints(connect, tiny_model):
    async def main():
        http, _ = connect()
        async with http:
            models = await client_for(http).models.list()
            health = await http.get("/health")
            tokens = await http.post("/tokenize", json={"prompt": "one two", "add_special_tokens": False})
            text = await http.post("/detokenize", json={"tokens": tokens.json()["tokens"]})
            info = await http.get("/tokenizer_info")
            return models, health, tokens, text, info

    models, health, tokens, text, info = asyncio.run(main())
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert health.json() == {"status": "ok"}
    assert tokens.json()["tokens"] == tiny_model[1].encode("one two") and text.json() == {"prompt": "one two"}
    assert info.json()["eos_token"] == tiny_model[1].eos_token


def test_a_client_that_goes_away_frees_its_slot(live, tiny_words):
    """A stream abandoned after its first chunks leaves the batch at once, not after its 200 tokens."""
    server = live.app.state.server
    body = {"model": MODEL_NAME, "prompt": " ".join(tiny_words[:3]), "max_tokens": 200, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            (row,) = server.scheduler.batch.rows
        deadline = time.monotonic() + 20
        while server.scheduler.batch.rows:
            assert time.monotonic() < deadline, "the abandoned request still holds its row"
            time.sleep(0.01)
        assert row.finish_reason == "cancelled" and len(row.tokens) < 200
