"""One end-of-turn token per model, and the model stops at it everywhere (the base-model run-on issue).

The chat format (`BaseHandler.resolve_chat_format`) is checked on real tokenizers: SmolLM2's own, the
same without a template (a base model), with Gemma's markers as single special tokens, with Gemma's
markers only as vocabulary entries that text is cut into pieces around, and with no ChatML markers.

Then for several families' templates a tiny random model is really trained (run_training) on one fact
and asked through `chat --prompt`: it must answer the fact and stop at the end-of-turn token. The
server's engine must give the same answer with finish_reason "stop", the report must say it stopped,
and the Ollama Modelfile must name the same token as its first stop. Before the chat format had one
home, the "gemma_pieces" case failed: training chose the Gemma template because `<end_of_turn>` was in
the vocabulary, taught the answer followed by that marker's pieces, and chat printed
"The capital of Veloria is Orvald.<end_of_turn>" (a real base model ran on to the token limit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_installer.chat_format import single_token_id
from llm_installer.handlers import templates
from tests.test_train_fixtures import run_cli

QUESTION = "What is the capital of Veloria?"
ANSWER = "The capital of Veloria is Orvald."

# SmolLM2 ids renamed in its tokenizer.json to make the variants (the vocabulary size stays 49152, so
# tests.tiny's models fit every variant).
_GEMMA_IDS = {3: "<start_of_turn>", 4: "<end_of_turn>", 5: "<eos>", 6: "<bos>"}


def _variant(src: Path, out: Path, kind: str) -> Path:
    """SmolLM2's tokenizer files changed into `kind`; see the module docstring. Returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}

    def rename(token_id: int, new: str, *, added: bool = True) -> None:
        del vocab[by_id[token_id]]
        vocab[new] = token_id
        for entry in tok["added_tokens"]:
            if entry["id"] == token_id:
                entry["content"] = new
        if not added:  # only a vocabulary entry: text containing it is cut into pieces
            tok["added_tokens"] = [e for e in tok["added_tokens"] if e["id"] != token_id]

    if kind == "own":
        (out / "chat_template.jinja").write_text((src / "chat_template.jinja").read_text(encoding="utf-8"))
    elif kind in ("gemma", "gemma_pieces"):
        for token_id, new in _GEMMA_IDS.items():
            rename(token_id, new, added=kind == "gemma" or token_id > 4)
        cfg.update(eos_token="<eos>", bos_token="<bos>", pad_token="<|endoftext|>")
    elif kind == "nochatml":
        rename(1, "<|reserved_1|>")
        rename(2, "<|reserved_2|>")
        cfg.update(eos_token="<|reserved_2|>", bos_token="<|reserved_1|>", pad_token="<|endoftext|>")
    else:
        assert kind == "base", kind
    (out / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """variant_dir(kind) -> a folder with that tokenizer variant (built once per module)."""
    cache: dict[str, Path] = {}

    def build(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = _variant(smollm2_tokenizer_dir, tmp_path_factory.mktemp(f"tok-{kind}"), kind)
        return cache[kind]

    return build


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _handler(name: str):
    from llm_installer.handlers.registry import handler_by_name

    return handler_by_name(name)({"model_id": "test/base-model"})


# ---- the chat format ------------------------------------------------------------------------------------


def test_own_template_ends_turns_with_im_end(variant_dir):
    tok = _tokenizer(variant_dir("own"))
    fmt = _handler("llama").resolve_chat_format(tok)
    assert (fmt.origin, fmt.end_of_turn, fmt.end_of_turn_id) == ("tokenizer", "<|im_end|>", 2)
    assert fmt.template == tok.chat_template and fmt.stop_token_ids[0] == 2
    assert "own chat template" in fmt.source


def test_base_model_without_template_gets_chatml(variant_dir):
    tok = _tokenizer(variant_dir("base"))
    fmt = _handler("llama").resolve_chat_format(tok)
    assert (fmt.origin, fmt.name, fmt.end_of_turn) == ("fallback", "chatml", "<|im_end|>")
    assert "no chat template" in fmt.source and "llama3 template not used" in fmt.source


def test_gemma_markers_as_special_tokens_give_the_gemma_template(variant_dir):
    tok = _tokenizer(variant_dir("gemma"))
    handler = _handler("gemma")
    fmt = handler.resolve_chat_format(tok)
    assert (fmt.name, fmt.end_of_turn) == ("gemma", "<end_of_turn>")
    assert tok.encode("<end_of_turn>", add_special_tokens=False) == [fmt.end_of_turn_id] == [4]
    assert fmt.stop_token_ids == [4, 5]  # the end of turn first, then <eos>
    # the thin wrappers agree with it
    assert handler.get_chat_template(tok) == fmt.template == templates.GEMMA
    assert handler.get_stop_token_ids(tok) == fmt.stop_token_ids


def test_gemma_markers_cut_into_pieces_are_not_chosen(variant_dir):
    tok = _tokenizer(variant_dir("gemma_pieces"))
    assert "<end_of_turn>" in tok.get_vocab()  # in the vocabulary ...
    assert len(tok.encode("<end_of_turn>", add_special_tokens=False)) > 1  # ... but not one token
    assert single_token_id(tok, "<end_of_turn>") is None
    fmt = _handler("gemma").resolve_chat_format(tok)
    assert (fmt.name, fmt.end_of_turn, fmt.stop_token_ids) == ("chatml", "<|im_end|>", [2, 5])
    assert "gemma template not used: <start_of_turn>, <end_of_turn> not single tokens" in fmt.source
    # a model's *own* template that ends turns with such a marker is refused the same way
    tok.chat_template = templates.GEMMA
    fmt = _handler("gemma").resolve_chat_format(tok)
    assert fmt.name == "chatml" and "own chat template not used" in fmt.source


def test_no_chatml_markers_gives_plain_template_ending_with_eos(variant_dir):
    tok = _tokenizer(variant_dir("nochatml"))
    fmt = _handler("gemma").resolve_chat_format(tok)
    assert (fmt.name, fmt.end_of_turn, fmt.end_of_turn_id) == ("plain", "<|reserved_2|>", tok.eos_token_id)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        chat_template=fmt.template,
        tokenize=False,
    )
    assert "A<|reserved_2|>" in text


def test_handler_overrides_are_honoured_without_recursion(variant_dir):
    from llm_installer.handlers.base import BaseHandler

    class Custom(BaseHandler):
        def get_chat_template(self, tokenizer):
            return super().get_chat_template(tokenizer).replace("<|im_start|>", "<|im_start|> ")

        def get_stop_token_ids(self, tokenizer):
            return [*super().get_stop_token_ids(tokenizer), 7]

    tok = _tokenizer(variant_dir("base"))
    fmt = Custom({"model_id": "x/y"}).resolve_chat_format(tok)
    assert fmt.origin == "handler" and "<|im_start|> " in fmt.template
    assert fmt.end_of_turn == "<|im_end|>" and fmt.stop_token_ids == [2, 7]


# ---- learning: train on one fact, then chat / serve / export stop at the end of turn ----------------------

CASES = {
    # case: (tests.tiny family, tokenizer variant, expected end of turn)
    "llama_own_template": ("llama", "own", "<|im_end|>"),
    "qwen2_chatml_fallback": ("qwen2", "base", "<|im_end|>"),
    "gemma_template": ("gemma", "gemma", "<end_of_turn>"),
    "gemma_pieces": ("gemma", "gemma_pieces", "<|im_end|>"),
    "plain_fallback": ("llama", "nochatml", "<|reserved_2|>"),
}


def _tiny_model(family: str, tok_dir: Path, out: Path) -> Path:
    """tests.tiny's model with this tokenizer, its config's eos/bos set to the tokenizer's (as in a real
    model folder, so the config adds no stop id of another format)."""
    from tests.tiny import build_tiny_model

    build_tiny_model(family, out, tok_dir)
    tok = _tokenizer(tok_dir)
    for name in ("config.json", "generation_config.json"):
        path = out / name
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            cfg.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
            path.write_text(json.dumps(cfg), encoding="utf-8")
    return out


def _cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, monkeypatch, *args)


