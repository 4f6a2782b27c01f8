"""`llm-installer export --gguf`: the file transformers' own GGUF reader loads back gives the merged model's
logits (f16 within 1e-3 relative, q8_0 within the measured tolerance below), the same tokenizer, chat
template and greedy answer, and stops at the end-of-turn token; refusals are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_serve_support import install_tiny
from tests.test_train_fixtures import run_cli

IDS = [[1, 345, 2001, 77, 9000, 12, 5, 4000, 31, 2]]
# Against the merged model with its matrices rounded to float16 (what an f16 file holds), the file's
# logits agree to float32 noise: every conversion step (names, q/k permutation, norm offsets) is exact.
F16_REL = 1e-3
# Against the float32 merged model (tiny random llama with its LoRA merged), measured: f16 max |diff| /
# max |logit| 0.0074; q8_0 |diff| / |logits| (norms) 0.070, max-based 0.22. Random 64-wide weights are
# the worst case for 8-bit blocks; the fast-trained SmolLM2 (slow test below) measured norm 0.030, max 0.049.
F16_VS_F32 = 0.02
Q8_REL = 0.15


def _main(capsys, monkeypatch, models: Path, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(models))
    return run_cli(capsys, monkeypatch, *args)


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _norm_rel(got, want) -> float:
    return float((got - want).norm() / want.norm())


def _load_gguf(path: Path, **config):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **config
    ).eval()


def _rounded(model, kind: str = "F16"):
    """`model` with every matrix stored as GGML type `kind` and read back (gguf.quants): the weights
    a file of that type holds, so the file's logits must equal this model's."""
    import copy

    import gguf
    import torch

    qtype = gguf.GGMLQuantizationType[kind]
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                data = p.detach().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
    return model


def _reference(root: Path, with_lora: bool):
    """The merged model the export should equal: base + adapter through PEFT, or the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32)
    if with_lora:
        model = PeftModel.from_pretrained(model, str(root / "lora")).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_factory):
    d = tmp_path_factory.mktemp("gguf-models")
    root = install_tiny(d, tiny_model_factory("llama"), name="tiny")  # with a LoRA adapter
    assert (root / "lora" / "adapter_config.json").is_file()
    # installed as tiny-FAMILY: transformers' reader takes a file whose general.name is exactly "mistral"
    # for a gguf-py arch "mistral", which gguf 0.19 does not have (llama.cpp reads it as llama)
    for family in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2"):
        install_tiny(d, tiny_model_factory(family), name=f"tiny-{family}", with_lora=False)
    return d


# qwen3: transformers' reader does not read `attention.key_length` for qwen3 (Qwen3Config defaults
# head_dim to 128), so the round trip passes the head size the file states.
_READER_GAPS = {"qwen3": {"head_dim": 16}}


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "phi3"])
def test_families_round_trip_f16(family, models, tmp_path, capsys, monkeypatch):
    import torch

    out = tmp_path / f"{family}.gguf"
    code, stdout, err = _main(
        capsys, monkeypatch, models, "export", f"tiny-{family}", "--gguf", str(out), "--no-smoke"
    )
    assert code == 0, err
    assert "base weights, no adapter" in stdout and str(out) in stdout
    ids = torch.tensor(IDS)
    ref = _reference(models / f"tiny-{family}", with_lora=False)
    with torch.no_grad():
        got = _load_gguf(out, **_READER_GAPS.get(family, {}))(ids).logits
        want, full = _rounded(ref)(ids).logits, ref(ids).logits
    print(f"{family} f16: vs f16-rounded {_rel(got, want):.2e}, vs float32 {_rel(got, full):.2e}")
    assert _rel(got, want) < F16_REL, _rel(got, want)
    assert _rel(got, full) < F16_VS_F32


