"""`llm-installer export`: merged weights that plain transformers loads (same logits as base+adapter),
the Ollama Modelfile, the vLLM command, and the smoke test that checks the export stops at its end token."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_serve_support import install_tiny, make_adapter
from tests.test_train_fixtures import run_cli


def _main(capsys, monkeypatch, models: Path, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(models))
    return run_cli(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_factory):
    d = tmp_path_factory.mktemp("export-models")
    install_tiny(d, tiny_model_factory("llama"), name="tiny")
    install_tiny(d, tiny_model_factory("llama"), name="plain", with_lora=False)
    return d


def test_merge_round_trip_logits_and_modelfile(models, tmp_path, capsys, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, olla = tmp_path / "merged", tmp_path / "ollama"
    code, out, err = _main(
        capsys,
        monkeypatch,
        models,
        "export",
        "tiny",
        "--merge",
        str(merged),
        "--ollama",
        str(olla),
        "--no-smoke",
    )
    assert code == 0, err
    assert (merged / "model.safetensors").is_file()
    assert not list(merged.glob("adapter_*"))  # a plain model, no PEFT files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial")]

    src = models / "tiny"
    ids = torch.tensor([[1, 345, 2001, 77, 9000, 12, 5]])
    base = AutoModelForCausalLM.from_pretrained(str(src / "model"), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(src / "lora")).eval()
        want = adapted(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(ids).logits
    assert not torch.allclose(base_logits, want, atol=1e-3)  # the adapter matters...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ...and the merge keeps it exactly

    tok = AutoTokenizer.from_pretrained(str(merged))
    orig = AutoTokenizer.from_pretrained(str(src / "model"))
    assert tok.chat_template == orig.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == orig.apply_chat_template(msgs, tokenize=False)

    text = (olla / "Modelfile").read_text()
    lines = text.splitlines()
    assert f"FROM {merged.resolve()}" in lines
    assert not any(line.startswith("ADAPTER") for line in lines)  # the merged weights already hold it
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert "{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert f"vllm.entrypoints.openai.api_server --model {merged.resolve()}" in out


def test_ollama_adapter_and_vllm_command(models, tmp_path, capsys, monkeypatch):
    code, out, err = _main(
        capsys, monkeypatch, models, "export", "tiny", "--ollama", str(tmp_path), "--no-smoke"
    )
    assert code == 0, err
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert f"FROM {(models / 'tiny' / 'model').resolve()}" in lines
    assert f"ADAPTER {(models / 'tiny' / 'lora').resolve()}" in lines
    assert "--enable-lora --lora-modules tiny-lora=" in out
    # a second run refuses to overwrite without --force
    code, _, err = _main(
        capsys, monkeypatch, models, "export", "tiny", "--ollama", str(tmp_path), "--no-smoke"
    )
    assert code == 2 and "already exists" in err and "--force" in err


def test_refusals_are_one_line_errors(models, tmp_path, capsys, monkeypatch):
    code, _, err = _main(capsys, monkeypatch, models, "export", "plain", "--merge", str(tmp_path / "m"))
    assert code == 2 and "has no adapter" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = _main(capsys, monkeypatch, models, "export", "tiny", "--merge", str(busy))
    assert code == 2 and "not empty" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    # --force replaces only an earlier export: never a folder of the user's, nor the model's own folders
    code, _, err = _main(capsys, monkeypatch, models, "export", "tiny", "--merge", str(busy), "--force")
    assert code == 2 and "not an earlier export" in err and "Traceback" not in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    for own in (models / "tiny", models / "tiny" / "model", models / "tiny" / "lora", models):
        code, _, err = _main(capsys, monkeypatch, models, "export", "tiny", "--merge", str(own), "--force")
        assert code == 2 and "the model's own folder" in err, own
    assert (models / "tiny" / "model" / "config.json").is_file()
    assert (models / "tiny" / "lora" / "adapter_config.json").is_file()


def test_smoke_test_catches_a_run_on_model(models, tmp_path, capsys, monkeypatch):
    # random weights never produce the end token: the smoke test must say so (exit 1), export stays usable
    code, out, err = _main(capsys, monkeypatch, models, "export", "tiny", "--merge", str(tmp_path / "m"))
    assert code == 1
    assert "smoke test failed" in err and "end token" in err
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_template_translation_families():
    from llm_installer.export import _OLLAMA_TEMPLATES, modelfile_text, template_family

    assert template_family("{{ '<|im_start|>' + m['role'] }}") == "chatml"
    assert template_family("<|start_header_id|>{{ role }}<|end_header_id|>") == "llama3"
    assert template_family("<start_of_turn>user") == "gemma"
    assert template_family("<|user|>{{ x }}<|end|>") == "phi3"
    assert template_family("[INST] {{ x }} [/INST]") is None

    class Tok:
        def convert_ids_to_tokens(self, i: int) -> str:
            return {7: "<|eot_id|>", 9: "</s>"}[i]

    text, note = modelfile_text(
        from_path=Path("/m"),
        adapter=None,
        template="<|start_header_id|>",
        tokenizer=Tok(),
        stop_token_ids=[7],
        model_name="x",
    )
    assert note is None and _OLLAMA_TEMPLATES["llama3"] in text
    assert 'PARAMETER stop "<|eot_id|>"' in text
    text, note = modelfile_text(
        from_path=Path("/m"),
        adapter=Path("/a"),
        template="[INST]",
        tokenizer=Tok(),
        stop_token_ids=[9],
        model_name="x",
    )
    assert note and "no known Ollama translation" in note
    assert "TEMPLATE" not in text.replace("write TEMPLATE", "") and "ADAPTER /a" in text
    assert 'PARAMETER stop "</s>"' in text


@pytest.mark.slow
def test_smollm2_export_stops_at_its_end_token(smollm2_model_dir, tmp_path, capsys, monkeypatch):
    """End to end on the real bundled model with a small adapter: the merged export answers and stops."""
    models = tmp_path / "models"
    root = install_tiny(models, smollm2_model_dir, name="smol", with_lora=False, link=True)
    make_adapter(root / "model", root / "lora", scale=0.002)
    out = tmp_path / "merged"
    code, stdout, err = _main(capsys, monkeypatch, models, "export", "smol", "--merge", str(out))
    assert code == 0, err
    assert "smoke test ok: stopped at its end token <|im_end|>" in stdout
    assert "Paris" in stdout
