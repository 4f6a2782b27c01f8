"""Preference training (DPO/ORPO, issue 15): pair formats and rejects, masks, plan keys, tiny-model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_installer.errors import UserError
from llm_installer.train.plan import build_plan
from tests import test_train_fixtures as fx
from tests.test_train_fixtures import cli_args, read_json

tiny_installed = fx.tiny_installed  # the shared fixture

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "Ahoy, four!", "rejected": "4."},
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Ahoy!"}],
        "rejected": [{"role": "assistant", "content": "Hello."}],
    },
    {
        "chosen": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Ahoy matey"}],
        "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hi"}],
    },
    {
        "conversations": [{"from": "human", "value": "Yo"}],
        "chosen": {"from": "gpt", "value": "Ahoy there"},
        "rejected": {"from": "gpt", "value": "Yo."},
    },
    {
        "messages": [{"role": "user", "content": "Morning"}],
        "chosen": {"role": "assistant", "content": "Ahoy, morning!"},
        "rejected": {"role": "assistant", "content": "Morning."},
    },
]
BAD = [
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "preference: 'chosen' is empty"),
    (
        {"prompt": "x", "chosen": "same", "rejected": "same "},
        "preference: chosen and rejected are identical: nothing to prefer",
    ),
    (
        {"chosen": "a", "rejected": "b"},
        "preference_chat: missing prompt: chosen and rejected are plain answers, so a 'prompt' field is needed",
    ),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "preference: missing prompt: 'prompt' is empty"),
    (
        {
            "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
        },
        "preference_chat: chosen and rejected follow different conversations: they must share the history",
    ),
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pair_formats_are_detected_and_bad_pairs_rejected_with_reasons(tmp_path):
    from llm_installer.data.load import load_records

    result = load_records(_write(tmp_path / "p.jsonl", PAIRS + [b for b, _ in BAD]))
    assert [r.format for r in result.records] == [
        "preference",
        "preference",
        "preference_chat",
        "sharegpt_preference",
        "openai_preference",
    ]
    assert [(r.messages[-1]["content"], r.rejected) for r in result.records] == [
        ("Ahoy, four!", "4."),
        ("Ahoy!", "Hello."),
        ("Ahoy matey", "Hi"),
        ("Ahoy there", "Yo."),
        ("Ahoy, morning!", "Morning."),
    ]
    assert [r.messages[:-1] for r in result.records][3] == [{"role": "user", "content": "Yo"}]
    assert [r.reason for r in result.rejects] == [reason for _, reason in BAD]


def test_pair_masks_are_the_answers_with_their_end_of_turn(tmp_path, smollm2_tokenizer):
    """Prompt = the rendered history + generation prompt; each side = its answer tokens + <|im_end|>."""
    from llm_installer.data.preference import describe_pair, prepare_pairs
    from llm_installer.data.prepare import DataSettings

    data = prepare_pairs(
        str(_write(tmp_path / "p.jsonl", PAIRS[:1])),
        smollm2_tokenizer,
        None,
        DataSettings(validation_split=0),
    )
    (pair,) = data.train
    tok = smollm2_tokenizer
    expected_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(pair["prompt_ids"]) == expected_prompt
    assert tok.decode(pair["chosen_ids"]) == "Ahoy, four!<|im_end|>"
    assert tok.decode(pair["rejected_ids"]) == "4.<|im_end|>"
    rows = describe_pair(pair, tok)
    assert rows[1][0].startswith("chosen (") and rows[1][2].endswith("|<|im_end|>")


def test_supervised_data_is_refused_for_dpo(tmp_path, smollm2_tokenizer):
    from llm_installer.data.preference import prepare_pairs
    from llm_installer.data.prepare import DataSettings
    from llm_installer.errors import DataError

    path = _write(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(
        DataError,
        match="preference training needs pairs with chosen and rejected answers, but the data is alpaca",
    ):
        prepare_pairs(str(path), smollm2_tokenizer, None, DataSettings())


def test_plan_keys_and_their_sources(tiny_installed):
    plan = build_plan(tiny_installed, cli_args("--data", "preferences.jsonl", "--method", "dpo"))
    s = plan["settings"]
    assert s["objective"] == {"value": "dpo", "source": "user", "why": "--method dpo (on a LoRA adapter)"}
    assert plan.value("method") == "lora" and plan.source("method") == "default"
    assert s["beta"] == {
        "value": 0.1,
        "source": "default",
        "why": "DPO's usual beta (TRL's default); ORPO's odds-ratio weight",
    }
    assert s["loss_type"] == {"value": "sigmoid", "source": "user", "why": "dpo's own loss"}
    assert plan.value("packing") is False and plan.value("fused_lora") is False
    assert plan.value("attn_implementation") == "sdpa"  # padded pair rows, not the packed-rows kernel
    plan = build_plan(
        tiny_installed,
        cli_args("--data", "p", "--objective", "orpo", "--method", "dora", "--beta", "0.3"),
    )
    assert (plan.value("objective"), plan.value("method"), plan.value("loss_type")) == (
        "orpo",
        "dora",
        "orpo",
    )
    assert plan["settings"]["beta"] == {"value": 0.3, "source": "user", "why": "--beta"}
    sft = build_plan(tiny_installed, cli_args("--data", "p"))
    assert sft.value("objective") == "sft" and sft.value("loss_type") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--method", "dpo", "--loss-type", "orpo"),
            "--loss-type 'orpo' is unknown for dpo: use one of sigmoid, hinge",
        ),
        (("--beta", "0.2"), "--beta applies to preference training: add --method dpo or --method orpo"),
        (("--method", "dpo", "--beta", "0"), "--beta must be positive, got 0.0"),
        (("--objective", "kto"), "--objective 'kto' is unknown: use one of sft, dpo, orpo"),
        (("--method", "dpo", "--objective", "orpo"), "--method dpo and --objective orpo disagree: give one"),
    ],
)
def test_bad_preference_flags_are_one_line_errors(tiny_installed, argv, message):
    with pytest.raises(UserError) as err:
        build_plan(tiny_installed, cli_args("--data", "p", *argv))
    assert str(err.value).startswith(message)


def _pairs_file(tmp_path: Path, n: int = 12) -> Path:
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Ahoy, answer {i}!", "rejected": f"Answer {i}."}
        for i in range(n)
    ]
    return _write(tmp_path / "pairs.jsonl", rows)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_tiny_preference_run_trains_only_lora_with_the_base_as_reference(tiny_installed, tmp_path, objective):
    import torch
    from safetensors.torch import load_file

    from llm_installer.train.trainer import run_training

    argv = [
        "--data",
        str(_pairs_file(tmp_path)),
        "--method",
        objective,
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    ]
    argv += [
        "--validation-split",
        "0.25",
        "--no-tensorboard",
        "--precision",
        "fp32",
        "--learning-rate",
        "0.01",
    ]
    seen = {}

    from transformers import TrainerCallback

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            # the reference is the base model: no "ref" adapter copy, the adapter disabled gives base logits
            seen["adapters"] = sorted(model.peft_config)
            ids = torch.tensor([[1, 2, 3, 4, 5]])
            with torch.no_grad(), model.disable_adapter():
                seen["ref"] = model(input_ids=ids).logits
            seen["base"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
            seen["ids"] = ids

    result = run_training(
        build_plan(tiny_installed, cli_args(*argv)), show_progress=False, extra_callbacks=[Peek()]
    )
    info = read_json(result.adapter_dir / "adapter_info.json")
    assert info["objective"] == objective and info["method"] == "lora"
    assert info["metrics"]["global_step"] == 3
    hist = read_json(result.run_dir / "metrics.json")["log_history"]
    losses = [e["loss"] for e in hist if "loss" in e] + [e["eval_loss"] for e in hist if "eval_loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert any(k.endswith("rewards/margins") for e in hist for k in e)
    assert seen["adapters"] == ["default"]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_installed.model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(seen["ref"], base(input_ids=seen["ids"]).logits)
    # the base weights did not move; the adapter did (B starts at zero)
    base_state = dict(base.named_parameters())
    for name, before in seen["base"].items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in base_state:
            torch.testing.assert_close(before, base_state[key].detach())
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_data_inspect_shows_a_pair_with_both_answers_and_their_masks(capsys, monkeypatch):
    code, out, _ = fx.run_cli(capsys, monkeypatch, "data", "inspect", "preferences.jsonl")
    assert code in (0, None)
    assert "│ jsonl │ preference │      40 │       0 │" in out
    assert "chosen (12 trained tokens): «Ahoy! The answer be Paris, matey!<|im_end|>»" in out
    assert "rejected (6 trained tokens): «The answer is Paris.<|im_end|>»" in out
    assert "What is the capital of France?<|im_end|>" in out


def _tiny_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(_pairs_file(tmp_path, 8)),
        "--batch-size",
        "4",
        "--validation-split",
        "0",
        "--no-tensorboard",
        "--precision",
        "fp32",
        *extra,
    ]


def test_dpo_resumes_from_its_checkpoint(tiny_installed, tmp_path):
    from llm_installer.train.trainer import checkpoints, run_training

    argv = _tiny_argv(tmp_path, "--method", "dpo", "--force-epochs")
    first = run_training(build_plan(tiny_installed, cli_args(*argv, "--epochs", "1")), show_progress=False)
    assert [p.name for p in checkpoints(first.run_dir)] == ["checkpoint-2"]
    resumed = run_training(
        build_plan(tiny_installed, cli_args(*argv, "--epochs", "2", "--resume")), show_progress=False
    )
    assert resumed.resumed_from == (first.run_dir / "checkpoint-2").resolve()
    assert resumed.metrics["global_step"] == 4 and resumed.run_dir == first.run_dir


def test_sft_then_dpo_starts_from_the_sft_adapter_and_keeps_it_as_reference(tiny_installed, tmp_path):
    """--init-adapter: the policy starts as the SFT adapter, TRL's "ref" copy of it is the reference."""
    import torch
    from transformers import TrainerCallback

    from llm_installer.train.trainer import run_training

    sft = run_training(
        build_plan(
            tiny_installed,
            cli_args(
                "--data",
                "test_data.json",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--validation-split",
                "0",
                "--no-tensorboard",
                "--precision",
                "fp32",
                "--output",
                str(tmp_path / "sft"),
            ),
        ),
        show_progress=False,
    )
    seen = {}

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["adapters"] = sorted(model.peft_config)
            seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}

    argv = _tiny_argv(tmp_path, "--method", "dpo", "--max-steps", "1", "--init-adapter", str(sft.adapter_dir))
    run_training(
        build_plan(tiny_installed, cli_args(*argv, "--output", str(tmp_path / "dpo"))),
        show_progress=False,
        extra_callbacks=[Peek()],
    )
    from safetensors.torch import load_file

    saved = load_file(sft.adapter_dir / "adapter_model.safetensors")
    assert seen["adapters"] == ["default", "ref"]
    b = next(k for k in saved if k.endswith("lora_B.weight"))
    start = next(
        v
        for n, v in seen["start"].items()
        if n.endswith(b.removesuffix("lora_B.weight") + "lora_B.default.weight")
    )
    torch.testing.assert_close(start, saved[b])
    assert saved[b].abs().sum() > 0
