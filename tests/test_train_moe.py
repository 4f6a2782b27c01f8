"""MoE models train with the mode's LoRA dropout and with DoRA: real `run_training` runs, no mocks.

PEFT's wrapper for fused expert parameters refuses dropout and DoRA, so `train/lora_setup.py` gives the
experts dropout 0 and plain LoRA and every other LoRA layer the plan's settings. For each MoE family
(mixtral, qwen2_moe and qwen3_moe train with the router's balancing loss through the model's own forward;
the tiny deepseek_v2/v3 configs have none and take the head-on-labels path), in `--mode medium` (dropout
0.05) with `--method lora` and `--method dora`, on the very model the Trainer trained:

- the layers are what the plan says: `nn.Dropout(0.05)` (and DoRA's magnitude for dora) on the Linear LoRA
  layers, `Identity` and no magnitude on the expert wrappers;
- exactly the intended parameters change: LoRA on attention (and dense / shared-expert MLPs), LoRA on the
  fused experts, the router in full, DoRA's magnitudes where DoRA applies; every frozen one is bit-identical;
- dropout really acts in training: two train-mode forwards differ, and agree once only the LoRA dropout
  modules are switched off;
- the saved adapter reloads to the trained model's eval logits through `lora_setup.load_adapter`, the
  serving engine and the export merge; PEFT's own loader takes the LoRA one as saved and refuses the DoRA
  one loudly (its expert wrapper refuses use_dora) instead of silently dropping the magnitudes;
- `--dry-run` shows the same trainable layout.

Runs in full precision (`--precision fp32`): the subject is the layer setup, the same in every precision.
One install of each family serves both of its runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from llm_installer.train.plan import build_plan
from llm_installer.train.trainer import run_training
from tests.test_train_fixtures import cli_args
from tests.tiny import MOE_FAMILIES

IDS = [[1, 504, 3458, 314, 260, 3575, 282, 4649, 47, 2, 1, 9519, 28, 3226]]


class Probe(TrainerCallback):
    """The model the Trainer trains: its parameters and LoRA layers at the start, the model at the end."""

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}
        self.trainable: set[str] = set()
        self.layers: dict[str, tuple[str, str, float | None, bool]] = {}
        self.model: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.layers = lora_layers(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def lora_layers(model: Any) -> dict[str, tuple[str, str, float | None, bool]]:
    """name -> (layer kind, dropout module type, its p, has a DoRA magnitude) for each LoRA layer."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            drop = module.lora_dropout["default"]
            kind = "experts" if isinstance(module, ParamWrapper) else "linear"
            out[name] = (
                kind,
                type(drop).__name__,
                getattr(drop, "p", None),
                "default" in module.lora_magnitude_vector,
            )
    return out


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float()


@pytest.fixture(scope="module")
def installed(tmp_path_factory, tiny_model_factory):
    """family -> installed ModelFolder (built and installed once for both runs)."""
    from llm_installer import store
    from llm_installer.install import install_model

    models = tmp_path_factory.mktemp("moe-models")
    cache: dict[str, Any] = {}

    def get(family: str):
        store.set_models_dir(models)
        if family not in cache:
            cache[family] = install_model(str(tiny_model_factory(family)), name=f"test/{family}")
        return cache[family]

    return get


def _check_layers(cell: str, layers: dict, method: str, failures: list[str]) -> None:
    experts = {n: v for n, v in layers.items() if v[0] == "experts"}
    linear = {n: v for n, v in layers.items() if v[0] == "linear"}
    if not experts or not linear:
        failures.append(f"{cell}: expected LoRA on experts and Linear layers, got {sorted(layers)[:6]}")
    for name, (_, drop, p, dora) in experts.items():
        if drop != "Identity" or dora:
            failures.append(f"{cell}: expert wrapper {name} has {drop} (p={p}), DoRA {dora}")
    for name, (_, drop, p, dora) in linear.items():
        if drop != "Dropout" or p != 0.05 or dora != (method == "dora"):
            failures.append(f"{cell}: Linear LoRA layer {name} has {drop} (p={p}), DoRA {dora}")


