"""Typed values between the stages: HandlerParams (the seed's dict, validated) and the TrainingPlan's
settings (typed, each with its source and why; a key that is no setting raises)."""

from __future__ import annotations

import json

import pytest

from llm_installer.errors import UserError
from llm_installer.handlers.base import BaseHandler
from llm_installer.handlers.llama import LlamaHandler
from llm_installer.handlers.params import HandlerParams, handler_params
from llm_installer.hardware import Hardware
from llm_installer.train.plan import TrainingPlan, build_plan
from tests import test_train_fixtures as fx
from tests.test_train_fixtures import cli_args

tiny_installed = fx.tiny_installed

CPU = Hardware(cpu_count=2, ram_gb=24.0, ram_available_gb=20.0)
LLAMA = {"model_id": "org/some-llama-instruct", "model_type": "llama", "num_parameters": 100_000_000}


def _handler_setting(key, value):
    class Custom(LlamaHandler):
        def get_training_parameters(self):
            params = super().get_training_parameters()
            params[key] = value
            return params

    return Custom(LLAMA)


def test_the_seed_dict_validates_into_handler_params_with_every_key():
    params = handler_params(LlamaHandler(LLAMA))
    assert isinstance(params, HandlerParams)
    raw = LlamaHandler(LLAMA).get_training_parameters()
    assert params.to_dict() == raw  # the dict a user handler builds on is unchanged
    assert params.recommended_learning_rate == 5e-4 and "q_proj" in params.lora_target_modules
    assert params.get("max_seq_length") == params.max_seq_length
    with pytest.raises(KeyError, match="not a handler parameter"):
        params.get("max_seq_lenght")


def test_a_wrong_key_or_type_in_a_user_handler_is_one_line_naming_it():
    with pytest.raises(UserError) as err:
        handler_params(_handler_setting("max_seq_lenght", 4096))
    assert str(err.value).startswith("handler custom: unknown training parameter 'max_seq_lenght' (known: ")
    with pytest.raises(UserError) as err:
        handler_params(_handler_setting("recommended_batch_size", "eight"))
    assert str(err.value).startswith("handler custom: training parameter 'recommended_batch_size'='eight':")
    with pytest.raises(UserError, match="'training_precision'='bf17'"):
        handler_params(_handler_setting("training_precision", "bf17"))


def test_the_plan_refuses_a_broken_handler_before_anything_loads(tiny_installed):
    info = tiny_installed.load_info()
    with pytest.raises(UserError, match="unknown training parameter 'lora_tragets'"):
        build_plan(tiny_installed, cli_args("--data", "d"), handler=_handler_setting("lora_tragets", ["x"]),
                   hardware=CPU)  # fmt: skip
    assert info.model_id  # the folder is untouched


def test_the_handler_is_asked_once_and_later_stages_read_the_plan(tiny_installed):
    handler = LlamaHandler(tiny_installed.load_info())
    calls = []
    original = handler.get_training_parameters

    def counting():
        calls.append(1)
        return original()

    handler.get_training_parameters = counting
    plan = build_plan(tiny_installed, cli_args("--data", "d"), handler=handler, hardware=CPU)
    handler.get_tokenizer_config()
    handler.training_params()
    assert len(calls) == 1
    assert plan.handler_params == handler.training_params().to_dict()
    assert plan.model["handler_class"] == "llm_installer.handlers.llama.LlamaHandler"
    # a fresh handler answers from the plan's record without asking its own get_training_parameters
    fresh = LlamaHandler(tiny_installed.load_info())
    fresh.get_training_parameters = None  # would raise if called
    fresh.use_training_params(plan.handler_params)
    assert fresh.training_params().to_dict() == plan.handler_params


def test_plan_settings_are_typed_and_a_typo_raises(tiny_installed):
    plan = build_plan(tiny_installed, cli_args("--data", "d", "--epochs", "2"), hardware=CPU)
    assert plan.value("epochs") == 2 and plan.source("epochs") == "user" and plan.why("epochs") == "--epochs"
    with pytest.raises(KeyError, match="'epoch' is not a plan setting"):
        plan.value("epoch")
    with pytest.raises(KeyError, match="'epoch' is not a plan setting"):
        plan.set("epoch", 2, "test")
    with pytest.raises(TypeError, match="plan setting batch_size='four'"):
        plan.set("batch_size", "four", "test")
    with pytest.raises(TypeError, match="plan setting packing="):
        plan["settings"]["packing"] = {"value": "maybe", "source": "test", "why": ""}
    plan["settings"]["report_prompts"] = {"value": 1, "source": "test", "why": "tests may still set entries"}
    assert plan.value("report_prompts") == 1


def test_an_older_adapter_info_plan_still_loads(tiny_installed):
    plan = build_plan(tiny_installed, cli_args("--data", "d"), hardware=CPU)
    old = json.loads(plan.to_json())
    del old["handler_params"]  # written before the plan recorded them
    old["settings"]["a_removed_setting"] = {"value": 1, "source": "default", "why": "gone"}
    del old["settings"]["fused_lora"]  # written before this setting existed
    again = TrainingPlan.from_dict(old)
    assert again.handler_params is None and again.value("fused_lora") is True  # the default
    assert again.fingerprint("x") != ""  # still fingerprintable for resume checks
    assert again.value("lora_r") == plan.value("lora_r")


def test_base_defaults_live_in_handler_params():
    params = BaseHandler({"model_id": "a/b"}).get_training_parameters()
    defaults = HandlerParams()
    assert params["recommended_lora_r"] == defaults.recommended_lora_r == 16
    assert params["gradient_checkpointing"] is defaults.gradient_checkpointing is True


def test_the_trainer_refuses_a_plan_made_with_another_handler_class(tiny_installed):
    from llm_installer.train.components import load_components

    plan = build_plan(tiny_installed, cli_args("--data", "d"), hardware=CPU)
    folder, info, handler = load_components(plan)  # the class the plan recorded: accepted
    assert type(handler) is LlamaHandler and handler.training_params().to_dict() == plan.handler_params
    plan.model["handler_class"] = "acme_handlers.AcmeHandler"
    with pytest.raises(UserError) as err:
        load_components(plan)
    assert str(err.value) == (
        f"the plan for {info.model_id} was made with handler acme_handlers.AcmeHandler, but the registry "
        "now picks llm_installer.handlers.llama.LlamaHandler (a user handler added or removed?): plan the "
        "run again"
    )
