"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn server.

One tiny random-weight llama with a real (non-zero) LoRA adapter is installed per module; greedy
decoding (temperature 0) makes answers repeatable, so streamed, batched and single answers can be
compared exactly.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from tests.test_serve_support import install_tiny, running_server


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_factory):
    from llm_installer.serve.engine import Engine

    models = tmp_path_factory.mktemp("serve-models")
    root = install_tiny(models, tiny_model_factory("llama"), name="tiny")
    # fp32: these tests compare batched with one-at-a-time greedy decoding token for token, which only fp32
    # guarantees (bf16 matmuls round differently per batch shape, and a random tiny model's logits tie)
    eng = Engine.load(str(root), default_max_tokens=32, dtype="fp32")
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, max_body_bytes=64 * 1024) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


MSG = [{"role": "user", "content": "Tell me about the sea."}]


def _chat(client, model="tiny:lora", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, messages=kw.pop("messages", MSG), **kw)


def test_models_and_health(client, base_url):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "tiny:lora"]
    assert client.models.retrieve("tiny:lora").id == "tiny:lora"
    health = httpx.get(base_url + "/health").json()
    assert health["status"] == "ok" and health["models"] == ids


def test_chat_non_streaming_base_vs_lora(client):
    base = _chat(client, model="tiny")
    lora = _chat(client, model="tiny:lora")
    assert base.object == "chat.completion"
    assert base.choices[0].message.role == "assistant"
    assert base.model == "tiny" and lora.model == "tiny:lora"
    assert base.choices[0].message.content != lora.choices[0].message.content
    assert lora.choices[0].finish_reason == "length"
    assert lora.usage.completion_tokens == 12
    assert lora.usage.prompt_tokens > 5
    assert lora.usage.total_tokens == lora.usage.prompt_tokens + 12
    # greedy is repeatable
    assert _chat(client, model="tiny:lora").choices[0].message.content == lora.choices[0].message.content


def test_chat_streaming_matches_non_streaming(client):
    full = _chat(client).choices[0].message.content
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed


def test_stream_ends_with_done_marker(base_url):
    body = {"model": "tiny", "messages": MSG, "stream": True, "max_tokens": 4, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        json.loads(line[6:])


def test_completions_streaming_and_not(client):
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert done.object == "text_completion"
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 10
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    # the default max_tokens for completions is OpenAI's 16
    assert client.completions.create(model="tiny", prompt="Hi", temperature=0).usage.completion_tokens == 16
    # token-id prompts work too
    ids = client.completions.create(model="tiny:lora", prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4


def test_stop_sequences(client):
    full = _chat(client, max_tokens=16).choices[0].message.content
    assert len(full) > 12
    stop = full[6:9]
    cut = full[: full.index(stop)]
    res = _chat(client, max_tokens=16, stop=stop)
    assert res.choices[0].message.content == cut
    assert res.choices[0].finish_reason == "stop"
    streamed = _chat(client, max_tokens=16, stop=["@@never@@", stop], stream=True)
    parts = [c.choices[0] for c in streamed if c.choices]
    assert "".join(p.delta.content or "" for p in parts) == cut
    assert parts[-1].finish_reason == "stop"


def test_sampling_params(client):
    a = _chat(client, temperature=1.0, top_p=0.9, seed=1234)
    b = _chat(client, temperature=1.0, top_p=0.9, seed=1234)
    assert a.choices[0].message.content == b.choices[0].message.content
    pen = _chat(client, presence_penalty=1.5, frequency_penalty=1.5, max_completion_tokens=20)
    assert pen.usage.completion_tokens == 20  # max_completion_tokens wins over max_tokens
    assert pen.choices[0].message.content != _chat(client, max_tokens=20).choices[0].message.content


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


def test_error_responses(base_url, client):
    url = base_url + "/v1/chat/completions"
    err = _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = _error(httpx.post(url, json={"model": "tiny", "messages": MSG, "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    err = _error(httpx.post(url, json={"model": "tiny", "messages": "hello"}), 400)
    assert err["param"].startswith("messages")
    err = _error(httpx.post(url, json={"model": "tiny"}), 400)
    assert err["param"] == "messages" and err["code"] == "missing_required_parameter"
    err = _error(httpx.post(url, json={"model": "tiny", "messages": MSG, "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"
    err = _error(
        httpx.post(url, json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400
    )
    err = _error(httpx.post(url, json={"model": "tiny", "messages": MSG, "n": 2}), 400)
    assert err["param"] == "n"
    err = _error(httpx.post(url, json={"model": "nope", "messages": MSG}), 404)
    assert err["code"] == "model_not_found"
    err = _error(
        httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}), 413
    )
    chunked = (
        part for part in [b'{"model": "tiny", "messages": [{"role": "user", "content": "', b"x" * 70000]
    )
    err = _error(httpx.post(url, content=chunked, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"  # no Content-Length: counted while reading
    long_msg = [{"role": "user", "content": "word " * 600}]
    err = _error(httpx.post(url, json={"model": "tiny", "messages": long_msg}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _error(httpx.post(url, json={"model": "tiny", "messages": MSG, "max_tokens": 10_000}), 400)
    assert err["code"] == "context_length_exceeded"
    _error(httpx.get(base_url + "/v1/nothing-here"), 404)
    # the official client maps them to its exception classes
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="tiny:other")
    with pytest.raises(openai.BadRequestError):
        _chat(client, temperature=5)
    # and the server is still fine
    assert _chat(client, max_tokens=2).usage.completion_tokens == 2


def test_api_key_required(engine):
    with running_server(engine, api_key="s3cret") as url:
        err = _error(httpx.get(url + "/v1/models"), 401)
        assert err["code"] == "invalid_api_key"
        _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny", "tiny:lora"]
        assert httpx.get(url + "/health").status_code == 200  # liveness needs no key
        info = httpx.get(url + "/info").json()  # the page's info needs no key, so it shows no paths
        assert info["auth_required"] is True and info["adapter"] == "yes" and "adapter_info" not in info


def test_sixteen_concurrent_streaming_clients(engine, base_url):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(16)]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)

    def ask(i: int, stream: bool) -> tuple[str, str | None]:
        kw = dict(model="tiny:lora" if i % 2 else "tiny", temperature=0, max_tokens=12)
        msgs = [{"role": "user", "content": prompts[i]}]
        if not stream:
            r = client.chat.completions.create(messages=msgs, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = [], None
        for c in client.chat.completions.create(messages=msgs, stream=True, **kw):
            if c.choices:
                text.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return "".join(text), finish

    expected = [ask(i, stream=False) for i in range(16)]  # one at a time
    before = engine.max_batch_seen
    engine.max_batch_seen = 0
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: ask(i, stream=True), range(16)))
    assert got == expected
    assert all(f == "length" for _, f in got)
    assert engine.max_batch_seen > 1  # requests were decoded together, not one by one
    engine.max_batch_seen = max(before, engine.max_batch_seen)
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_client_disconnect_frees_its_slot(engine, base_url):
    before = engine.cancelled
    body = {"model": "tiny:lora", "messages": MSG, "stream": True, "max_tokens": 400, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        seen = [next(lines) for _ in range(3)]
        assert all(s.startswith("data: ") or s == "" for s in seen)
    deadline = time.monotonic() + 30
    while engine.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled == before + 1  # generation stopped for it, not run to 400 tokens
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_engine_joins_running_batch_exactly(engine):
    """Requests that arrive while others decode join the running batch (KV caches left-padded and
    concatenated, base and adapter rows mixed) and still get exactly their single-request answers."""
    from llm_installer.serve.engine import SamplingParams

    prompts = [
        "A short one.",
        "A much longer question that needs many more tokens in its prompt, " * 3,
        "Mid.",
    ]
    adapters = ["lora", None, "lora"]
    greedy = [SamplingParams(max_tokens=n, temperature=0) for n in (200, 10, 14)]
    ids = [engine.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    singles = [engine.generate(i, a, g).text for i, a, g in zip(ids, adapters, greedy, strict=True)]

    steps_before = engine.steps
    first = engine.submit(ids[0], adapters[0], greedy[0])
    events = iter(first)
    got0 = [next(events).text]  # the first request is decoding now
    later = [engine.submit(ids[k], adapters[k], greedy[k]) for k in (1, 2)]
    got0 += [ev.text for ev in events]
    got = ["".join(got0)] + ["".join(ev.text for ev in h) for h in later]
    assert got == singles
    # 199 decode steps if both joined while the first ran; 199 + 13 if they had waited for it to finish
    assert engine.steps - steps_before < 199 + 9


def test_merge_adapter_serves_only_the_adapted_model(engine):
    """--merge-adapter: NAME:lora at merged speed, same answers; the base name is gone (404)."""
    from llm_installer.serve.engine import Engine, EngineError, SamplingParams

    root = engine.info["adapter"].rsplit("/lora", 1)[0]
    merged = Engine.load(root, merge_adapter=True).start()
    try:
        assert merged.model_names == ["tiny:lora"]
        assert not hasattr(merged.model, "disable_adapter")  # plain transformers model, no PEFT layers
        with pytest.raises(EngineError) as exc:
            merged.resolve("tiny")
        assert exc.value.status == 404 and "tiny:lora" in exc.value.message
        ids = engine.chat_prompt_ids(MSG)
        greedy = SamplingParams(max_tokens=12, temperature=0)
        adapter = merged.resolve("tiny:lora")
        assert merged.generate(ids, adapter, greedy).text == engine.generate(ids, "lora", greedy).text
    finally:
        merged.stop()