def _check_changes(cell: str, probe: Probe, method: str, failures: list[str]) -> None:
    import torch

    from llm_installer.handlers.targets import parameter_group

    after = dict(probe.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), probe.before[n])}
    if changed - probe.trainable:
        failures.append(f"{cell}: frozen parameters changed: {sorted(changed - probe.trainable)[:4]}")
    if probe.trainable - changed:
        failures.append(
            f"{cell}: trainable parameters did not change: {sorted(probe.trainable - changed)[:4]}"
        )
    odd = [n for n in probe.trainable if "lora_" not in n and ".modules_to_save." not in n]
    if odd:
        failures.append(f"{cell}: trainable beyond LoRA and the router: {odd[:4]}")
    groups = {parameter_group(n) for n in probe.trainable}
    if not {"attention", "experts", "router"} <= groups <= {"attention", "experts", "router", "mlp"}:
        failures.append(f"{cell}: trained groups {sorted(groups)}")
    magnitudes = {n for n in probe.trainable if "lora_magnitude_vector" in n}
    if method == "dora":
        dora_layers = {n for n, v in probe.layers.items() if v[0] == "linear"}
        owners = {n.split(".lora_magnitude_vector")[0] for n in magnitudes}
        if owners != dora_layers:
            failures.append(
                f"{cell}: DoRA magnitudes train on {sorted(owners)[:3]}, not on {sorted(dora_layers)[:3]}"
            )
    elif magnitudes:
        failures.append(f"{cell}: --method lora trains DoRA magnitudes {sorted(magnitudes)[:3]}")


def _check_dropout_acts(cell: str, model: Any, failures: list[str]) -> None:
    """Train mode: LoRA dropout makes two forwards differ; with only it switched off they agree."""
    import torch
    from peft.tuners.lora.layer import LoraLayer

    model.train()
    a, b = _logits(model), _logits(model)
    if torch.equal(a, b):
        failures.append(f"{cell}: two train-mode forwards agree: no dropout acts")
    drops = [
        m.lora_dropout["default"]
        for m in model.modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    ]
    for d in drops:
        d.eval()
    a, b = _logits(model), _logits(model)
    for d in drops:
        d.train()
    if not torch.equal(a, b):
        failures.append(f"{cell}: train-mode forwards differ with LoRA dropout off: something else is random")
    model.eval()


# families PEFT maps onto a transformers-4 MoE layout, rewriting gate/up/down_proj targets on load
PEFT_REWRITES_TARGETS = ("deepseek_v2", "deepseek_v3")


