"""The training engine: plan -> data -> PEFT model -> transformers Trainer -> adapter, report, run folder.

`run_training(plan)` is the single entry point (the CLI, `./train.sh` and `accelerate launch` all go through
it). The loop is transformers' `Trainer` so checkpoints, resume, schedulers, mixed precision and
distributed launchers behave as users know them; what is ours is the batch layout (padding-free packed
rows, `collate.py`), the loss (head only on labelled positions, `loss.py`), the callbacks (auto-stop,
graceful interrupt, progress, best adapter) and the outputs (atomic `lora/`, `adapter_info.json`, TensorBoard,
loss plot, report).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_installer import faults
from llm_installer.errors import UserError

# The pieces and the run folders live in their own modules; their names stay importable from here.
from llm_installer.train.components import (  # noqa: F401
    apply_media_settings,
    data_settings_for,
    load_components,
    load_data_processor,
    load_tokenizer_for,
    load_training_model,
    lora_target_kwargs,
    media_keys,
    prepare_data,
    prepare_run_data,
    settings_for_media,
)
from llm_installer.train.plan import TrainingPlan
from llm_installer.train.run_dir import (  # noqa: F401
    ADAPTER_INFO,
    COMPLETE_MARKER,
    RUN_INFO,
    check_adapter_target,
    check_resume_compatible,
    checkpoint_is_complete,
    checkpoints,
    find_resume_checkpoint,
    mark_checkpoint_complete,
    new_run_dir,
    recover_adapter_leftovers,
    resume_args,
    write_adapter_atomically,
)


@dataclass
class TrainResult:
    """What a run produced and why it ended."""

    stop_reason: str
    adapter_dir: Path | None
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    resumed_from: Path | None = None
    # set when an interrupted run left the finished adapter here in place (its own is in adapter_dir)
    kept_previous: Path | None = None


class _LossTrainer:
    """Factory for the Trainer subclass (transformers is imported lazily)."""

    @staticmethod
    def build(plan: TrainingPlan, stats: Any, **kwargs: Any):
        import torch
        from transformers import Trainer

        from llm_installer.data.collate import MEDIA_KEYS
        from llm_installer.train.loss import causal_lm_loss

        head_on_labels = bool(plan.value("head_on_labels"))

        def head_only(inputs):  # the head-only shortcut has no vision tower: image batches use the forward
            return head_on_labels and not any(k in inputs for k in MEDIA_KEYS)

        class LLMTrainer(Trainer):
            # Our loss is divided by the labelled tokens of the whole optimizer step (every micro-batch and
            # process): the Trainer then counts them (`num_items_in_batch`, gathered across processes) and
            # must not divide by the accumulation steps again.
            loss_is_scaled_for_ga = True

            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch
                self._loss_shifts_labels = True  # our loss predicts labels[:, 1:]

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                real = inputs.pop("num_real_tokens", None)
                if model.training:
                    if real is not None:
                        stats.real_tokens += int(real)
                    stats.computed_tokens += int(inputs["input_ids"].numel())
                num_items = None
                if num_items_in_batch is not None and model.training:
                    # DDP averages gradients over processes: each one's sum / (global count / processes)
                    # adds up to the global mean
                    num_items = num_items_in_batch / self.accelerator.num_processes
                loss = causal_lm_loss(
                    model,
                    inputs,
                    head_on_labels=head_only(inputs),
                    num_items=num_items,
                    aux_scale=1.0 / self.current_gradient_accumulation_steps
                    if num_items is not None
                    else 1.0,
                )
                return (loss, None) if return_outputs else loss

            def evaluate(self, *a: Any, **kw: Any):
                # evaluation must not move the random stream the training draws its dropout masks from
                with torch.random.fork_rng(devices=[]):
                    return super().evaluate(*a, **kw)

            def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
                # accelerate wraps only the model's own forward in autocast; the head-only loss calls the
                # backbone and the head directly, so training and eval steps enter the plan's autocast here
                return self.accelerator.autocast()

            def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
                inputs = self._prepare_inputs(inputs)
                inputs.pop("num_real_tokens", None)
                with torch.no_grad(), self.compute_loss_context_manager():
                    loss = causal_lm_loss(model, inputs, head_on_labels=head_only(inputs))
                return loss.detach(), None, None

            def _save_rng_state(self, output_dir):
                faults.point("checkpoint.partial")
                super()._save_rng_state(output_dir)

            def _save_checkpoint(self, model, trial):
                super()._save_checkpoint(model, trial)
                # a checkpoint counts for --resume only once it is whole: the marker is written last
                faults.point("checkpoint.written")
                if self.args.should_save:
                    mark_checkpoint_complete(
                        Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                    )

        return LLMTrainer(**kwargs)


def training_arguments(plan: TrainingPlan, run_dir: Path, has_eval: bool) -> Any:
    """transformers TrainingArguments from the plan: every flag lands here or in the callbacks."""
    from transformers import TrainingArguments

    eval_steps = plan.value("eval_steps")
    save_steps = plan.value("save_steps")
    precision = plan.value("precision")
    max_steps = plan.value("max_steps")
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir),
        num_train_epochs=float(plan.value("epochs")),
        max_steps=int(max_steps) if max_steps else -1,
        per_device_train_batch_size=int(plan.value("batch_size")),
        per_device_eval_batch_size=int(plan.value("batch_size")),
        gradient_accumulation_steps=int(plan.value("gradient_accumulation")),
        learning_rate=float(plan.value("learning_rate")),
        lr_scheduler_type=plan.value("lr_scheduler"),
        weight_decay=float(plan.value("weight_decay")),
        max_grad_norm=float(plan.value("max_grad_norm")),
        optim=plan.value("optimizer"),
        seed=int(plan.value("seed")),
        data_seed=int(plan.value("seed")),
        logging_strategy="steps",
        logging_steps=int(plan.value("logging_steps")),
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no",
        eval_steps=eval_steps if has_eval and eval_steps else None,
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,
        save_total_limit=plan.value("save_total_limit"),
        report_to=["tensorboard"] if plan.value("tensorboard") else [],
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=plan.value("device") == "cpu",
        dataloader_num_workers=0,
        train_sampling_strategy="random" if plan.value("packing") else "group_by_length",
        save_only_model=False,
    )
    warmup = float(plan.value("warmup_ratio") or 0.0)
    # transformers 5 takes a float < 1 in warmup_steps as a ratio of the total steps
    kwargs["warmup_steps"] = warmup if 0 < warmup < 1 else 0
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    import inspect

    names = inspect.signature(TrainingArguments.__init__).parameters
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[ckpt] = bool(plan.value("gradient_checkpointing"))
    if plan.value("gradient_checkpointing"):
        kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """What the steps of one run share (built up by `run_training`, step by step)."""

    plan: TrainingPlan
    console: Any
    show_progress: bool
    main: bool
    folder: Any = None
    info: Any = None
    handler: Any = None
    tokenizer: Any = None
    target: Path | None = None
    run_dir: Path | None = None
    resumed_from: Path | None = None
    data: Any = None
    train_set: list[Any] = field(default_factory=list)
    val_set: list[Any] = field(default_factory=list)
    data_fp: str = ""
    fingerprint: str = ""
    run_info: dict[str, Any] = field(default_factory=dict)


def run_training(
    plan: TrainingPlan,
    *,
    console: Any = None,
    show_progress: bool = True,
    extra_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train the plan's model on the plan's data; write lora/, runs/<timestamp>/ and return what happened."""
    from llm_installer.chat_format import handler_chat_format
    from llm_installer.train import callbacks as cb
    from llm_installer.train import preference as pref
    from llm_installer.train.report import generate_with_stops, held_out_prompts

    run = setup_process(TrainingPlan.from_dict(plan), console, show_progress)
    plan = run.plan
    run.folder, run.info, run.handler = load_components(plan)
    run.target = Path(plan.value("output")).expanduser() if plan.value("output") else run.folder.lora_dir
    check_adapter_target(run.target, run.folder.root)
    recover_adapter_leftovers(run.target)  # a previous run killed mid-write: its adapter goes back first
    run.tokenizer = load_tokenizer_for(run.folder, run.handler, run.info)
    open_run_dir(run)
    prepare_training_data(run)
    record_run_start(run)

    model = load_training_model(plan, run.folder, run.info, run.handler)
    if plan.value("init_adapter"):  # start from a previous adapter (SFT then DPO)
        pref.load_init_adapter(model, plan.value("init_adapter"))
    # the template and end-of-turn token the data was rendered with: the report stops where `chat` will
    chat_format = handler_chat_format(run.handler, run.tokenizer)
    report_prompts = int(plan.value("report_prompts") or 0)
    pick_prompts = pref.report_prompts if pref.is_preference(plan) else held_out_prompts
    prompts = pick_prompts(run.val_set or run.train_set, report_prompts) if run.main else []
    generate = functools.partial(
        generate_with_stops,
        max_new_tokens=int(plan.value("report_max_new_tokens") or 32),
        stop_ids=chat_format.stop_token_ids,
    )
    with model.disable_adapter():
        before = generate(model, run.tokenizer, prompts)

    stats = cb.RunStats()
    keep_dir = run.run_dir / "best_adapter" if plan.value("keep_best") else None
    flag = cb.InterruptFlag()
    callbacks = build_callbacks(plan, stats, flag, keep_dir if run.main else None, run, extra_callbacks)
    trainer = build_trainer(run, model, stats, callbacks)
    state, output = train_loop(run, trainer, stats, flag)

    load_best_adapter(model, keep_dir)
    after = generate(model, run.tokenizer, prompts)
    metrics = run_metrics(state, output, stats)
    adapter_info = adapter_info_for(run, metrics, stats, flag.requested, chat_format)
    return publish(run, model, state, adapter_info, (prompts, before, after), chat_format)


