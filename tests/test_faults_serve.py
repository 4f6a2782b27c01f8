"""The server under hostile input: fuzzing from its own /openapi.json, requests that used to break the
shared generation worker, nested JSON, lone surrogates, slow bodies, a full queue (docs/robustness.md).

A live uvicorn server on 127.0.0.1 over a tiny random llama; every request is bounded in count and time.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time

import httpx
import pytest

from llm_installer.serve.engine import Engine
from tests.test_serve_support import install_tiny, running_server

MSG = [{"role": "user", "content": "Tell me about the sea."}]
FUZZ_STATUSES: collections.Counter[int] = collections.Counter()


class RowFailingEngine(Engine):
    """The real engine, except that sampling raises for requests with seed 666: a stand-in for any bug
    that hits one row, to show it ends that row only."""

    def _sample(self, r, logits):
        if r.params.seed == 666:
            raise RuntimeError("secret internal detail /root/private/path")
        return super()._sample(r, logits)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_factory):
    models = tmp_path_factory.mktemp("faults-serve-models")
    root = install_tiny(models, tiny_model_factory("llama"), name="tiny", with_lora=False)
    eng = RowFailingEngine.load(str(root), default_max_tokens=8, max_queue=8)
    eng.context_length = 160  # bounds what any fuzzed max_tokens can cost
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, max_body_bytes=64 * 1024, body_timeout_s=1.0) as url:
        yield url


def _post(base_url: str, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        base_url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30, **kw
    )


def _events(resp_lines) -> list:
    out = []
    for line in resp_lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- the values that passed validation and broke the worker ---------------------------------------------


@pytest.mark.parametrize(
    "extra, status, param",
    [
        ({"temperature": 1e-39}, 200, None),  # finite math now, never NaN
        ({"temperature": 5e-324}, 200, None),
        ({"top_p": 1e-227}, 200, None),  # 0 in float32: the top token always stays
        ({"top_p": 1e-227, "temperature": 1e-39, "seed": 7}, 200, None),
        ({"seed": 2**64}, 400, "seed"),
        ({"seed": -(2**63) - 1}, 400, "seed"),
        ({"seed": 2**63 - 1}, 200, None),
        ({"stream": "yes"}, 400, "stream"),  # was named 'None'
        ({"stream_options": "x"}, 400, "stream_options"),
    ],
)
def test_sampling_values_are_answered_or_refused_before_the_worker(base_url, extra, status, param):
    resp = _post(base_url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 4, **extra})
    assert resp.status_code == status, resp.text
    if status == 400:
        err = resp.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error"
        assert "'None'" not in err["message"]


def test_nan_and_infinity_literals_are_400(base_url):
    resp = _post(
        base_url,
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_bad_request_joining_a_running_batch_does_not_break_it(base_url, engine):
    """A good stream is decoding; a request with the values that used to crash the worker joins its batch.
    Both are answered; the good stream completes with its finish reason and [DONE]."""
    lines: list[str] = []
    started = threading.Event()

    def good():
        body = {"messages": MSG, "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and '"content": "' in line and '"role"' not in line:
                    started.set()

    thread = threading.Thread(target=good)
    seen_before = engine.max_batch_seen
    engine.max_batch_seen = 0
    thread.start()
    try:
        assert started.wait(30), "the good stream did not start"
        bad = {
            "messages": MSG,
            "max_tokens": 5,
            "temperature": 1e-39,
            "top_p": 1e-227,
            "seed": 3,
            "stream": True,
        }
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=bad, timeout=30) as resp:
            assert resp.status_code == 200
            bad_events = _events(resp.iter_lines())
        assert bad_events[-1] == "[DONE]" and bad_events[-2]["choices"][0]["finish_reason"] == "length"
    finally:
        thread.join(60)
        joined = engine.max_batch_seen
        engine.max_batch_seen = max(seen_before, joined)
    events = _events(lines)
    assert events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and "error" in e for e in events)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert joined >= 2  # the two really shared a batch


def test_a_failing_row_ends_only_that_row_and_no_error_text_leaks(base_url):
    results: dict[str, httpx.Response] = {}

    def run(key, body):
        results[key] = _post(base_url, "/v1/chat/completions", body)

    good = threading.Thread(
        target=run, args=("good", {"messages": MSG, "max_tokens": 40, "temperature": 0, "ignore_eos": True})
    )
    good.start()
    time.sleep(0.2)
    run("bad", {"messages": MSG, "max_tokens": 5, "seed": 666, "temperature": 1.0})
    good.join(60)
    assert results["good"].status_code == 200
    assert results["good"].json()["choices"][0]["finish_reason"] == "length"
    bad = results["bad"]
    assert bad.status_code == 500
    assert bad.json()["error"]["type"] == "server_error"
    assert "secret" not in bad.text and "/root" not in bad.text and "RuntimeError" not in bad.text


# ---- bodies -------------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400(base_url):
    resp = _post(base_url, "/v1/chat/completions", "[" * 20_000 + "]" * 20_000)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    deep: object = "x"
    for _ in range(200):
        deep = [deep]
    resp = _post(base_url, "/v1/chat/completions", {"messages": MSG, "metadata": deep})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("The JSON body is nested more than 32 levels deep")


def test_lone_surrogates_are_400_naming_the_field(base_url):
    body = '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    resp = _post(base_url, "/v1/chat/completions", body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "messages.0.content"
    assert "lone surrogate ('\\ud800')" in err["message"]
    resp = _post(base_url, "/v1/completions", '{"prompt": "\\udfff", "max_tokens": 2}')
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


def test_a_body_not_sent_as_json_is_400_saying_how_to_send_it(base_url):
    """FastAPI reads a body as JSON only with a JSON Content-Type (so a web page cannot post one to a
    local server without a CORS preflight); anything else is one clear OpenAI-shaped 400."""
    body = json.dumps({"messages": MSG, "max_tokens": 2})
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        resp = httpx.post(base_url + "/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == {
            "message": "The request body must be a JSON object, sent with 'Content-Type: application/json'.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_json",
        }
    resp = _post(base_url, "/v1/chat/completions", "[1, 2]")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_a_route_runs_alone_on_its_own_app(engine):
    """Each route is a module-level function reading `request.app.state`: mounted alone, it works."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_installer.serve.app import EXCEPTION_HANDLERS, model, models

    app = FastAPI(exception_handlers=EXCEPTION_HANDLERS)
    app.state.engine, app.state.api_key = engine, None
    app.add_api_route("/v1/models", models)
    app.add_api_route("/v1/models/{model_id:path}", model)
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == engine.model_names
        err = client.get("/v1/models/nope").json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"