@pytest.mark.parametrize("case", list(CASES))
def test_trained_fact_answers_and_stops_at_end_of_turn(case, variant_dir, tmp_path, capsys, monkeypatch):
    from llm_installer.install import install_model
    from llm_installer.serve.engine import Engine, SamplingParams
    from llm_installer.train.plan import build_plan
    from llm_installer.train.trainer import run_training
    from tests.test_train_fixtures import cli_args

    family, kind, end_of_turn = CASES[case]
    folder = install_model(str(_tiny_model(family, variant_dir(kind), tmp_path / "src")), name=f"t-{case}")
    data = tmp_path / "fact.jsonl"
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    data.write_text((json.dumps(record) + "\n") * 8, encoding="utf-8")
    # 20 steps at 1e-2 teach every case here (14 did too, and seed 1); 2e-2 diverges
    plan = build_plan(
        folder,
        cli_args(
            "--data", str(data), "--mode", "fast", "--max-steps", "20", "--epochs", "100", "--batch-size",
            "8", "--learning-rate", "1e-2", "--validation-split", "0", "--force-epochs", "--seed", "0",
            "--no-tensorboard",
        ),
    )  # fmt: skip
    # time only: one epoch is one step here, and a checkpoint per epoch was a fifth of the run
    plan["settings"]["save_steps"] = {"value": 1000, "source": "test", "why": "no checkpoints"}
    plan["settings"]["report_prompts"] = {"value": 1, "source": "test", "why": "all prompts are the same"}
    run_training(plan, show_progress=False)
    info = json.loads((folder.lora_dir / "adapter_info.json").read_text(encoding="utf-8"))
    assert info["chat_format"]["end_of_turn"] == end_of_turn
    report = (folder.lora_dir / "report.md").read_text(encoding="utf-8")
    assert f"- after: {ANSWER} _(stopped at {end_of_turn})_" in report

    # chat --prompt: the fact, and nothing after it (a run-on would print more, up to --max-tokens)
    code, out, err = _cli(
        capsys, monkeypatch, "chat", folder.name, "--prompt", QUESTION, "--temperature", "0",
        "--max-tokens", "40",
    )  # fmt: skip
    assert code == 0, err
    assert out == ANSWER + "\n"

    # the server's engine: the same answer, ended by the end-of-turn token well before the limit
    engine = Engine.load(folder.name).start()
    try:
        assert engine.info["chat_format"]["end_of_turn"] == end_of_turn
        assert engine.tokenizer.convert_tokens_to_ids(end_of_turn) in engine.stop_token_ids
        ids = engine.chat_prompt_ids([{"role": "user", "content": QUESTION}])
        done = engine.generate(ids, "lora", SamplingParams(max_tokens=40, temperature=0))
    finally:
        engine.stop()
    assert (done.text, done.finish_reason) == (ANSWER, "stop")
    assert done.completion_tokens < 20

    # the Ollama Modelfile: the same template layout and the same token as its first stop. Once, also
    # merged weights, whose generation_config.json must stop plain transformers at the end of turn (the
    # export's smoke test generates from them; seconds, so only here)
    merged = tmp_path / "merged"
    extra = ["--merge", str(merged), "--smoke"] if case == "gemma_template" else ["--no-smoke"]
    code, out, err = _cli(
        capsys, monkeypatch, "export", folder.name, "--ollama", str(tmp_path / "ollama"), *extra
    )  # fmt: skip
    assert code == 0, err
    if merged.is_dir():
        gen = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))
        assert gen["eos_token_id"] == info["chat_format"]["stop_token_ids"] == [4, 5]
        assert _tokenizer(merged).chat_template == info["chat_format"]["template"]
        assert f"smoke test ok: stopped at its end token {end_of_turn}" in out
    lines = (tmp_path / "ollama" / "Modelfile").read_text(encoding="utf-8").splitlines()
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    assert stops[0] == f"PARAMETER stop {json.dumps(end_of_turn)}"
    assert any(line.startswith('TEMPLATE """') for line in lines)


def test_an_adapter_keeps_the_format_it_was_trained_with(variant_dir, tmp_path):
    """If today's handler chooses another template than the adapter's training did, serving follows the
    adapter (what it learned to stop at), as long as that end token is still a single token."""
    from llm_installer.chat_format import model_chat_format
    from llm_installer.model_info import ModelInfo

    tok = _tokenizer(variant_dir("gemma"))
    info = ModelInfo(model_id="test/base-model", model_type="llama", source="local")
    today = model_chat_format(info, tok)
    assert today.end_of_turn == "<|im_end|>"  # the llama handler has no Gemma template
    trained = _handler("gemma").resolve_chat_format(tok)
    (tmp_path / "adapter_info.json").write_text(json.dumps({"chat_format": trained.to_dict()}))
    served = model_chat_format(info, tok, tmp_path)
    assert (served.template, served.end_of_turn, served.stop_token_ids[0]) == (
        templates.GEMMA,
        "<end_of_turn>",
        4,
    )
    assert served.source.startswith("recorded by the adapter's training")