def setup_process(plan: TrainingPlan, console: Any, show_progress: bool) -> _Run:
    """Threads, seed and the distributed group; only the main process prints and writes files."""
    import torch
    from transformers import set_seed

    from llm_installer.console import console as default_console
    from llm_installer.train import distributed

    threads = plan.value("torch_threads")
    if threads and plan.value("device") == "cpu":
        # the plan's threads are the machine's cores: processes on one machine share them (more threads
        # than cores makes every OpenMP barrier spin: measured 8x slower with 2 processes x 2 threads)
        torch.set_num_threads(max(1, int(threads) // distributed.local_world_size()))
    set_seed(int(plan.value("seed")))
    # under torchrun / accelerate launch: one run folder, output and files from the main process only
    distributed.init()
    main = distributed.is_main()
    console = console or default_console
    if not main:
        from rich.console import Console

        console, show_progress = Console(quiet=True), False
    return _Run(plan=plan, console=console, show_progress=show_progress, main=main)


def open_run_dir(run: _Run) -> None:
    """The run folder (rejects.jsonl goes into it): the one being resumed, or a new one."""
    from llm_installer.train import distributed

    resume = run.plan.value("resume")
    if resume:
        run.resumed_from = find_resume_checkpoint(run.folder.runs_dir, str(resume))
        run.run_dir = run.resumed_from.parent
    else:
        run.run_dir = distributed.broadcast(new_run_dir(run.folder.runs_dir) if run.main else None)


def prepare_training_data(run: _Run) -> None:
    """The prepared data (the main process fills the cache, the others read it) and the image-data switch
    to padded batches, recorded in the plan before it is fingerprinted so a resume makes the same choice."""
    from llm_installer.train import distributed
    from llm_installer.train import preference as pref

    plan = run.plan
    try:
        with distributed.main_first():
            rejects = run.run_dir / "rejects.jsonl" if run.main else None
            if pref.is_preference(plan):  # DPO/ORPO pairs (train/preference.py); never image data
                run.data = pref.prepare_preference_data(
                    plan, run.tokenizer, run.handler, rejects_path=rejects
                )
            else:
                run.data = prepare_run_data(plan, run.folder, run.info, run.tokenizer, run.handler, rejects)
                apply_media_settings(plan, run.data, run.console, run.info)
    except BaseException:
        if run.resumed_from is None and run.main:  # leave no empty run folder behind
            shutil.rmtree(run.run_dir, ignore_errors=True)
        raise
    run.train_set, run.val_set = list(run.data.train), list(run.data.validation)
    if not run.train_set:
        raise UserError(f"--data {plan.value('data')}: no usable training example after preparation")
    run.data_fp = str(getattr(run.data, "fingerprint", ""))
    run.fingerprint = plan.fingerprint(run.data_fp)


def record_run_start(run: _Run) -> None:
    """A resumed run must be the same training (data and trajectory settings); then run_info.json."""
    from llm_installer.train import distributed

    run_dir = run.run_dir
    if run.resumed_from is not None:
        old = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).is_file() else {}
        if old.get("data_fingerprint") != run.data_fp:
            raise UserError(
                f"cannot resume {run_dir.name}: the training data changed (fingerprint "
                f"{old.get('data_fingerprint')} -> {run.data_fp}); run without --resume to start a new run"
            )
        check_resume_compatible(run_dir, run.fingerprint, run.plan)
    run.run_info = {
        "fingerprint": run.fingerprint,
        "data_fingerprint": run.data_fp,
        "plan": run.plan.to_dict(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "processes": distributed.world_size(),
    }
    if run.main:
        (run_dir / RUN_INFO).write_text(json.dumps(run.run_info, indent=2, default=str), encoding="utf-8")
    if run.plan.value("tensorboard"):
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")


def build_callbacks(
    plan: TrainingPlan,
    stats: Any,
    flag: Any,
    keep_dir: Path | None,
    run: _Run,
    extra_callbacks: list[Any] | None = None,
) -> list[Any]:
    """Auto-stop (when on), best-adapter tracking, graceful interrupt, progress, then the caller's."""
    from llm_installer.train import callbacks as cb

    callbacks: list[Any] = []
    if plan.value("auto_stop"):
        callbacks.append(
            cb.AutoStopCallback(
                stats,
                patience=plan.value("patience"),
                overfitting_threshold=plan.value("overfitting_threshold"),
                perfect_loss=plan.value("perfect_loss"),
                plateau_cycles=plan.value("plateau_cycles"),
                plateau_tolerance=float(plan.value("plateau_tolerance")),
            )
        )
    callbacks.append(cb.BestTracker(stats, keep_dir))
    callbacks.append(cb.InterruptCallback(flag, stats))
    callbacks.append(cb.ProgressCallback(stats, run.console, enabled=run.show_progress))
    callbacks.append(cb.MetricsFileCallback(run.run_dir / "metrics.jsonl", stats, enabled=run.main))
    return callbacks + list(extra_callbacks or [])


def build_trainer(run: _Run, model: Any, stats: Any, callbacks: list[Any]) -> Any:
    """The Trainer: our loss, the plan's batch layout (padding-free rows or padded), the plan's arguments."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    from llm_installer.train import preference as pref
    from llm_installer.train.attention import attends_per_example
    from llm_installer.train.collate import PaddedCollator, PaddingFreeCollator

    plan, pad_id = run.plan, run.tokenizer.pad_token_id
    # with per-example attention a whole batch is one row (no padding at all); with a mask-based
    # attention, rows of at most max_seq_length keep the row x row mask small
    row_tokens = int(plan.value("max_seq_length"))
    if attends_per_example(plan.value("attn_implementation")):
        row_tokens *= int(plan.value("batch_size"))
    collator = PaddingFreeCollator(pad_id, row_tokens) if plan.value("packing") else PaddedCollator(pad_id)
    preference = pref.is_preference(plan)
    build = pref.build_preference_trainer if preference else _LossTrainer.build  # DPO/ORPO on TRL's trainer
    trainer = build(
        plan,
        stats,
        model=model,
        args=training_arguments(plan, run.run_dir, has_eval=bool(run.val_set)),
        train_dataset=run.train_set,
        eval_dataset=run.val_set or None,
        data_collator=None if preference else collator,  # TRL's pair collator for DPO/ORPO
        processing_class=run.tokenizer,
        callbacks=callbacks,
    )
    for noisy in (PrinterCallback, HFProgress):
        trainer.remove_callback(noisy)
    return trainer


def train_loop(run: _Run, trainer: Any, stats: Any, flag: Any) -> tuple[Any, Any]:
    """The training loop (graceful on Ctrl-C), then why it stopped; (trainer state, train output)."""
    from llm_installer.train import distributed

    plan = run.plan
    t0 = time.perf_counter()
    with flag:
        output = trainer.train(resume_from_checkpoint=str(run.resumed_from) if run.resumed_from else None)
    stats.train_seconds = time.perf_counter() - t0
    # every process trained on its own share of the batches: throughput counts them all
    stats.real_tokens = distributed.total(stats.real_tokens)
    stats.computed_tokens = distributed.total(stats.computed_tokens)
    state = trainer.state
    if stats.stop_reason is None:
        if plan.value("max_steps") and state.global_step >= int(plan.value("max_steps")):
            stats.stop_reason = f"reached --max-steps {plan.value('max_steps')}"
        else:
            stats.stop_reason = f"completed {plan.value('epochs')} epoch(s) ({state.global_step} steps)"
    run.console.print(f"[bold]stopped:[/bold] {stats.stop_reason}", soft_wrap=True)
    return state, output


def load_best_adapter(model: Any, keep_dir: Path | None) -> None:
    """In keep-best mode the adapter to publish is the best one seen, not the last state."""
    if keep_dir is None or not (keep_dir / "adapter_config.json").is_file():
        return
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    set_peft_model_state_dict(model, load_peft_weights(str(keep_dir)))


def _round(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(value, digits)


def run_metrics(state: Any, output: Any, stats: Any) -> dict[str, Any]:
    """The run's numbers for adapter_info.json, metrics.json and the report."""
    import torch

    from llm_installer.train import distributed

    train_hist = [e["loss"] for e in state.log_history if "loss" in e]
    return {
        "global_step": state.global_step,
        "epoch": round(float(state.epoch or 0), 3),
        "train_loss_last": _round(train_hist[-1]) if train_hist else None,
        "train_loss_mean": _round(float(output.training_loss) if output.training_loss is not None else None),
        "best_eval_loss": _round(stats.best_eval_loss),
        "best_step": stats.best_step,
        "last_eval_loss": _round(stats.last_eval_loss),
        "train_seconds": round(stats.train_seconds, 2),
        "tokens_per_second": round(stats.real_tokens / stats.train_seconds, 1)
        if stats.train_seconds
        else None,
        "trained_tokens": stats.real_tokens,
        "padding_fraction": round(stats.padding_fraction, 4),
        "processes": distributed.world_size(),
        "threads_per_process": torch.get_num_threads(),
    }


def adapter_info_for(
    run: _Run, metrics: dict[str, Any], stats: Any, interrupted: bool, chat_format: Any
) -> dict[str, Any]:
    """adapter_info.json: base model, handler, plan, data, metrics and the chat format it learned."""
    plan, info = run.plan, run.info
    counts = {"train_examples": len(run.train_set), "validation_examples": len(run.val_set)}
    return {
        "base_model": {
            "model_id": info.model_id,
            "revision": info.revision,
            "source": info.source,
            "folder": str(run.folder.root),
        },
        "handler": getattr(run.handler, "name", type(run.handler).__name__),
        "method": plan.value("method"),
        "objective": plan.value("objective"),  # sft, dpo or orpo
        "mode": plan.value("mode"),
        "dataset": {"spec": plan.value("data"), **counts},
        "plan": plan.to_dict(),
        "fingerprint": run.fingerprint,
        "data": {
            "spec": plan.value("data"),
            "fingerprint": run.data_fp,
            **counts,
            "stats": _jsonable(getattr(run.data, "stats", {})),
        },
        "metrics": metrics,
        "chat_format": chat_format.to_dict(),  # serving and export keep to what the adapter learned
        "stop_reason": stats.stop_reason,
        "interrupted": interrupted,
        "run_dir": str(run.run_dir),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def publish(
    run: _Run,
    model: Any,
    state: Any,
    adapter_info: dict[str, Any],
    answers: tuple[list[Any], list[str], list[str]],
    chat_format: Any,
) -> TrainResult:
    """The main process writes the report, the plot, metrics.json and the adapter (the others wait).

    An interrupted run never replaces a finished adapter: it goes into the run folder instead."""
    from llm_installer.train import distributed
    from llm_installer.train.report import plot_losses, write_report

    run_dir, target, metrics = run.run_dir, run.target, adapter_info["metrics"]
    interrupted = adapter_info["interrupted"]
    kept_previous = interrupted and (target / "adapter_config.json").is_file()
    adapter_dir = run_dir / "adapter" if kept_previous else target
    if run.main:
        title = f"{run.info.model_id} ({run.plan.value('mode')})"
        plot = plot_losses(state.log_history, run_dir / "loss.png", title)
        prompts, before, after = answers
        report = write_report(
            run_dir / "report.md",
            info=adapter_info,
            tokenizer=run.tokenizer,
            prompts=prompts,
            before=before,
            after=after,
            chat_format=chat_format,
        )
        (run_dir / "metrics.json").write_text(
            json.dumps({"metrics": metrics, "log_history": state.log_history}, indent=2, default=str),
            encoding="utf-8",
        )
        adapter_dir = write_adapter_atomically(model, adapter_dir, adapter_info, [plot, report])
        run.run_info.update(
            finished=_dt.datetime.now().isoformat(timespec="seconds"),
            stop_reason=adapter_info["stop_reason"],
            adapter_dir=str(adapter_dir),
            metrics=metrics,
        )
        (run_dir / RUN_INFO).write_text(json.dumps(run.run_info, indent=2, default=str), encoding="utf-8")
    distributed.barrier()
    return TrainResult(
        stop_reason=adapter_info["stop_reason"],
        adapter_dir=adapter_dir,
        run_dir=run_dir,
        metrics=metrics,
        interrupted=interrupted,
        resumed_from=run.resumed_from,
        kept_previous=target if kept_previous else None,
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "model_dump"):
        value = value.model_dump()
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("llm-installer", "torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out
