"""The web chat page in headless Debian Chromium (Playwright driving /usr/bin/chromium).

It sends a message, watches the answer stream in, switches between adapter and base, and checks that
markdown from the model is rendered without letting HTML through. A screenshot goes to test-artifacts/.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.test_serve_support import install_tiny, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_factory):
    from llm_installer.serve.engine import Engine

    root = install_tiny(tmp_path_factory.mktemp("web-models"), tiny_model_factory("llama"), name="tiny")
    engine = Engine.load(str(root), default_max_tokens=32).start()
    with running_server(engine) as url:
        yield url
    engine.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        pg.goto(server + "/")
        pg.wait_for_selector("body[data-state=idle]", timeout=30_000)
        pg.errors = errors
        yield pg
        browser.close()


def _greedy(server: str, model: str, messages: list[dict]) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 24}
    return httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
        "content"
    ]


def _send(page, text: str):
    done = page.locator(".msg.assistant.done")
    n = done.count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    done.nth(n).wait_for(
        timeout=60_000
    )  # (wait_for_function would need 'unsafe-eval', which the CSP forbids)
    page.wait_for_selector("body[data-state=idle]", timeout=60_000)
    return done.nth(n)


def test_page_shows_model_info(page):
    assert page.inner_text("#title") == "tiny"
    options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert options == ["tiny", "tiny:lora"]
    assert page.input_value("#model") == "tiny:lora"
    (REPO_ROOT / "test-artifacts").mkdir(exist_ok=True)
    page.click("#info-box summary")  # open the collapsed panel
    info = page.inner_text("#info")
    assert "context length" in info and "512" in info and "lora" in info
    page.screenshot(path=str(REPO_ROOT / "test-artifacts" / "webpage-info.png"))
    page.click("#info-box summary")  # close it again


def test_send_message_streams_answer_and_switches_model(page, server):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    answer = _send(page, "Hello, who are you?")
    assert int(answer.get_attribute("data-chunks")) > 1  # arrived in pieces, not at once
    assert answer.get_attribute("data-finish") == "length"
    history = page.evaluate("() => window.chatState.history")
    want = _greedy(server, "tiny:lora", [{"role": "user", "content": "Hello, who are you?"}])
    assert history == [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": want},
    ]
    assert page.inner_text("#status").startswith("done (length)")
    out = REPO_ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / "webpage-chat.png"), full_page=True)

    page.click("#reset")
    page.select_option("#model", "tiny")
    base = _send(page, "Hello, who are you?")
    base_history = page.evaluate("() => window.chatState.history")
    assert base_history[1]["content"] == _greedy(
        server, "tiny", [{"role": "user", "content": "Hello, who are you?"}]
    )
    assert base_history[1]["content"] != want
    assert base.locator(".who").inner_text() == "tiny"
    assert page.errors == []


def test_markdown_is_rendered_without_html_injection(page):
    evil = (
        '**bold** and `code` <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n\n'
        "```\n<b>not bold</b>\n```\n\n- item [link](javascript:alert(1)) [ok](https://example.org)"
    )
    html = page.evaluate("(s) => window.renderMarkdown(s)", evil)
    page.evaluate(
        "(h) => { const d = document.createElement('div'); d.id = 'probe'; d.innerHTML = h; "
        "document.body.append(d); }",
        html,
    )
    assert page.locator("#probe strong").inner_text() == "bold"
    assert page.locator("#probe code").first.inner_text() == "code"
    assert page.locator("#probe img").count() == 0
    assert page.locator("#probe script").count() == 0
    assert page.locator("#probe b").count() == 0
    assert "<b>not bold</b>" in page.locator("#probe pre").inner_text()
    hrefs = page.eval_on_selector_all("#probe a", "els => els.map(e => e.getAttribute('href'))")
    assert hrefs == ["https://example.org"]
    assert page.evaluate("() => window.__pwned") is None
    assert "<img src=x" in page.locator("#probe").inner_text()  # shown as text
