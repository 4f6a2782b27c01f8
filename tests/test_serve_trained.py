"""End to end through the real pipeline: install (installer), train a LoRA (trainer, via the CLI), then
serve — the base model and `NAME:lora` answer differently through the official OpenAI client, and the
adapter's training record shows up in the server's model info."""

from __future__ import annotations

import httpx
import openai
import pytest

from llm_installer.serve.app import background_server


def test_trained_adapter_changes_served_answers(tiny_model_factory, capsys, monkeypatch):
    from llm_installer.cli import main
    from llm_installer.install import install_model
    from llm_installer.serve.engine import Engine

    folder = install_model(str(tiny_model_factory("llama")), name="test/tiny")
    with pytest.raises(SystemExit) as exc:
        main(["train", folder.name, "--data", "fictional_facts.jsonl", "--max-steps", "6",
              "--learning-rate", "1e-2", "--no-tensorboard"])  # fmt: skip
    assert exc.value.code == 0, capsys.readouterr().err
    assert folder.has_adapter and (folder.lora_dir / "adapter_info.json").is_file()

    engine = Engine.load(folder.name).start()
    try:
        with background_server(engine) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
            assert [m.id for m in client.models.list().data] == [folder.name, folder.name + ":lora"]
            msgs = [{"role": "user", "content": "Who founded the city of Veltrana?"}]
            answers = {
                model: client.chat.completions.create(
                    model=model, messages=msgs, temperature=0, max_tokens=12
                )
                .choices[0]
                .message.content
                for model in (folder.name, folder.name + ":lora")
            }
            assert answers[folder.name] != answers[folder.name + ":lora"]
            info = httpx.get(url + "/info").json()
            assert info["adapter_info"]["base_model"]["model_id"] == "test/tiny"
            assert info["adapter_info"]["handler"]
    finally:
        engine.stop()
