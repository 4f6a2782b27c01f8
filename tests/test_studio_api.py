"""The studio's API over a real tiny model: each endpoint's one-line errors, the path rules, uploads,
the one-training-per-model rule, a real training through the `train` CLI subprocess, and --api-key."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import pytest
from fastapi.testclient import TestClient

from tests.test_serve_support import install_tiny


@pytest.fixture
def client(_isolated_models_dir):
    from llm_installer.studio.app import create_app, new_studio

    studio = new_studio(max_upload=4096)
    with TestClient(create_app(studio)) as c:
        c.studio = studio
        yield c
    studio.jobs.shutdown()
    studio.engines.close()


@pytest.fixture
def tiny(_isolated_models_dir, tiny_model_factory):
    install_tiny(_isolated_models_dir, tiny_model_factory("llama"), name="tiny", with_lora=False)
    return "tiny"


def _err(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


@pytest.mark.parametrize(
    "ref, says",
    [
        ("../../etc/passwd", "'..' is not allowed"),
        ("uploads/../../x.jsonl", "'..' is not allowed"),
        ("/etc/passwd", "absolute paths are not accepted"),
        ("~/x.jsonl", "absolute paths are not accepted"),
        ("etc/passwd", "not a studio path"),
        ("uploads/missing.jsonl", "no such file"),
        ("models/.studio/uploads/a.jsonl", "not inside the studio's own folder"),
    ],
)
def test_inspect_refuses_paths_outside_the_studio(client, ref, says):
    assert says in _err(client.post("/api/data/inspect", json={"data": [ref]}), 400)


def test_symlink_out_of_the_uploads_folder_is_refused(client, tmp_path):
    from llm_installer.studio import paths

    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "secret"}\n')
    paths.uploads_dir().mkdir(parents=True, exist_ok=True)
    (paths.uploads_dir() / "link.jsonl").symlink_to(secret)
    msg = _err(client.post("/api/data/inspect", json={"data": ["uploads/link.jsonl"]}), 400)
    assert "leads outside uploads/" in msg
    assert "uploads/link.jsonl" not in client.get("/api/data").json()["files"]


def test_model_names_are_folder_names_only(client, tiny, tmp_path):
    for bad in ("../tiny", "/etc", "..", "a/b"):
        r = client.post("/api/plan", json={"model": bad})
        assert "not a model name" in _err(r, 400) or "no installed model" in _err(r, 400)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (client.studio.jobs.log_dir.parent.parent / "linked").symlink_to(outside)
    assert "no installed model named linked" in _err(client.post("/api/models/linked/verify"), 400)
    assert "no installed model named nope" in _err(
        client.request("DELETE", "/api/models/nope", json={"confirm": "nope"}), 400
    )


def test_upload_is_stored_in_the_studio_folder_and_limited(client):
    from llm_installer.studio import paths

    line = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    )
    r = client.put("/api/uploads/chat.jsonl", content=(line + "\n").encode())
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "uploads/chat.jsonl"
    assert (paths.uploads_dir() / "chat.jsonl").read_text() == line + "\n"
    assert "uploads/chat.jsonl" in client.get("/api/data").json()["files"]
    assert "upload limit is 4.00 KiB" in _err(client.put("/api/uploads/big.jsonl", content=b"x" * 5000), 413)
    chunked = iter([b"x" * 3000, b"x" * 3000])  # no Content-Length: counted while it arrives
    assert "upload limit is 4.00 KiB" in _err(client.put("/api/uploads/big.jsonl", content=chunked), 413)
    assert not list(paths.uploads_dir().glob("*big*")) and not list(paths.uploads_dir().glob(".*"))
    assert "no such page" in _err(client.put("/api/uploads/../x", content=b"x"), 404)
    for bad in (".hidden", "a%20b.jsonl", "%2E%2E"):
        assert "upload name" in _err(client.put(f"/api/uploads/{bad}", content=b"x"), 400)
    assert "the file is empty" in _err(client.put("/api/uploads/empty.jsonl", content=b""), 400)
    view = client.post("/api/data/inspect", json={"data": ["uploads/chat.jsonl"]}).json()
    assert view["records"] == 1 and view["files"][0]["file"] == "uploads/chat.jsonl"
    assert any(t["trained"] for t in view["example"]) and not all(t["trained"] for t in view["example"])


def test_inspect_shows_rejects_with_their_reasons(client):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    body = (json.dumps(good) + "\n" + json.dumps({"messages": []}) + "\n").encode()
    client.put("/api/uploads/mixed.jsonl", content=body)
    view = client.post("/api/data/inspect", json={"data": "uploads/mixed.jsonl"}).json()
    assert view["records"] == 1 and view["rejected_total"] == 1
    assert view["rejected"][0]["origin"].startswith("uploads/mixed.jsonl")


def test_plan_errors_and_plan_table(client, tiny):
    assert "expected int" in _err(client.post("/api/plan", json={"model": tiny, "epochs": "many"}), 400)
    msg = _err(client.post("/api/plan", json={"model": tiny, "mode": "warp"}), 400)
    assert "warp" in msg
    plan = client.post(
        "/api/plan", json={"model": tiny, "mode": "fast", "data": "examples/fictional_facts.jsonl"}
    )
    assert plan.status_code == 200, plan.text
    body = plan.json()
    mode = next(s for s in body["settings"] if s["key"] == "mode")
    assert mode["value"] == "fast" and mode["source"] == "user"
    assert body["trainable"] > 0 and body["memory"]["total_gb"] > 0
    assert body["data"]["train_examples"] > 0
    assert body["command"].startswith(f"llm-installer train {tiny} --mode fast --data ")


def test_install_errors_are_one_line(client):
    assert "not a studio path" in _err(client.post("/api/models/install", json={"ref": "nothing-here"}), 400)
    assert "'..' is not allowed" in _err(
        client.post("/api/models/install", json={"ref": "uploads/../x.gguf"}), 400
    )
    client.put("/api/uploads/notes.txt", content=b"hello")
    assert "installs .gguf files" in _err(
        client.post("/api/models/install", json={"ref": "uploads/notes.txt"}), 400
    )
    client.put("/api/uploads/fake.gguf", content=b"not a gguf at all")
    job = client.post("/api/models/install", json={"ref": "uploads/fake.gguf"}).json()
    for _ in range(100):
        state = client.get(f"/api/jobs/{job['id']}").json()
        if state["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert state["state"] == "failed" and "GGUF" in state["error"] and "\n" not in state["error"]
    assert client.get("/api/models").json()["models"] == []


def test_remove_needs_confirmation(client, tiny, _isolated_models_dir):
    assert "confirm with its name" in _err(client.request("DELETE", f"/api/models/{tiny}", json={}), 400)
    assert (_isolated_models_dir / tiny).is_dir()
    from llm_installer import store

    info_path = _isolated_models_dir / tiny / "model_info.json"
    raw = json.loads(info_path.read_text())
    raw["manifest"]["files"] = store.build_manifest_files(_isolated_models_dir / tiny / "model")
    info_path.write_text(json.dumps(raw))
    first = client.post(f"/api/models/{tiny}/verify").json()
    assert first["ok"] is True and first["checked"] > 2
    config = _isolated_models_dir / tiny / "model" / "config.json"
    config.write_text(config.read_text() + " ")
    checked = client.post(f"/api/models/{tiny}/verify").json()
    assert checked["ok"] is False and checked["changed"] and "reinstall with" in checked["message"]
    r = client.request("DELETE", f"/api/models/{tiny}", json={"confirm": tiny})
    assert r.status_code == 200 and not (_isolated_models_dir / tiny).exists()


def test_training_runs_the_cli_one_per_model_and_streams_metrics(client, tiny, _isolated_models_dir):
    assert "pick a data file first" in _err(client.post("/api/train", json={"model": tiny}), 400)
    form = {
        "model": tiny,
        "data": "examples/fictional_facts.jsonl",
        "mode": "fast",
        "max_steps": 3,
        "validation_split": "0.2",
        "precision": "fp32",
    }
    job = client.post("/api/train", json=form).json()
    assert job["command"].startswith(f"llm-installer train {tiny} --mode fast --max-steps 3")
    assert "one training at a time per model" in _err(client.post("/api/train", json=form), 409)
    for _ in range(600):
        detail = client.get(f"/api/jobs/{job['id']}").json()
        if detail["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert detail["state"] == "done", detail
    steps = [m for m in detail["metrics"] if "loss" in m and m["loss"] is not None]
    assert [m["step"] for m in steps] == [1, 2, 3] and all(m["tokens_per_s"] > 0 for m in steps)
    assert detail["metrics"][-1] == {"event": "end", "step": 3, "stop_reason": "finished at step 3 of 3"}
    assert detail["message"] == "reached --max-steps 3"  # the trainer's own words, from run_info.json
    assert client.get(f"/api/jobs/{job['id']}?since=2").json()["metrics"] == detail["metrics"][2:]
    assert "before:" in client.get(f"/api/jobs/{job['id']}/report").json()["markdown"]
    assert client.get(f"/api/jobs/{job['id']}/loss.png").content[:4] == b"\x89PNG"
    assert (_isolated_models_dir / tiny / "lora" / "adapter_config.json").is_file()
    vllm = client.post("/api/export", json={"model": tiny, "kind": "vllm"}).json()
    assert Path(vllm["path"]).name == "serve-vllm.sh" and Path(vllm["path"]).is_file()
    assert "vllm.entrypoints.openai.api_server" in vllm["message"] and "--enable-lora" in vllm["message"]
    gguf_file = client.post("/api/export", json={"model": tiny, "kind": "gguf-f16"}).json()
    assert "merged with" in gguf_file["message"], gguf_file  # the trained adapter is folded in
    reader = gguf.GGUFReader(gguf_file["path"])
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert "unknown export" in _err(client.post("/api/export", json={"model": tiny, "kind": "zip"}), 400)
    assert "no job 999" in _err(client.post("/api/jobs/999/stop"), 400)
    assert "job_id" in _err(client.get("/api/jobs/abc"), 400)


def test_a_training_that_fails_shows_the_cli_error_line(client, tiny):
    client.put("/api/uploads/bad.jsonl", content=b'{"nothing": "usable"}\n')
    form = {"model": tiny, "data": "uploads/bad.jsonl", "mode": "fast"}
    job = client.post("/api/train", json=form).json()  # the plan does not read the data; the run does
    for _ in range(300):
        detail = client.get(f"/api/jobs/{job['id']}").json()
        if detail["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert detail["state"] == "failed" and "\n" not in detail["error"]
    assert "bad.jsonl" in detail["error"] and "Traceback" not in detail["log_tail"]


def test_api_key_is_required_on_the_api_not_the_page(_isolated_models_dir):
    from llm_installer.studio.app import create_app, new_studio

    with TestClient(create_app(new_studio(api_key="s3cret"))) as c:
        assert "needs its API key" in _err(c.get("/api/models"), 401)
        assert "wrong API key" in _err(c.get("/api/models", headers={"Authorization": "Bearer nope"}), 401)
        assert "wrong API key" in _err(
            c.put("/api/uploads/x.jsonl", content=b"x", headers={"Authorization": "x"}), 401
        )
        ok = c.get("/api/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json() == {"models": []}
        page = c.get("/")
        assert (
            page.status_code == 200
            and "studio" in page.text
            and "script-src 'self'" in page.headers["content-security-policy"]
        )
        assert c.get("/static/studio.js").status_code == 200
    assert os.environ.get("LLM_INSTALLER_MODELS_DIR")


def _wait(client, job_id: int, until, tries: int = 900) -> dict:
    for _ in range(tries):
        detail = client.get(f"/api/jobs/{job_id}").json()
        if until(detail):
            return detail
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never got there: {detail}")


def test_stop_saves_a_checkpoint_and_resume_continues_from_it(client, tiny, _isolated_models_dir):
    form = {
        "model": tiny,
        "data": "examples/fictional_facts.jsonl",
        "mode": "fast",
        "max_steps": 5000,
        "epochs": 1000,
        "validation_split": "0",
        "precision": "fp32",
    }
    job = client.post("/api/train", json=form).json()
    _wait(client, job["id"], lambda d: any(m.get("loss") is not None for m in d["metrics"]))
    assert client.post(f"/api/jobs/{job['id']}/stop").json()["state"] == "stopping"
    stopped = _wait(client, job["id"], lambda d: d["state"] not in ("running", "stopping"))
    assert stopped["state"] == "stopped", stopped
    assert stopped["message"].startswith("interrupted (SIGINT) at step ")
    last = int(stopped["message"].rsplit(" ", 1)[1])
    run = _isolated_models_dir / tiny / "runs" / stopped["run"]
    assert (run / f"checkpoint-{last}").is_dir() and (run / "report.md").is_file()
    assert "is not a queued or running training" in _err(client.post(f"/api/jobs/{job['id']}/stop"), 400)

    again = client.post("/api/train", json={**form, "resume": True}).json()
    assert " --resume" in again["command"]
    resumed = _wait(client, again["id"], lambda d: len(d["metrics"]) > len(stopped["metrics"]) + 1)
    assert resumed["run"] == stopped["run"]  # the same run folder, its curve continued
    new_steps = [
        m["step"] for m in resumed["metrics"][len(stopped["metrics"]) :] if m.get("loss") is not None
    ]
    assert new_steps and new_steps[0] == last + 1
    client.post(f"/api/jobs/{again['id']}/stop")
    assert (
        _wait(client, again["id"], lambda d: d["state"] not in ("running", "stopping"))["state"] == "stopped"
    )


def test_compare_streams_base_answers_and_names_its_errors(client, tiny):
    assert "the prompt is empty" in _err(client.post("/api/chat", json={"model": tiny, "prompt": " "}), 400)
    msg = _err(client.post("/api/chat", json={"model": tiny, "prompt": "Hi", "adapter": True}), 400)
    assert msg == "tiny has no adapter yet: train one first"
    assert "max_tokens" in _err(
        client.post("/api/chat", json={"model": tiny, "prompt": "Hi", "max_tokens": 0}), 400
    )
    assert "not a model name" in _err(client.post("/api/chat", json={"model": "../x", "prompt": "Hi"}), 400)
    r = client.post("/api/chat", json={"model": tiny, "prompt": "Hi", "max_tokens": 5})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.headers["content-type"] == "application/x-ndjson"
    assert lines[-1]["finish_reason"] == "length" and sum(1 for x in lines if "text" in x) >= 2
    from llm_installer.serve.engine import SamplingParams

    engine = client.studio.engines.get(tiny)
    ids = engine.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    want = engine.generate(ids, None, SamplingParams(max_tokens=5, temperature=0.0)).text
    assert "".join(x.get("text", "") for x in lines) == want  # the engine's own greedy answer
