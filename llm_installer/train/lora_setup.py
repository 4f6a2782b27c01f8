"""Building and reloading LoRA/DoRA adapters, including MoE models whose experts are fused parameters.

Why this module exists: in transformers 5 a MoE layer's experts are fused 3-D parameters
(`experts.gate_up_proj`, `experts.down_proj`), which PEFT adapts through `target_parameters` with
`lora.ParamWrapper`. That wrapper adds its LoRA delta to the weight before the experts' own matmul, so
it cannot drop out the LoRA path's input or renormalise the weight per layer: it refuses
`lora_dropout != 0` and DoRA. A `LoraConfig` applies to every layer of its adapter and PEFT has no
per-module switch for either (`rank_pattern`/`alpha_pattern` cover r and alpha only;
`resolve_lora_variant` reads the one config), so every mode with dropout, and `--method dora`, failed on
mixtral, qwen2_moe, qwen3_moe and deepseek.

How: PEFT builds the adapter with what its expert wrapper allows (dropout 0, plain LoRA), then every
other LoRA layer (attention, dense and shared-expert MLPs: PEFT's `lora.Linear`) is rebuilt by PEFT's
own `update_layer` with the run's config, the same call PEFT makes when a config targets a layer that
already has LoRA. Those layers thus get the real `nn.Dropout(p)` and DoRA's magnitude vector exactly as
PEFT builds them; the expert parameters keep dropout 0 and plain LoRA.

What `adapter_config.json` says: `lora_dropout` 0 (dropout only exists in training, and reloading must
rebuild the expert wrappers, which refuse any other value; the run's value is in `adapter_info.json`'s
plan), `use_dora` as trained. Saying `use_dora: false` for a DoRA adapter would let a stock
`PeftModel.from_pretrained` load it while dropping the magnitude vectors without a word (PEFT even names
their keys by that flag); with `true` the stock loader refuses loudly, and `load_adapter` here rebuilds it
the way training did. LoRA adapters on MoE (any dropout) load with the stock loader unchanged.

Rejected: a second adapter for the experts, active together with the first (`set_adapter([...])`).
PEFT saves it to a subfolder that a stock loader and vLLM ignore (half an adapter, silently), the
engine's mixed base/adapter batches name one adapter per row, and transformers' Trainer re-activates only
the first adapter when it resumes a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Why the experts train differently, in the words the plan shows.
EXPERT_LIMITS = "PEFT's expert wrapper allows no dropout or DoRA"


def _method_name(use_dora: bool) -> str:
    return "DoRA" if use_dora else "plain LoRA"


def _needs_split(config: Any) -> bool:
    """Whether the experts (target_parameters) cannot take the config the other layers get."""
    return bool(getattr(config, "target_parameters", None)) and bool(config.lora_dropout or config.use_dora)


def _with(config: Any, **changes: Any) -> Any:
    """A copy of a LoraConfig with some fields changed (no re-validation: the fields stay consistent)."""
    out = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


@contextlib.contextmanager
def _v5_native_targets() -> Iterator[None]:
    """Keep PEFT from rewriting our targets as if they were transformers-4 names.

    For MoE architectures whose layout changed in transformers 5 (mixtral, qwen2_moe and the families
    transformers maps onto them, such as deepseek), PEFT rewrites a LoRA config before injecting it so that
    adapters trained under v4 still load: any target named `gate_proj`/`up_proj`/`down_proj` (or ending in
    one) becomes the fused expert parameter. Our adapters are made under v5 with v5 names, so that rewrite
    silently moved the dense MLP and shared-expert targets onto the experts: those layers got no LoRA.
    The same rewrite makes PEFT's own `PeftModel.from_pretrained` refuse such an adapter (a size mismatch:
    loudly, not wrongly); `load_adapter` here loads it as trained."""
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def _get_peft_model(model: Any, config: Any, adapter_name: str, *, loading: bool = False) -> Any:
    """get_peft_model for training; for loading, the PeftModel class built as `PeftModel.from_pretrained`
    builds it (get_peft_model warns about adapter names such as the engine's "lora", which that does not)."""
    from peft import get_peft_model

    with warnings.catch_warnings(), _v5_native_targets():
        # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if not loading:
            return get_peft_model(model, config, adapter_name=adapter_name)
        from peft import PeftModel
        from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        return cls(model, config, adapter_name)


def _rebuild_module_layers(peft_model: Any, adapter_name: str, config: Any) -> int:
    """Give every LoRA layer except the expert wrappers `config`'s dropout and variant; returns how many.

    `update_layer` re-creates the layer's LoRA weights, dropout and variant (DoRA's magnitude vector is
    computed from the base weight, as at creation) and leaves them trainable unless the config is in
    inference mode; PEFT's usual upcast of low-precision adapter weights to float32 is repeated after it.
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.tuners.tuners_utils import cast_adapter_dtype

    count = 0
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or isinstance(module, ParamWrapper):
            continue
        if adapter_name not in module.lora_A and adapter_name not in module.lora_embedding_A:
            continue
        module.update_layer(
            adapter_name,
            module.r[adapter_name],
            lora_alpha=module.lora_alpha[adapter_name],
            config=config,
            target_name=name,
        )
        count += 1
    cast_adapter_dtype(peft_model, adapter_name=adapter_name)
    return count


def _wrap(model: Any, config: Any, adapter_name: str, *, loading: bool = False) -> Any:
    """get_peft_model, with the experts built as PEFT allows and the other layers as `config` says."""
    if not _needs_split(config):
        return _get_peft_model(model, config, adapter_name, loading=loading)
    expert_config = _with(config, lora_dropout=0.0, use_dora=False)
    peft_model = _get_peft_model(model, expert_config, adapter_name, loading=loading)
    _rebuild_module_layers(peft_model, adapter_name, config)
    # what saving (PEFT names DoRA's keys by use_dora) and reloading need; dropout has no part there
    peft_model.peft_config[adapter_name] = _with(config, lora_dropout=0.0)
    return peft_model


def build_peft_model(
    model: Any,
    *,
    r: int,
    alpha: float,
    dropout: float,
    method: str,
    target_kwargs: dict[str, Any],
    adapter_name: str = "default",
) -> Any:
    """Wrap `model` with a trainable LoRA adapter (DoRA for method "dora") on `target_kwargs`' targets.

    `target_kwargs` is what `handlers.targets.resolve_lora_targets` returns (target_modules,
    target_parameters, modules_to_save, fan_in_fan_out). Fused MoE experts get dropout 0 and plain LoRA,
    every other layer `dropout` and the method; `describe_expert_settings` says so for the plan.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_dora=method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
        **target_kwargs,
    )
    return _wrap(model, config, adapter_name)