def test_a_slow_body_is_dropped_with_408(base_url):
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"messages": '
        )
        t0 = time.monotonic()
        reply = sock.recv(4096).decode()
        waited = time.monotonic() - t0
    assert reply.startswith("HTTP/1.1 408"), reply
    assert waited < 5
    assert httpx.get(base_url + "/health", timeout=10).status_code == 200  # the server is fine


def test_a_full_queue_answers_429(base_url, engine):
    old_batch, old_queue = engine.max_batch, engine.max_queue
    engine.max_batch, engine.max_queue = 1, 1
    streams = []
    try:
        body = {"messages": MSG, "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
        client = httpx.Client(timeout=30)
        first = client.stream("POST", base_url + "/v1/chat/completions", json=body)
        streams.append(first.__enter__())  # decoding: the batch (of 1) is full
        time.sleep(0.2)
        second = client.stream("POST", base_url + "/v1/chat/completions", json=body)
        streams.append(second.__enter__())  # waits in the queue (of 1)
        resp = _post(base_url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2})
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        engine.max_batch, engine.max_queue = old_batch, old_queue
        for s in streams:
            s.close()


def test_models_path_without_an_id_is_404(base_url):
    resp = httpx.get(base_url + "/v1/models/", timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


# ---- fuzzing from the server's own OpenAPI document --------------------------------------------------------


def test_openapi_document_describes_the_request_bodies(base_url):
    doc = httpx.get(base_url + "/openapi.json", timeout=10).json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body == {"$ref": "#/components/schemas/ChatRequest"}
    assert "Message" in doc["components"]["schemas"]
    assert (
        doc["components"]["schemas"]["ChatRequest"]["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
    )


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_from_openapi_never_gives_500(base_url, engine, mode):
    """Schemathesis cases from /openapi.json: valid bodies (positive) and schema-violating ones (negative)
    for the two generation endpoints, valid ones for the rest; 20 each, and a 40-token context so that
    no generated max_tokens can make a case slow."""
    import schemathesis

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    generation = schemathesis.GenerationMode(mode)
    failures = []
    old_context, engine.context_length = engine.context_length, 40
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            if mode == "negative" and operation.method.upper() != "POST":
                continue  # nothing to violate in a GET without parameters
            _fuzz(operation, generation, base_url, failures)
    finally:
        engine.context_length = old_context
    assert not failures, failures[:3]


def _fuzz(operation, generation, base_url: str, failures: list) -> None:
    """Run `operation`'s schemathesis strategy through hypothesis, 20 examples, recording statuses."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=20,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=generation))
    def check(case):
        resp = case.call(base_url=base_url, timeout=30)
        FUZZ_STATUSES[resp.status_code] += 1
        if resp.status_code >= 500:
            failures.append((case.method, case.path, case.body, resp.status_code, resp.text[:200]))

    check()


def test_zz_fuzz_statuses():
    """Not a check: what the fuzzing saw, for the record (run with -s to see it)."""
    print(
        f"\nfuzz cases by status: {dict(sorted(FUZZ_STATUSES.items()))}, total {sum(FUZZ_STATUSES.values())}"
    )