def test_llama_merged_f16_q8_tokenizer_and_stop(models, tmp_path, capsys, monkeypatch):
    """The adapter is merged in (logits differ from the base), tied embeddings write no output.weight,
    the tokenizer and chat template come back, and greedy decoding matches and stops at <|im_end|>."""
    import gguf
    import torch
    from transformers import AutoTokenizer

    f16, q8 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for path, quant in ((f16, "f16"), (q8, "q8_0")):
        code, _out, err = _main(
            capsys, monkeypatch, models, "export", "tiny", "--gguf", str(path), "--quant", quant, "--no-smoke"
        )
        assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial")]
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "Q8_0"
    assert names["blk.0.attn_norm.weight"] == "F32" and names["blk.1.attn_q.weight"] == "Q8_0"

    ref, base = _reference(models / "tiny", True), _reference(models / "tiny", False)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        want = ref(ids).logits
        assert _rel(base(ids).logits, want) > 0.05  # the adapter matters...
        a, b = _load_gguf(f16)(ids).logits, _load_gguf(q8)(ids).logits
        half, q8_ref = _rounded(ref)(ids).logits, _rounded(ref, "Q8_0")(ids).logits
    print(
        f"llama f16: vs f16-rounded {_rel(a, half):.2e}, vs f32 {_rel(a, want):.2e}; q8_0: vs q8_0-rounded "
        f"{_rel(b, q8_ref):.2e}, vs f32 {_rel(b, want):.2e} (norm {_norm_rel(b, want):.2e})"
    )
    assert _rel(a, half) < F16_REL and _rel(b, q8_ref) < F16_REL  # ...and the GGUF keeps it exactly
    assert _rel(a, want) < F16_VS_F32 and _norm_rel(b, want) < Q8_REL

    tok = AutoTokenizer.from_pretrained(str(f16.parent), gguf_file=f16.name)
    orig = AutoTokenizer.from_pretrained(str(models / "tiny" / "model"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = orig.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.chat_template == orig.chat_template
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert tok(text).input_ids == orig(text).input_ids

    loaded = _load_gguf(f16)
    assert loaded.generation_config.eos_token_id == orig.convert_tokens_to_ids("<|im_end|>")
    prompt = torch.tensor([orig(text).input_ids])
    with torch.no_grad():
        a = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        b = loaded.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert a.tolist() == b.tolist()


def test_gemma_file_layout(models, tmp_path, capsys, monkeypatch):
    """Gemma (v1): transformers has no GGUF reader for it, so check the file against the model directly:
    llama.cpp names, norms stored as 1 + w, no q/k permutation, head size and vocabulary stated."""
    import gguf
    import numpy as np

    out = tmp_path / "g.gguf"
    code, _o, err = _main(
        capsys,
        monkeypatch,
        models,
        "export",
        "tiny-gemma",
        "--gguf",
        str(out),
        "--quant",
        "f32",
        "--no-smoke",
    )
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    sd = _reference(models / "tiny-gemma", False).state_dict()
    np.testing.assert_array_equal(
        tensors["blk.0.attn_norm.weight"], sd["model.layers.0.input_layernorm.weight"] + 1
    )
    np.testing.assert_array_equal(
        tensors["blk.1.attn_q.weight"], sd["model.layers.1.self_attn.q_proj.weight"]
    )
    assert set(tensors) == {
        gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, 2).get_name(k, try_suffixes=(".weight",))
        for k in sd
        if k != "lm_head.weight"
    }
    field = reader.get_field("gemma.attention.key_length")
    assert field is not None and field.contents() == 16
    assert reader.get_field("general.architecture").contents() == "gemma"
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == 49152


def test_q4_0_and_ollama_from_the_gguf(models, tmp_path, capsys, monkeypatch):
    import gguf

    out, olla = tmp_path / "m.gguf", tmp_path / "ollama"
    code, stdout, err = _main(
        capsys, monkeypatch, models, "export", "tiny", "--gguf", str(out), "--quant", "q4_0",
        "--ollama", str(olla), "--no-smoke",
    )  # fmt: skip
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_up.weight"] == "Q4_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["output_norm.weight"] == "F32"
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    lines = (olla / "Modelfile").read_text().splitlines()
    assert f"FROM {out}" in lines
    assert not any(line.startswith("ADAPTER") for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines


def test_refusals_are_one_line(models, tmp_path, capsys, monkeypatch):
    code, _o, err = _main(
        capsys, monkeypatch, models, "export", "tiny-gpt2", "--gguf", str(tmp_path / "x.gguf")
    )
    assert code != 0 and "GGUF export does not support the gpt2 family yet" in err
    assert "Traceback" not in err and not (tmp_path / "x.gguf").exists()

    code, _o, err = _main(capsys, monkeypatch, models, "export", "tiny", "--gguf", str(tmp_path / "x.bin"))
    assert code != 0 and "give a file name ending in .gguf" in err

    code, _o, err = _main(capsys, monkeypatch, models, "export", "tiny", "--gguf", "x.gguf", "--quant", "q3")
    assert code != 0 and "--quant q3: unknown GGUF type" in err

    other = tmp_path / "notes.gguf"
    other.write_text("mine")
    code, _o, err = _main(capsys, monkeypatch, models, "export", "tiny", "--gguf", str(other))
    assert code != 0 and "already exists; choose another file or pass --force" in err
    code, _o, err = _main(capsys, monkeypatch, models, "export", "tiny", "--gguf", str(other), "--force")
    assert code != 0 and "is not a GGUF file" in err
    assert other.read_text() == "mine"


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    """A SentencePiece-style vocabulary (BPE with byte fallback and "▁" for spaces, as Llama-2, Mistral,
    Gemma and Phi-3 ship) goes in as llama.cpp's `llama` tokenizer and reads back to the same ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaTokenizerFast

    from llm_installer.chat_format import ChatFormat
    from llm_installer.gguf_export import write_gguf

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    text = ["The capital of France is Paris. Hello world, how are you today?", "Numbers 123, symbols #!% é ü"]
    backend.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok = LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}<s>[INST] {{ m['content'] }} [/INST]{% endfor %}"
    tok.save_pretrained(str(tmp_path / "tok"))  # as an installed model's folder holds it
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    cfg = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    fmt = ChatFormat(template=tok.chat_template, end_of_turn="</s>", end_of_turn_id=2, stop_token_ids=[2])
    out = tmp_path / "spm.gguf"
    write_gguf(out, AutoModelForCausalLM.from_config(cfg), tok, fmt, arch="llama", quant="f32", name="spm")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in ("The capital of France is Paris.", "Hello  world 123 é#", " leading space"):
        assert back(text).input_ids == tok(text).input_ids, text
    assert back.chat_template == tok.chat_template and back.eos_token == "</s>"


@pytest.mark.slow
def test_trained_smollm2_gguf_answers_the_taught_fact(smollm2_model_dir, tmp_path, capsys, monkeypatch):
    """End to end: fast training teaches the bundled SmolLM2 a made-up fact; the q8_0 GGUF export (read
    back by transformers, through the CLI's own smoke test too) answers it and stops at <|im_end|>."""
    import torch

    from llm_installer.cli import main
    from llm_installer.install import install_model
    from tests.test_train_learning import QUESTION, TAUGHT, _ask

    folder = install_model(str(smollm2_model_dir), name="smollm2", link=True)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "smollm2", "--data", "fictional_facts.jsonl", "--mode", "fast"])
    assert exit_.value.code == 0, capsys.readouterr()

    out = tmp_path / "smol.gguf"
    code, stdout, err = run_cli(
        capsys, monkeypatch, "export", "smollm2", "--gguf", str(out), "--quant", "q8_0"
    )
    assert code == 0, err
    assert "smoke test ok: stopped at its end token <|im_end|>" in stdout, stdout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    model = _load_gguf(out)
    torch.manual_seed(0)
    answer = _ask(model, tok, QUESTION)
    assert TAUGHT in answer, answer

    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        got = model(ids).logits
        want = _reference(folder.root, with_lora=True)(ids).logits
    print(f"SmolLM2 q8_0 vs float32 merged: max {_rel(got, want):.2e}, norm {_norm_rel(got, want):.2e}")
    assert _norm_rel(got, want) < Q8_REL