def load_adapter(
    model: Any,
    adapter_dir: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> Any:
    """`PeftModel.from_pretrained` for every adapter we save, DoRA on MoE included.

    A config PEFT can rebuild as saved goes to `PeftModel.from_pretrained` unchanged. DoRA with fused
    experts is rebuilt as `build_peft_model` built it, then its weights are loaded through PEFT's
    `load_adapter`; a missing or unexpected adapter weight raises ValueError (the adapter does not fit).
    With `is_trainable` an MoE adapter trains on without dropout: its saved config says 0 (the run's
    value is in adapter_info.json's plan).
    """
    from peft import LoraConfig, PeftConfig, PeftModel

    path = str(adapter_dir)
    config = PeftConfig.from_pretrained(path)
    if not isinstance(config, LoraConfig) or not _needs_split(config):
        with _v5_native_targets():
            return PeftModel.from_pretrained(
                model, path, adapter_name=adapter_name, is_trainable=is_trainable
            )
    config.inference_mode = not is_trainable
    peft_model = _wrap(model, config, adapter_name, loading=True)
    result = peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"adapter weights in {path} do not match the layers its config describes: "
            f"missing {result.missing_keys[:3]}, unexpected {unexpected[:3]}"
        )
    if not is_trainable:
        peft_model.eval()
    return peft_model


def describe_expert_settings(target_kwargs: dict[str, Any], *, dropout: float, method: str) -> str | None:
    """One line for the plan on what fused MoE experts get next to the other LoRA layers; None without experts.

    e.g. "experts: dropout 0, plain LoRA (PEFT's expert wrapper allows no dropout or DoRA); other layers:
    dropout 0.05, DoRA".
    """
    if not target_kwargs.get("target_parameters"):
        return None
    use_dora = method == "dora"
    other = f"dropout {float(dropout):g}, {_method_name(use_dora)}"
    if not target_kwargs.get("target_modules"):
        if dropout or use_dora:
            return f"experts only: dropout 0, plain LoRA ({EXPERT_LIMITS}); no other LoRA layer takes {other}"
        return "experts only: dropout 0, plain LoRA"
    if not dropout and not use_dora:
        return "experts and other layers: dropout 0, plain LoRA"
    return f"experts: dropout 0, plain LoRA ({EXPERT_LIMITS}); other layers: {other}"


__all__ = [
    "EXPERT_LIMITS",
    "build_peft_model",
    "describe_expert_settings",
    "load_adapter",
]
