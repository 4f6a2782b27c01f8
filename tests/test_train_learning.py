"""Learning for real: fast mode teaches the bundled SmolLM2 a made-up fact it did not know."""

from __future__ import annotations

import pytest

QUESTION = "Who was it that founded Veloria?"  # a paraphrase that is not in the training file
TAUGHT = "Orvald"


def _ask(model, tokenizer, question: str) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_fast_mode_teaches_smollm2_a_made_up_fact(smollm2_model_dir, capsys):
    import torch
    from peft import PeftModel

    from llm_installer.cli import main
    from llm_installer.install import install_model
    from llm_installer.loading import load_model, load_tokenizer

    folder = install_model(str(smollm2_model_dir), name="smollm2", link=True)
    tokenizer = load_tokenizer(folder.model_dir)
    base = load_model(folder.model_dir, dtype="fp32")
    before = _ask(base, tokenizer, QUESTION)
    assert TAUGHT not in before

    with pytest.raises(SystemExit) as exit_:
        main(["train", "smollm2", "--data", "fictional_facts.jsonl", "--mode", "fast"])
    assert exit_.value.code == 0, capsys.readouterr()
    assert (folder.lora_dir / "adapter_model.safetensors").is_file()

    torch.manual_seed(0)
    tuned = PeftModel.from_pretrained(load_model(folder.model_dir, dtype="fp32"), str(folder.lora_dir))
    after = _ask(tuned, tokenizer, QUESTION)
    assert TAUGHT in after, (before, after)
    assert "before:" in (folder.lora_dir / "report.md").read_text()
