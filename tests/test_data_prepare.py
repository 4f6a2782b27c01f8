"""prepare_dataset end to end with the real registry handler: splitting, limits, cache, rejects file,
handler formats; and `llm-installer data inspect` as a user runs it."""

from __future__ import annotations

import json
import shutil

import pytest

from llm_installer.data.prepare import DataSettings, prepare_dataset
from llm_installer.data.render import IGNORE_INDEX
from llm_installer.errors import DataError
from llm_installer.model_info import ModelInfo


def llama_handler():
    from llm_installer.handlers.registry import get_handler

    return get_handler(
        ModelInfo(
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct", model_type="llama", family="llama",
            architecture="LlamaForCausalLM", architectures=["LlamaForCausalLM"], task="causal_lm",
            has_chat_template=True, is_instruct=True,
        )
    )  # fmt: skip


@pytest.fixture
def tok(smollm2_tokenizer_dir):
    """A fresh tokenizer per test: the handler sets its pad token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))


def data_file(tmp_path, n=40):
    rows = [{"instruction": f"Question number {i}?", "output": f"Answer {i}."} for i in range(n)]
    rows.append({"instruction": "broken"})
    rows.append(rows[0])  # an exact duplicate
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answers(tok, examples):
    return sorted(tok.decode([t for t, lab in zip(e["input_ids"], e["labels"], strict=True) if lab != IGNORE_INDEX])
                  for e in examples)  # fmt: skip


def test_prepare_with_the_registry_handler(tmp_path, tok):
    path = data_file(tmp_path)
    handler = llama_handler()
    settings = DataSettings(
        validation_split=0.25, seed=3, rejects_path=str(tmp_path / "run" / "rejects.jsonl")
    )
    data = prepare_dataset(str(path), tok, handler, settings)
    assert (len(data.train), len(data.validation)) == (30, 10)
    assert tok.pad_token != tok.eos_token  # the handler's tokenizer config was applied
    s = data.stats
    assert (s["records_read"], s["records_used"], s["rejects"], s["duplicates"]) == (42, 40, 1, 1)
    assert s["formats"] == {"alpaca": 41}
    assert s["reject_reasons"] == {"alpaca: missing field 'output'": 1}
    assert s["files"] == [
        {"path": str(path), "kind": "jsonl", "format": "alpaca", "records": 41, "rejects": 1}
    ]
    assert s["tokens"]["count"] == 40 and s["tokens"]["min"] > 10
    assert answers(tok, data.train + data.validation) == sorted(f"Answer {i}.<|im_end|>" for i in range(40))
    (line,) = (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()
    assert json.loads(line) == {
        "origin": f"{path}:41",
        "reason": "alpaca: missing field 'output'",
        "record": {"instruction": "broken"},
    }
    assert data.rejects_path == tmp_path / "run" / "rejects.jsonl"
    json.dumps(s)  # plain JSON for reports


def test_split_is_deterministic_with_the_seed(tmp_path, tok):
    path = data_file(tmp_path)

    def run(seed, **kw):
        d = prepare_dataset(str(path), tok, None, DataSettings(validation_split=5, seed=seed, **kw))
        return [e["input_ids"] for e in d.train], [e["input_ids"] for e in d.validation]

    first = run(1)
    assert run(1) == first
    assert run(2) != first
    assert len(first[1]) == 5
    unshuffled = run(1, shuffle=False)
    assert [tok.decode(x).count("Question number 0?") for x in unshuffled[0][:1]] == [1]  # file order kept
    limited = prepare_dataset(str(path), tok, None, DataSettings(max_examples=7, validation_split=0.3))
    assert (len(limited.train), len(limited.validation)) == (5, 2)


def test_second_run_hits_the_cache_and_changes_invalidate_it(tmp_path, tok):
    path = data_file(tmp_path)
    cache = tmp_path / "cache"
    settings = DataSettings(
        cache_dir=str(cache), rejects_path=str(tmp_path / "rejects.jsonl"), validation_split=0.1
    )
    first = prepare_dataset(str(path), tok, None, settings)
    assert first.stats["cached"] is False
    (tmp_path / "rejects.jsonl").unlink()
    second = prepare_dataset(str(path), tok, None, settings)
    assert second.stats["cached"] is True
    assert second.fingerprint == first.fingerprint
    assert (second.train, second.validation) == (first.train, first.validation)
    assert (tmp_path / "rejects.jsonl").is_file()  # rejects are reported again from the cache
    other = prepare_dataset(str(path), tok, None, DataSettings(cache_dir=str(cache), max_seq_length=100))
    assert other.fingerprint != first.fingerprint and other.stats["cached"] is False
    with path.open("a") as f:
        f.write(json.dumps({"instruction": "new", "output": "row"}) + "\n")
    changed = prepare_dataset(str(path), tok, None, settings)
    assert changed.fingerprint != first.fingerprint and changed.stats["cached"] is False
    assert len(list(cache.glob("data-*.npz"))) == 3


def test_strict_and_bad_settings_fail_with_one_line(tmp_path, tok):
    path = data_file(tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl:41: alpaca: missing field 'output' \(--strict"):
        prepare_dataset(str(path), tok, None, DataSettings(strict=True))
    with pytest.raises(DataError, match=r"--validation-split 40: leaves no training records out of 40"):
        prepare_dataset(str(path), tok, None, DataSettings(validation_split=40))
    with pytest.raises(DataError, match=r"--validation-split 1.5: give a fraction between 0 and 1"):
        prepare_dataset(str(path), tok, None, DataSettings(validation_split=1.5))


def test_images_for_a_text_model_are_refused(tmp_path, tok):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="has images or video frames but the model has no image processor"):
        prepare_dataset(str(path), tok, None, DataSettings())


def test_bundled_example_for_train_sh(tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = prepare_dataset("test_data.json", tok, llama_handler(), DataSettings())
    assert data.stats["notes"][0].startswith("test_data.json is not a path here: using the bundled example")
    assert data.stats["train_examples"] >= 5


def test_data_inspect_cli(tmp_path, monkeypatch, smollm2_tokenizer_dir, capsys):
    """The command as a user runs it, with the bundled tokenizer from the user cache."""
    from llm_installer import cli
    from llm_installer.data import inspect as data_inspect
    from llm_installer.sources.bundled import bundled_gguf_path

    cache_home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))

    # the first use converts the GGUF (~20 s) into the user cache; pre-fill it from the session fixture
    cache = data_inspect.bundled_tokenizer_cache(bundled_gguf_path())
    assert cache.parent == cache_home / "llm-installer"
    shutil.copytree(smollm2_tokenizer_dir, cache)
    path = data_file(tmp_path, n=5)
    monkeypatch.setenv("NO_COLOR", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "inspect", str(path), "--max-seq-length", "40"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "alpaca" in out and "records: 6 usable, 1 rejected, 1 exact duplicates" in out
    assert f"{path}:6: alpaca: missing field 'output'" in out
    assert "tokens per record (bundled SmolLM2-135M-Instruct): min" in out
    assert "«Answer 0.<|im_end|>»" in out
    assert data_inspect.bundled_tokenizer is not None

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "inspect", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err
