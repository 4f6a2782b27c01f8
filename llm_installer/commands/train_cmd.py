"""`llm-installer train NAME --data ...` (and the model folder's `./train.sh`, which calls it).

Only typer/rich/stdlib at import time: torch and transformers load inside the command so `--help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

EXAMPLE = (
    "Example: llm-installer train smollm2-135m-instruct --data fictional_facts.jsonl --mode fast\n\n"
    "Or, inside the model folder: ./train.sh --data my_data.jsonl --mode medium --dry-run"
)


def _opt(help_text: str, *names: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help_text, **kw) if names else typer.Option(help=help_text, **kw)


# `train` is long only in its signature: typer reads one annotated parameter per flag (about 140 lines of
# declarations); its body is a few lines that hand over to `run_train_command` and `print_result`.
def train(
    name: Annotated[
        str, typer.Argument(help="Installed model name (org/name or folder name) or its folder path.")
    ],
    data: Annotated[
        str | None,
        _opt(
            "Dataset: file, folder, glob, comma-separated mix, name:split, or a bundled "
            "example name (fictional_facts.jsonl, test_data.json).",
            "--data",
        ),
    ] = None,
    format: Annotated[
        str | None,
        _opt(
            "Dataset format (alpaca, sharegpt, openai, chat, qa, completion, text, ...); default: detected.",
            "--format",
        ),
    ] = None,
    mode: Annotated[
        str | None,
        _opt("fast | medium (default) | slow | circle | non-stop (see docs/training.md).", "--mode"),
    ] = None,
    method: Annotated[
        str | None,
        _opt(
            "lora (default) | qlora (4-bit, NVIDIA GPU) | dora | dpo, orpo (preference pairs on LoRA).",
            "--method",
        ),
    ] = None,
    # preference training (issue 15, train/preference.py)
    objective: Annotated[
        str | None,
        _opt("sft (default) | dpo | orpo; with --method dora/qlora for another adapter.", "--objective"),
    ] = None,
    beta: Annotated[float | None, _opt("DPO beta / ORPO lambda (default 0.1).", "--beta")] = None,
    loss_type: Annotated[
        str | None,
        _opt("DPO loss variant: sigmoid (default), ipo, hinge, robust, ... (TRL's).", "--loss-type"),
    ] = None,
    init_adapter: Annotated[
        Path | None, _opt("Start from this adapter's weights (e.g. SFT then DPO).", "--init-adapter")
    ] = None,
    epochs: Annotated[int | None, _opt("Number of epochs (cycles in circle mode).", "--epochs")] = None,
    max_steps: Annotated[
        int | None, _opt("Stop after this many optimizer steps (0 = no limit).", "--max-steps")
    ] = None,
    batch_size: Annotated[int | None, _opt("Examples per micro-batch.", "--batch-size")] = None,
    gradient_accumulation: Annotated[
        int | None, _opt("Micro-batches per optimizer step.", "--gradient-accumulation")
    ] = None,
    learning_rate: Annotated[float | None, _opt("Peak learning rate.", "--learning-rate", "--lr")] = None,
    lora_r: Annotated[int | None, _opt("LoRA rank (default: by model size).", "--lora-r")] = None,
    lora_alpha: Annotated[int | None, _opt("LoRA alpha (default: 2 x rank).", "--lora-alpha")] = None,
    lora_dropout: Annotated[float | None, _opt("LoRA dropout.", "--lora-dropout")] = None,
    target_modules: Annotated[
        str | None,
        _opt(
            "Comma-separated module names or patterns, or all-linear (default: the handler's).",
            "--target-modules",
        ),
    ] = None,
    max_seq_length: Annotated[
        int | None, _opt("Longest example in tokens (longer ones are truncated).", "--max-seq-length")
    ] = None,
    max_examples: Annotated[int | None, _opt("Use at most this many examples.", "--max-examples")] = None,
    validation_split: Annotated[
        float | None, _opt("Fraction held out for validation (0 = none).", "--validation-split")
    ] = None,
    patience: Annotated[
        int | None,
        _opt("Evaluations without validation improvement before early stop (0 = off).", "--patience"),
    ] = None,
    overfitting_threshold: Annotated[
        float | None,
        _opt(
            "Stop when validation loss exceeds training loss by this "
            "much and the gap keeps growing (0 = off).",
            "--overfitting-threshold",
        ),
    ] = None,
    force_epochs: Annotated[
        bool, _opt("Run every epoch: no early, overfitting, perfect-loss or plateau stop.", "--force-epochs")
    ] = False,
    resume: Annotated[bool, _opt("Continue the newest run from its last checkpoint.", "--resume")] = False,
    resume_from: Annotated[
        str | None, _opt("Continue from this run folder or checkpoint-N folder.", "--resume-from")
    ] = None,
    optimizer: Annotated[
        str | None,
        _opt(
            "adamw (default), adamw_torch_fused, adafactor, sgd, adamw_8bit, "
            "paged_adamw_8bit (the 8-bit ones need a GPU).",
            "--optimizer",
        ),
    ] = None,
    seed: Annotated[int | None, _opt("Random seed (data order, initialisation).", "--seed")] = None,
    train_on_inputs: Annotated[
        bool | None,
        _opt(
            "Also compute the loss on prompts, not only on answers.", "--train-on-inputs/--no-train-on-inputs"
        ),
    ] = None,
    packing: Annotated[
        bool | None,
        _opt(
            "Padding-free packed batches (default on); --no-packing pads instead.", "--packing/--no-packing"
        ),
    ] = None,
    precision: Annotated[
        str | None,
        _opt(
            "auto (default: measured on this machine) | fp32 | bf16 | fp16 (GPU only).",
            "--precision",
        ),
    ] = None,
    output: Annotated[
        Path | None, _opt("Write the adapter here instead of the model folder's lora/.", "--output")
    ] = None,
    no_tensorboard: Annotated[bool, _opt("Do not write TensorBoard logs.", "--no-tensorboard")] = False,
    strict: Annotated[
        bool,
        _opt(
            "Fail on the first bad record instead of skipping it (skipped ones go to rejects.jsonl).",
            "--strict",
        ),
    ] = False,
    system_prompt: Annotated[
        str | None, _opt("System prompt added to every conversation that has none.", "--system-prompt")
    ] = None,
    dry_run: Annotated[
        bool,
        _opt(
            "Print the plan, trainable parameters, data summary and memory estimate; train nothing.",
            "--dry-run",
        ),
    ] = False,
    trust_remote_code: Annotated[
        bool,
        _opt(
            "Allow a model that needs its own Python code to run it (asked each time, never remembered).",
            "--trust-remote-code",
        ),
    ] = False,
) -> None:
    """Fine-tune an installed model with LoRA / QLoRA / DoRA, driven by its handler."""
    from llm_installer import consent

    consent.grant(trust_remote_code)  # this command's decision only; not part of the plan
    run_train_command(name, collect_args(locals()), dry_run=dry_run)


def run_train_command(name: str, args: dict[str, Any], *, dry_run: bool = False) -> None:
    """Plan (continuing a resumed run's flags), then print the dry run or train and report."""
    from llm_installer.store import find_model
    from llm_installer.train.plan import build_plan
    from llm_installer.train.run_dir import resume_args

    folder = find_model(name)
    if dry_run:
        args["_allow_no_data"] = True
    plan = build_plan(folder, resume_args(folder.runs_dir, args))
    if dry_run:
        from llm_installer.train.dry_run import print_dry_run

        print_dry_run(plan)
        return
    from llm_installer.train.distributed import is_main
    from llm_installer.train.trainer import run_training

    result = run_training(plan)
    if not is_main():  # under torchrun / accelerate launch the main process reports for all
        if result.interrupted:
            raise typer.Exit(130)
        return
    print_result(name, plan, result)


def print_result(name: str, plan: Any, result: Any) -> None:
    """Where the adapter and the run folder are, the run's numbers, and how to resume an interrupted run."""
    from llm_installer.console import console

    m = result.metrics
    console.print(f"adapter: {result.adapter_dir}", soft_wrap=True)
    console.print(
        f"run folder: {result.run_dir} (report.md, loss.png"
        f"{', tensorboard/' if plan.value('tensorboard') else ''})",
        soft_wrap=True,
    )
    console.print(
        f"steps {m.get('global_step')}, last training loss {m.get('train_loss_last')}, best validation "
        f"loss {m.get('best_eval_loss')}, {m.get('tokens_per_second')} tokens/s"
        + (f" over {m['processes']} processes" if (m.get("processes") or 1) > 1 else ""),
        soft_wrap=True,
    )
    if result.interrupted:
        if result.kept_previous is not None:
            console.print(
                f"the finished adapter in {result.kept_previous} stays active; this run's partly trained one "
                f"is in {result.adapter_dir}",
                soft_wrap=True,
            )
        console.print(
            f"interrupted: resume with `llm-installer train {name} --resume` (it replaces the active "
            "adapter when it finishes)",
            soft_wrap=True,
        )
        raise typer.Exit(130)


def _arg_names() -> tuple[str, ...]:
    """The train flags the plan takes: the plan's own USER_KEYS (one list, not two), in the CLI's spelling
    (`--no-tensorboard` for tensorboard, `--resume-from` beside `--resume`). Imported here, not at module
    level, so `--help` stays light."""
    from llm_installer.train.plan import USER_KEYS

    return (*(k for k in USER_KEYS if k != "tensorboard"), "resume_from", "no_tensorboard")


def collect_args(values: dict[str, Any]) -> dict[str, Any]:
    """The user's flags as the plan expects them: only flags actually given (False/None = not given)."""
    out: dict[str, Any] = {}
    for key in _arg_names():
        v = values.get(key)
        if v is None or v is False and key in ("force_epochs", "resume", "no_tensorboard", "strict"):
            continue
        out[key] = str(v) if isinstance(v, Path) else v
    return out


def register(app: typer.Typer) -> None:
    app.command("train", help=f"Fine-tune an installed model with LoRA / QLoRA / DoRA.\n\n{EXAMPLE}")(train)
