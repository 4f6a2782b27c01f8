"""Learning for real: DPO on the bundled preference pairs teaches SmolLM2 a visible style (issue 15).

The bundled `preferences.jsonl` prefers a pirate-flavoured answer ("Ahoy! The answer be X, matey!") over a
plain one ("The answer is X."). Held-out pairs (questions not in the file) must gain log-probability
margin of chosen over rejected, and the greedy chat answer to a held-out question must move to the style.
"""

from __future__ import annotations

import pytest

HELD_OUT = [
    ("What is the capital of Portugal?", "Lisbon"),
    ("What colour is a ripe tomato?", "red"),
    ("How many months are in a year?", "twelve"),
    ("What do you call a baby sheep?", "a lamb"),
]
QUESTION = "What is the capital of Norway?"


def _margins(model, tokenizer) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) through the chat template, per held-out pair."""
    import torch

    out = []
    for q, a in HELD_OUT:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        scores = []
        for answer in (f"Ahoy! The answer be {a}, matey!", f"The answer is {a}."):
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + a_ids])
            with torch.no_grad():
                logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            targets = ids[0, 1:]
            token_lp = logps.gather(-1, targets[:, None])[:, 0]
            scores.append(float(token_lp[len(p_ids) - 1 :].sum()))
        out.append(scores[0] - scores[1])
    return out


def _ask(model, tokenizer, question: str) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_dpo_teaches_smollm2_the_preferred_style(smollm2_model_dir, capsys):
    import json

    from peft import PeftModel

    from llm_installer.cli import main
    from llm_installer.install import install_model
    from llm_installer.loading import load_model, load_tokenizer

    folder = install_model(str(smollm2_model_dir), name="smollm2", link=True)
    tokenizer = load_tokenizer(folder.model_dir)
    base = load_model(folder.model_dir, dtype="fp32")
    before_margins = _margins(base, tokenizer)
    before = _ask(base, tokenizer, QUESTION)
    assert "matey" not in before.lower() and "ahoy" not in before.lower()

    with pytest.raises(SystemExit) as exit_:
        # 6 steps of 4 pairs at fast mode's rate: the margin is clear by then (about 2 min on 2 idle cores)
        main(
            [
                "train",
                "smollm2",
                "--data",
                "preferences.jsonl",
                "--method",
                "dpo",
                "--mode",
                "fast",
                "--max-steps",
                "6",
            ]
        )
    out = capsys.readouterr()
    assert exit_.value.code == 0, out
    info = json.loads((folder.lora_dir / "adapter_info.json").read_text())
    assert info["objective"] == "dpo"

    tuned = PeftModel.from_pretrained(base, str(folder.lora_dir))
    after_margins = _margins(tuned, tokenizer)
    after = _ask(tuned, tokenizer, QUESTION)
    print(f"margins before {before_margins} after {after_margins}\nbefore: {before!r}\nafter: {after!r}")
    assert all(a > b for a, b in zip(after_margins, before_margins, strict=True)), (
        before_margins,
        after_margins,
    )
    assert sum(after_margins) / len(after_margins) > sum(before_margins) / len(before_margins) + 5
    assert "ahoy" in after.lower() or "matey" in after.lower(), (before, after)
    report = (folder.lora_dir / "report.md").read_text()
    assert "before:" in report