def _check_reloads(
    cell: str,
    folder: Any,
    out: Path,
    trained: Any,
    trainable: set[str],
    method: str,
    tmp: Path,
    failures: list[str],
):
    from peft import PeftModel

    from llm_installer.export import export_merged
    from llm_installer.loading import load_model
    from llm_installer.serve.engine import ADAPTER_NAME, Engine, SamplingParams
    from llm_installer.train.lora_setup import load_adapter

    def base():
        return load_model(folder.model_dir, task=folder.load_info().task, dtype="fp32")

    def compare(what: str, logits: Any) -> None:
        diff = float((logits - trained).abs().max())
        if diff > 1e-4:
            failures.append(f"{cell}: {what} logits differ from the trained model's by {diff:.2e}")

    compare("load_adapter", _logits(load_adapter(base(), out)))

    engine = Engine.load(str(folder.root), lora=out, dtype="fp32").start()
    try:
        compare("engine", _logits(engine.model))
        done = engine.generate(IDS[0][:3], ADAPTER_NAME, SamplingParams(max_tokens=3, temperature=0))
        if done.finish_reason not in ("stop", "length"):
            failures.append(f"{cell}: the engine answered {done!r}")
    finally:
        engine.stop()

    if method == "lora" and cell.split()[0] in PEFT_REWRITES_TARGETS:
        # PEFT's own loader rewrites the dense MLP targets of these families as transformers-4 expert names
        # (lora_setup._v5_native_targets): it refuses the adapter loudly instead of loading it wrongly
        with pytest.raises(RuntimeError, match="size mismatch"):
            PeftModel.from_pretrained(base(), str(out))
    elif method == "lora":  # dropout 0 in the saved config: PEFT's own loader rebuilds the expert wrappers
        compare("PeftModel.from_pretrained", _logits(PeftModel.from_pretrained(base(), str(out)).eval()))
    else:  # refused loudly rather than loaded without the magnitudes; the merge folds DoRA and experts in
        with pytest.raises(ValueError, match="use_dora"):
            PeftModel.from_pretrained(base(), str(out))
        again = load_adapter(base(), out, is_trainable=True)  # to train on: the same layers, trainable
        names = {n for n, p in again.named_parameters() if p.requires_grad}
        if {n for n in names if "magnitude" in n or "experts" in n} != {
            n for n in trainable if "magnitude" in n or "experts" in n
        }:
            failures.append(f"{cell}: load_adapter(is_trainable=True) trains other DoRA/expert weights")
        merged = export_merged(folder, tmp / f"merged-{method}", lora=out)
        compare("export --merge", _logits(load_model(merged, dtype="fp32").eval()))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_trains_with_dropout_and_dora(family, installed, tmp_path, monkeypatch):
    from rich.console import Console

    from llm_installer import store
    from llm_installer.train.dry_run import print_dry_run

    folder = installed(family)
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(folder.root.parent))
    store.set_models_dir(folder.root.parent)
    failures: list[str] = []
    for method in ("lora", "dora"):
        cell = f"{family} medium/{method}"
        out = tmp_path / f"adapter-{method}"
        argv = ["--data", "fictional_facts.jsonl", "--mode", "medium", "--method", method, "--precision", "fp32",
                "--max-steps", "2", "--batch-size", "2", "--validation-split", "0", "--no-tensorboard",
                "--output", str(out), "--seed", "0"]  # fmt: skip
        plan = build_plan(folder, cli_args(*argv))
        assert plan.value("lora_dropout") == 0.05 and plan.value("method") == method, cell
        # every step moves every trainable weight (warmup's first step has learning rate 0); a short report
        plan["settings"]["warmup_ratio"] = {"value": 0.0, "source": "test", "why": "two steps"}
        plan["settings"]["report_prompts"] = {"value": 1, "source": "test", "why": "short report"}
        plan["settings"]["report_max_new_tokens"] = {"value": 1, "source": "test", "why": "short report"}

        dry = print_dry_run(plan, console=Console(quiet=True))
        probe = Probe()
        result = run_training(plan, show_progress=False, extra_callbacks=[probe])
        assert result.metrics["global_step"] == 2, cell
        model = probe.model
        if dry["trainable"] != sum(model.get_parameter(n).numel() for n in probe.trainable):
            failures.append(
                f"{cell}: --dry-run counts {dry['trainable']} trainable parameters, training other"
            )

        _check_layers(cell, probe.layers, method, failures)
        _check_changes(cell, probe, method, failures)
        _check_dropout_acts(cell, model, failures)
        _check_reloads(cell, folder, out, _logits(model.eval()), probe.trainable, method, tmp_path, failures)
    assert not failures, "\n".join(failures)


def test_plan_line_says_what_the_experts_get():
    from llm_installer.train.lora_setup import describe_expert_settings

    moe = {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["experts.down_proj"]}
    assert describe_expert_settings(moe, dropout=0.05, method="dora") == (
        "experts: dropout 0, plain LoRA (PEFT's expert wrapper allows no dropout or DoRA); "
        "other layers: dropout 0.05, DoRA"
    )
    assert describe_expert_settings(moe, dropout=0.1, method="lora").endswith(
        "other layers: dropout 0.1, plain LoRA"
    )
    assert (
        describe_expert_settings(moe, dropout=0.0, method="lora")
        == "experts and other layers: dropout 0, plain LoRA"
    )
    assert describe_expert_settings({"target_modules": ["q_proj"]}, dropout=0.05, method="dora") is None
    experts_only = {"target_modules": [], "target_parameters": ["experts.down_proj"]}
    assert describe_expert_settings(experts_only, dropout=0.05, method="dora").startswith("experts only")
