"""`train --dry-run`: the plan (value and why), trainable parameters by group, data summary, memory fit.

Nothing is trained and no weights are read: the model is built on PyTorch's meta device from its config,
so even a 70B model's LoRA layout is shown in a second.
"""

from __future__ import annotations

from typing import Any

from llm_installer.consent import allow_remote_code
from llm_installer.train.plan import TrainingPlan, estimate_memory


def meta_peft_model(plan: TrainingPlan, folder: Any, info: Any, handler: Any) -> Any:
    """The LoRA-wrapped model built on the meta device (shapes only, no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_installer.train.components import lora_target_kwargs
    from llm_installer.train.lora_setup import build_peft_model

    trust = allow_remote_code(info)
    config = AutoConfig.from_pretrained(str(folder.model_dir), trust_remote_code=trust)
    with torch.device("meta"):
        if getattr(info, "task", None) == "vision_language":
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        return build_peft_model(
            model,
            r=plan.value("lora_r"),
            alpha=plan.value("lora_alpha"),
            dropout=plan.value("lora_dropout"),
            method=plan.value("method"),
            target_kwargs=lora_target_kwargs(model, plan, handler),
        )


def print_dry_run(plan: TrainingPlan, console: Any = None) -> dict[str, Any]:
    """Print the four dry-run sections; return them as data (tests read it)."""
    from llm_installer.console import console as default_console
    from llm_installer.train.components import (
        apply_media_settings,
        load_components,
        load_tokenizer_for,
        prepare_run_data,
    )

    console = console or default_console
    plan = TrainingPlan.from_dict(plan)  # image data changes packing below: not the caller's plan
    folder, info, handler = load_components(plan)

    # the data first: image data turns packing off, and the plan table must show what the run will do
    data = tokenizer = None
    media: list[str] = []
    if plan.value("data"):
        tokenizer = load_tokenizer_for(folder, handler, info)
        from llm_installer.train import preference as pref

        if pref.is_preference(plan):  # issue 15 hook: DPO/ORPO pairs, shown as pair examples
            data = pref.prepare_preference_data(plan, tokenizer, handler)
        else:
            data = prepare_run_data(plan, folder, info, tokenizer, handler)
            media = apply_media_settings(plan, data, console, info)

    print_plan_table(plan, console)
    model = meta_peft_model(plan, folder, info, handler)
    rows, trainable_total = print_parameter_table(model, console)
    data_summary = print_data_summary(plan, data, media, console)
    if data is not None:
        from llm_installer.chat_format import handler_chat_format

        # what the answers are trained to end with, and what chat/start/export will stop at
        console.print(f"chat format: {handler_chat_format(handler, tokenizer).describe()}", soft_wrap=True)
    mem, verdict = print_memory_fit(plan, model, trainable_total, console)
    console.print("dry run: nothing was trained")
    return {
        "plan": plan,
        "parameters": rows,
        "trainable": trainable_total,
        "data": data_summary,
        "memory": mem,
        "verdict": verdict,
    }


def print_plan_table(plan: TrainingPlan, console: Any) -> None:
    """Every setting with its value, source and why."""
    from rich.table import Table

    t = Table(title=f"Training plan for {plan.model['model_id']} (handler {plan.model['handler']})")
    for column in ("setting", "value", "source", "why"):
        t.add_column(column)
    for key, entry in plan.settings.items():
        t.add_row(key, str(entry["value"]), entry["source"], entry["why"])
    console.print(t)


def print_parameter_table(model: Any, console: Any) -> tuple[list[Any], int]:
    """Trainable and total parameters per group; (the rows, the trainable total)."""
    from rich.table import Table

    from llm_installer.handlers.targets import parameter_group_table

    rows = list(parameter_group_table(model))
    pt = Table(title="Parameters by group")
    pt.add_column("group")
    pt.add_column("trainable", justify="right")
    pt.add_column("total", justify="right")
    trainable_total = 0
    for row in rows:
        group, trainable, total = (
            (row["group"], row["trainable"], row["total"]) if isinstance(row, dict) else row
        )
        trainable_total += int(trainable)
        pt.add_row(str(group), f"{int(trainable):,}", f"{int(total):,}")
    console.print(pt)
    return rows, trainable_total


def print_data_summary(plan: TrainingPlan, data: Any, media: list[str], console: Any) -> dict[str, Any]:
    """Examples, tokens, label tokens, longest example (and the media keys of image data)."""
    from rich.table import Table

    if data is None:
        console.print("data: not given (pass --data to see the dataset summary)")
        return {}
    from llm_installer.train.preference import example_lengths

    lengths, labelled = example_lengths(data.train)  # a preference pair counts both sides
    summary: dict[str, Any] = {
        "train_examples": len(data.train),
        "validation_examples": len(data.validation),
        "train_tokens": sum(lengths),
        "label_tokens": labelled,
        "max_length": max(lengths) if lengths else 0,
        "fingerprint": getattr(data, "fingerprint", None),
    }
    if media:
        summary["media"] = ", ".join(media)
        summary["packing"] = plan.value("packing")
    dt = Table(title=f"Data: {plan.value('data')}")
    dt.add_column("item")
    dt.add_column("value", justify="right")
    for k, v in summary.items():
        dt.add_row(k, str(v))
    stats = getattr(data, "stats", None)
    if isinstance(stats, dict):
        for k in ("rejected", "duplicates", "truncated"):
            if k in stats:
                dt.add_row(k, str(stats[k]))
    console.print(dt)
    return summary


def print_memory_fit(plan: TrainingPlan, model: Any, trainable_total: int, console: Any) -> tuple[dict, str]:
    """The memory estimate against this machine's GPU or available RAM; (estimate, verdict)."""
    from rich.table import Table

    from llm_installer import hardware

    cfg = model.get_base_model().config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    mem = estimate_memory(
        plan,
        lora_params=trainable_total,
        hidden_size=getattr(text_cfg, "hidden_size", None),
        num_layers=getattr(text_cfg, "num_hidden_layers", None),
        vocab_size=getattr(text_cfg, "vocab_size", None),
    )
    hw = hardware.detect()
    if hw.cuda and hw.gpu:
        available, where = hw.gpu.memory_gb, f"GPU {hw.gpu.name} ({hw.gpu.memory_gb:.1f} GiB)"
    else:
        available = hw.ram_available_gb
        where = f"available RAM ({hw.ram_available_gb:.1f} of {hw.ram_gb:.1f} GiB)"
    verdict = (
        "fits"
        if mem["total_gb"] <= 0.8 * available
        else "tight"
        if mem["total_gb"] <= available
        else "does NOT fit: lower --batch-size/--max-seq-length or use --method qlora on a GPU"
    )
    mt = Table(title="Memory estimate")
    mt.add_column("part")
    mt.add_column("GiB", justify="right")
    for k, v in mem.items():
        mt.add_row(k.removesuffix("_gb"), f"{v:.2f}")
    console.print(mt)
    console.print(f"estimated peak {mem['total_gb']:.2f} GiB vs {where}: {verdict}", soft_wrap=True)
    return mem, verdict
