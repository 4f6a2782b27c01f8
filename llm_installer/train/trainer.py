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
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_installer import faults
from llm_installer.consent import allow_remote_code
from llm_installer.errors import UserError
from llm_installer.train.plan import TrainingPlan

RUN_INFO = "run_info.json"
ADAPTER_INFO = "adapter_info.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


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


# ---------------------------------------------------------------------------------------------------------
# Run folders and resume


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_dir(runs_dir: Path) -> Path:
    """runs/<YYYYmmdd-HHMMSS>[-n]/ — names sort in creation order."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = _timestamp()
    for n in range(1000):
        name = base if n == 0 else f"{base}-{n:03d}"
        path = runs_dir / name
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot create a run folder in {runs_dir}: too many runs this second")


COMPLETE_MARKER = ".complete"


def mark_checkpoint_complete(ckpt: Path) -> None:
    """Flush a just-saved checkpoint's files to disk, then write its marker: only then may --resume use it.

    A kill or a full disk during the save leaves a folder without the marker, which resume skips."""
    if not ckpt.is_dir():
        return
    for f in ckpt.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    marker = ckpt / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write("complete\n")
        fh.flush()
        os.fsync(fh.fileno())


def checkpoint_is_complete(ckpt: Path) -> bool:
    """The marker is there and the files a resume reads are still whole (a rotation may have been cut)."""
    if not (ckpt / COMPLETE_MARKER).is_file():
        return False
    try:
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(ckpt.glob("*.safetensors")) and (ckpt / "optimizer.pt").is_file()


def checkpoints(run_dir: Path, *, complete_only: bool = True) -> list[Path]:
    """checkpoint-N folders of a run in numeric order (checkpoint-10 after checkpoint-9); by default only
    the complete ones (see `mark_checkpoint_complete`)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found) if not complete_only or checkpoint_is_complete(p)]


def find_resume_checkpoint(runs_dir: Path, resume: str) -> Path:
    """`latest`: the newest run that has a checkpoint, its highest step; else a run or checkpoint path."""
    if resume == "latest":
        runs = (
            sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
            if runs_dir.is_dir()
            else []
        )
        for run in reversed(runs):
            cks = checkpoints(run)
            if cks:
                return cks[-1]
        raise UserError(f"--resume: no checkpoint found under {runs_dir}; start a new run without --resume")
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists() and (runs_dir / resume).exists():
        path = runs_dir / resume
    if not path.exists():
        raise UserError(f"--resume-from {resume}: no such run or checkpoint folder")
    if _CKPT.match(path.name) and path.is_dir():
        if not checkpoint_is_complete(path):
            raise UserError(
                f"--resume-from {resume}: that checkpoint is incomplete (its save was cut short); resume from "
                f"its run folder {path.parent} to take the newest complete checkpoint"
            )
        return path.resolve()
    cks = checkpoints(path)
    if not cks:
        raise UserError(
            f"--resume-from {resume}: no complete checkpoint-N folder inside; pick a run under {runs_dir}"
        )
    return cks[-1].resolve()


def resume_args(runs_dir: Path, args: dict[str, Any]) -> dict[str, Any]:
    """The flags of the run being resumed, overlaid with the ones given now.

    `train NAME --resume` must continue the run as it was started (its mode, data, rank...), so the
    printed resume command needs no flag repeated; a flag given now still wins and is then checked by the
    fingerprint like any other change."""
    from llm_installer.train.plan import USER_KEYS

    resume = args.get("resume_from") or ("latest" if args.get("resume") else None)
    if not resume:
        return args
    ckpt = find_resume_checkpoint(runs_dir, str(resume))
    try:
        old = json.loads((ckpt.parent / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return args  # check_resume_compatible names the missing file
    settings = old.get("plan", {}).get("settings", {})
    given = {
        key: entry["value"]
        for key, entry in settings.items()
        if key in USER_KEYS
        and key != "resume"
        and entry.get("source") == "user"
        and str(entry.get("why", "")).startswith("--")
    }
    return {**given, **args}


def check_resume_compatible(run_dir: Path, fingerprint: str, plan: TrainingPlan) -> None:
    """Refuse to continue a run made with another base model, dataset or recipe (naming what changed)."""
    info_path = run_dir / RUN_INFO
    try:
        old = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(
            f"cannot resume from {run_dir}: {RUN_INFO} is missing or damaged; start a new run"
        ) from None
    if old.get("fingerprint") == fingerprint:
        return
    changed = []
    om, nm = old.get("plan", {}).get("model", {}), plan.model
    for key in ("model_id", "revision"):
        if om.get(key) != nm.get(key):
            changed.append(f"base model {key} {om.get(key)!r} -> {nm.get(key)!r}")
    from llm_installer.train.plan import NOT_FINGERPRINTED

    oldset = {k: v.get("value") for k, v in old.get("plan", {}).get("settings", {}).items()}
    for key, value in plan.values().items():
        if key in NOT_FINGERPRINTED or key in ("data",):
            continue
        if key in oldset and json.dumps(oldset[key], default=str) != json.dumps(value, default=str):
            changed.append(f"{key} {oldset[key]!r} -> {value!r}")
    what = "; ".join(changed) or "the plan"
    raise UserError(
        f"cannot resume {run_dir.name}: it was trained differently ({what}); run without --resume to start "
        f"a new run, or resume with the original settings"
    )


# ---------------------------------------------------------------------------------------------------------
# Writing the adapter atomically


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_adapter_leftovers(target: Path) -> None:
    """Undo what a killed adapter write left beside `target`: a half-written `.NAME.tmp-PID` is removed; a
    `.NAME.old-PID` (the previous adapter, moved aside just before the swap) goes back when `target` is
    missing, else it is removed. Only leftovers of processes that are gone are touched."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                os.replace(path, target)
            else:
                shutil.rmtree(path, ignore_errors=True)


def check_adapter_target(target: Path, model_root: Path) -> None:
    """Refuse an adapter destination whose contents a write would destroy.

    Writing an adapter replaces its folder whole, so the target must be new, empty, or an adapter folder
    already (it has adapter_config.json); never the model folder, its weights, or a folder holding them."""
    target = Path(target).expanduser().resolve()
    root = Path(model_root).resolve()
    if target == root or root.is_relative_to(target) or target.is_relative_to(root / "model"):
        raise UserError(
            f"--output {target}: that is the model's own folder (or holds it); writing the adapter there would "
            "replace it: give a new or empty folder"
        )
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {target}: it is a file; give a new or empty folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "adapter_config.json").is_file():
        raise UserError(
            f"--output {target}: the folder holds other files and an adapter write would replace them all: "
            "give a new or empty folder, or an adapter folder to overwrite"
        )


def write_adapter_atomically(
    model: Any,
    target: Path,
    info: dict[str, Any],
    extra_files: list[Path] = (),
    source_dir: Path | None = None,
) -> Path:
    """Save the adapter into a temp folder beside `target`, then swap it in: never a half-written lora/."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_adapter_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if source_dir is not None:
            shutil.copytree(source_dir, tmp)
        else:
            model.save_pretrained(str(tmp))
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        for f in extra_files:
            if f and Path(f).is_file():
                shutil.copy2(f, tmp / Path(f).name)
        if target.exists():
            os.replace(target, old)
            faults.point("adapter.old-aside")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------
# Building the pieces


def data_settings_for(plan: TrainingPlan) -> Any:
    """The data pipeline's DataSettings from the plan."""
    from llm_installer.data.prepare import DataSettings

    return DataSettings(
        format=None if plan.value("format") in (None, "auto") else plan.value("format"),
        max_seq_length=plan.value("max_seq_length"),
        max_examples=plan.value("max_examples"),
        validation_split=plan.value("validation_split"),
        train_on_inputs=plan.value("train_on_inputs"),
        seed=plan.value("seed"),
        strict=bool(plan.value("strict")),
        system_prompt=plan.value("system_prompt"),
        # prepared data is cached per model folder, keyed by data + tokenizer + settings
        cache_dir=str(Path(plan.model["folder"]) / ".cache" / "data"),
    )


def prepare_data(plan: TrainingPlan, tokenizer: Any, handler: Any, rejects_path: Path | None = None) -> Any:
    from llm_installer.data.prepare import prepare_dataset

    settings = data_settings_for(plan)
    if rejects_path is not None:
        settings.rejects_path = str(rejects_path)
    return prepare_dataset(plan.value("data"), tokenizer, handler, settings)


def load_components(plan: TrainingPlan) -> tuple[Any, Any, Any]:
    """(model folder, ModelInfo, handler) for the plan's model."""
    from llm_installer.handlers.registry import get_handler
    from llm_installer.store import ModelFolder

    folder = ModelFolder(Path(plan.model["folder"]))
    info = folder.load_info()
    return folder, info, get_handler(info)


def load_tokenizer_for(folder: Any, handler: Any, info: Any) -> Any:
    from llm_installer.loading import load_tokenizer

    tok = load_tokenizer(folder.model_dir, trust_remote_code=allow_remote_code(info))
    if hasattr(handler, "apply_tokenizer_config"):
        tok = handler.apply_tokenizer_config(tok) or tok
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_data_processor(folder: Any, info: Any, tokenizer: Any) -> Any:
    """A vision-language model's processor (sharing `tokenizer`), so that image and video records become
    pixel tensors; None for text models, or when the folder's processor cannot be loaded."""
    if getattr(info, "task", None) != "vision_language":
        return None
    from llm_installer.loading import load_processor

    processor = load_processor(folder.model_dir, trust_remote_code=allow_remote_code(info))
    if processor is None or not (
        hasattr(processor, "image_processor") or hasattr(processor, "video_processor")
    ):
        return None
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer = tokenizer  # the handler-configured tokenizer the rest of the run uses
    return processor


def prepare_run_data(
    plan: TrainingPlan, folder: Any, info: Any, tokenizer: Any, handler: Any, rejects_path: Path | None = None
) -> Any:
    """prepare_data with the model's processor for vision-language models (images -> pixel_values)."""
    from llm_installer.errors import DataError

    processor = load_data_processor(folder, info, tokenizer)
    try:
        return prepare_data(plan, processor or tokenizer, handler, rejects_path=rejects_path)
    except DataError as exc:
        if processor is not None or "no image processor" not in str(exc):
            raise
        if getattr(info, "task", None) == "vision_language":
            raise DataError(
                f"--data {plan.value('data')}: the data has images or video but the processor of "
                f"{info.model_id} could not be loaded from {folder.model_dir} (Qwen2-VL's needs torchvision); "
                "fix the processor or use text-only data"
            ) from None
        raise DataError(
            f"--data {plan.value('data')}: the data has images or video but {info.model_id} is a text-only "
            "model: train a vision-language model (such as a LLaVA) on it or use text-only data"
        ) from None


def media_keys(examples: list[dict[str, Any]]) -> list[str]:
    """The keys beside input_ids/labels that the examples carry (pixel_values etc. for image data)."""
    keys: set[str] = set()
    for ex in examples:
        if len(ex) > 2:  # text examples hold input_ids and labels only
            keys.update(
                k for k, v in ex.items() if v is not None and not (hasattr(v, "__len__") and not len(v))
            )
    return sorted(keys - {"input_ids", "labels"})


def settings_for_media(plan: TrainingPlan, keys: list[str], info: Any = None) -> bool:
    """Switch the plan to padded batches for image/video examples; refuse keys no collator can batch.

    Padding-free packing cannot carry per-example pixel tensors, so such data trains with padded, masked
    rows (and plain sdpa, since packed_sdpa was chosen for packed rows); the plan records why, with source
    `data`. Returns True when the plan changed.
    """
    from llm_installer.data.collate import MEDIA_KEYS, TOKEN_KEYS

    unknown = [k for k in keys if k not in (*MEDIA_KEYS, *TOKEN_KEYS)]
    if unknown:
        raise UserError(
            f"--data {plan.value('data')}: the model's processor gives "
            f"{', '.join(unknown)}, which the trainer cannot batch yet (it batches {', '.join(MEDIA_KEYS)}); "
            "use text-only data for this model"
        )
    if not keys:
        return False
    why = "image/video examples: padded batches (packed rows cannot carry per-example pixel tensors)"
    changed = False
    if plan.value("packing"):
        plan["settings"]["packing"] = {"value": False, "source": "data", "why": why}
        changed = True
    # the packed-rows attention was derived from packing; padded rows take the model's padded choice
    from llm_installer.train.attention import PACKED_IMPLEMENTATIONS, choose_attention

    if plan.value("attn_implementation") in PACKED_IMPLEMENTATIONS:
        cfg = dict(getattr(info, "config", None) or {})
        model_type = getattr(info, "model_type", None) or cfg.get("model_type") or ""
        impl, _ = choose_attention(
            model_type, cfg, packing=False, device=plan.value("device"), flash_available=False
        )
        plan["settings"]["attn_implementation"] = {"value": impl, "source": "data", "why": why}
        changed = True
    return changed


def apply_media_settings(plan: TrainingPlan, data: Any, console: Any, info: Any = None) -> list[str]:
    """settings_for_media for prepared `data`, saying so on `console` when packing goes off; the media keys.

    The training run and `--dry-run` both go through here, so they make (and print) the same choice."""
    keys = media_keys([*data.train, *data.validation])
    if settings_for_media(plan, keys, info):
        console.print(
            "packing is off for image data: padded batches (packed rows cannot carry per-example pixel "
            f"tensors); attention {plan.value('attn_implementation')}",
            soft_wrap=True,
        )
    return keys


def load_training_model(plan: TrainingPlan, folder: Any, info: Any, handler: Any) -> Any:
    """Base model in the plan's precision (4-bit for QLoRA), prepared by the handler, wrapped with LoRA/DoRA."""
    import torch

    from llm_installer.loading import load_model

    method = plan.value("method")
    precision = plan.value("precision")
    device = plan.value("device")
    quant = None
    load_dtype = "fp32"
    if device == "cuda" and precision in ("bf16", "fp16"):
        load_dtype = precision
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        )
    from llm_installer.train.attention import attention_load_kwargs

    model = load_model(
        folder.model_dir,
        task=getattr(info, "task", "causal_lm") or "causal_lm",
        dtype=load_dtype,
        device_map={"": 0} if quant is not None else None,
        quantization_config=quant,
        trust_remote_code=allow_remote_code(info),
        **attention_load_kwargs(plan.value("attn_implementation")),
    )
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(plan.value("gradient_checkpointing"))
        )
    model = handler.prepare_model_for_training(model, plan.values()) or model
    # handlers may switch gradient checkpointing on; the plan has the final word (hardware-aware)
    ckpt_attr = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if not plan.value("gradient_checkpointing") and getattr(model, ckpt_attr, False):
        model.gradient_checkpointing_disable()
    from llm_installer.train.lora_setup import build_peft_model

    model = build_peft_model(
        model,
        r=plan.value("lora_r"),
        alpha=plan.value("lora_alpha"),
        dropout=plan.value("lora_dropout"),
        method=method,
        target_kwargs=lora_target_kwargs(model, plan, handler),
    )
    if plan.value("fused_lora"):
        from llm_installer.train.lora_fast import fuse_lora_layers

        fuse_lora_layers(model)
    return model


def lora_target_kwargs(model: Any, plan: TrainingPlan, handler: Any) -> dict[str, Any]:
    """Target modules through the handlers' resolver (user's --target-modules or the handler's list)."""
    from llm_installer.handlers.targets import resolve_lora_targets

    params = dict(handler.get_training_parameters() or {})
    targets = plan.value("target_modules")
    if targets is not None:
        params["lora_target_modules"] = targets
    if plan.value("modules_to_save") is not None:
        params["lora_modules_to_save"] = plan.value("modules_to_save")
    return dict(resolve_lora_targets(model, params))


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


def run_training(
    plan: TrainingPlan,
    *,
    console: Any = None,
    show_progress: bool = True,
    extra_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train the plan's model on the plan's data; write lora/, runs/<timestamp>/ and return what happened."""
    import torch
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    from llm_installer.chat_format import handler_chat_format
    from llm_installer.console import console as default_console
    from llm_installer.train import callbacks as cb
    from llm_installer.train import distributed
    from llm_installer.train.collate import PaddedCollator, PaddingFreeCollator
    from llm_installer.train.report import generate_with_stops, held_out_prompts, plot_losses, write_report

    console = console or default_console
    plan = TrainingPlan.from_dict(plan)
    from llm_installer.train import preference as pref

    preference = pref.is_preference(plan)  # issue 15 hook: DPO/ORPO through TRL's DPOTrainer
    threads = plan.value("torch_threads")
    if threads and plan.value("device") == "cpu":
        # the plan's threads are the machine's cores: processes on one machine share them (more threads
        # than cores makes every OpenMP barrier spin: measured 8x slower with 2 processes x 2 threads)
        torch.set_num_threads(max(1, int(threads) // distributed.local_world_size()))
    set_seed(int(plan.value("seed")))
    # under torchrun / accelerate launch: one run folder, output and files from the main process only
    distributed.init()
    main = distributed.is_main()
    if not main:
        from rich.console import Console

        console, show_progress = Console(quiet=True), False

    folder, info, handler = load_components(plan)
    target = Path(plan.value("output")).expanduser() if plan.value("output") else folder.lora_dir
    check_adapter_target(target, folder.root)
    recover_adapter_leftovers(target)  # a previous run killed mid-write: its adapter goes back first
    tokenizer = load_tokenizer_for(folder, handler, info)
    # the run folder first (rejects.jsonl goes into it): a new one, or the one being resumed
    resumed_from = None
    if plan.value("resume"):
        resumed_from = find_resume_checkpoint(folder.runs_dir, str(plan.value("resume")))
        run_dir = resumed_from.parent
    else:
        run_dir = distributed.broadcast(new_run_dir(folder.runs_dir) if main else None)
    try:
        with distributed.main_first():  # the main process fills the prepared-data cache, the others read it
            if preference:  # issue 15 hook: DPO/ORPO pairs (train/preference.py)
                data = pref.prepare_preference_data(
                    plan, tokenizer, handler, rejects_path=run_dir / "rejects.jsonl" if main else None
                )
            else:
                data = prepare_run_data(
                    plan,
                    folder,
                    info,
                    tokenizer,
                    handler,
                    rejects_path=run_dir / "rejects.jsonl" if main else None,
                )
        # image/video examples (pixel_values etc.) train in padded batches: recorded in the plan before it
        # is fingerprinted, so a resumed run makes the same choice
        if not preference:
            apply_media_settings(plan, data, console, info)
    except BaseException:
        if resumed_from is None and main:  # leave no empty run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    train_set = list(data.train)
    val_set = list(data.validation)
    if not train_set:
        raise UserError(f"--data {plan.value('data')}: no usable training example after preparation")
    data_fp = str(getattr(data, "fingerprint", ""))
    fingerprint = plan.fingerprint(data_fp)

    # a resumed run must be the same training (same data, same trajectory-changing settings)
    if resumed_from is not None:
        old = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).is_file() else {}
        if old.get("data_fingerprint") != data_fp:
            raise UserError(
                f"cannot resume {run_dir.name}: the training data changed (fingerprint {old.get('data_fingerprint')}"
                f" -> {data_fp}); run without --resume to start a new run"
            )
        check_resume_compatible(run_dir, fingerprint, plan)
    run_info = {
        "fingerprint": fingerprint,
        "data_fingerprint": data_fp,
        "plan": plan,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "processes": distributed.world_size(),
    }
    if main:
        (run_dir / RUN_INFO).write_text(json.dumps(run_info, indent=2, default=str), encoding="utf-8")
    if plan.value("tensorboard"):
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")

    model = load_training_model(plan, folder, info, handler)
    if plan.value("init_adapter"):  # issue 15 hook: start from a previous adapter (SFT then DPO)
        pref.load_init_adapter(model, plan.value("init_adapter"))
    # the template and end-of-turn token the data was rendered with: the report stops where `chat` will
    chat_format = handler_chat_format(handler, tokenizer)
    stop_ids = chat_format.stop_token_ids
    pick_prompts = pref.report_prompts if preference else held_out_prompts
    prompts = pick_prompts(val_set or train_set, int(plan.value("report_prompts") or 0)) if main else []
    max_new = int(plan.value("report_max_new_tokens") or 32)
    with model.disable_adapter():
        before = generate_with_stops(model, tokenizer, prompts, max_new_tokens=max_new, stop_ids=stop_ids)

    stats = cb.RunStats()
    # with per-example attention a whole batch is one row (no padding at all); with a mask-based
    # attention, rows of at most max_seq_length keep the row x row mask small
    row_tokens = int(plan.value("max_seq_length"))
    from llm_installer.train.attention import attends_per_example

    if attends_per_example(plan.value("attn_implementation")):
        row_tokens *= int(plan.value("batch_size"))
    collator = (
        PaddingFreeCollator(tokenizer.pad_token_id, row_tokens)
        if plan.value("packing")
        else PaddedCollator(tokenizer.pad_token_id)
    )
    args = training_arguments(plan, run_dir, has_eval=bool(val_set))
    keep_dir = run_dir / "best_adapter" if plan.value("keep_best") else None
    callbacks = []
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
    callbacks.append(cb.BestTracker(stats, keep_dir if main else None))
    flag = cb.InterruptFlag()
    callbacks.append(cb.InterruptCallback(flag, stats))
    callbacks.append(cb.ProgressCallback(stats, console, enabled=show_progress))
    callbacks += list(extra_callbacks or [])

    build = pref.build_preference_trainer if preference else _LossTrainer.build  # issue 15 hook
    trainer = build(
        plan,
        stats,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=None if preference else collator,  # TRL's pair collator for DPO/ORPO
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    for noisy in (PrinterCallback, HFProgress):
        trainer.remove_callback(noisy)

    t0 = time.perf_counter()
    with flag:
        output = trainer.train(resume_from_checkpoint=str(resumed_from) if resumed_from else None)
    stats.train_seconds = time.perf_counter() - t0
    # every process trained on its own share of the batches: throughput counts them all
    stats.real_tokens = distributed.total(stats.real_tokens)
    stats.computed_tokens = distributed.total(stats.computed_tokens)
    state = trainer.state
    interrupted = flag.requested
    if stats.stop_reason is None:
        if plan.value("max_steps") and state.global_step >= int(plan.value("max_steps")):
            stats.stop_reason = f"reached --max-steps {plan.value('max_steps')}"
        else:
            stats.stop_reason = f"completed {plan.value('epochs')} epoch(s) ({state.global_step} steps)"
    console.print(f"[bold]stopped:[/bold] {stats.stop_reason}", soft_wrap=True)

    # the adapter to publish: the best one in keep-best mode, else the current weights
    source_dir = keep_dir if keep_dir is not None and (keep_dir / "adapter_config.json").is_file() else None
    if source_dir is not None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(source_dir)))
    after = generate_with_stops(model, tokenizer, prompts, max_new_tokens=max_new, stop_ids=stop_ids)

    train_hist = [e["loss"] for e in state.log_history if "loss" in e]
    metrics = {
        "global_step": state.global_step,
        "epoch": round(float(state.epoch or 0), 3),
        "train_loss_last": round(train_hist[-1], 5) if train_hist else None,
        "train_loss_mean": round(float(output.training_loss), 5)
        if output.training_loss is not None
        else None,
        "best_eval_loss": round(stats.best_eval_loss, 5) if stats.best_eval_loss is not None else None,
        "best_step": stats.best_step,
        "last_eval_loss": round(stats.last_eval_loss, 5) if stats.last_eval_loss is not None else None,
        "train_seconds": round(stats.train_seconds, 2),
        "tokens_per_second": round(stats.real_tokens / stats.train_seconds, 1)
        if stats.train_seconds
        else None,
        "trained_tokens": stats.real_tokens,
        "padding_fraction": round(stats.padding_fraction, 4),
        "processes": distributed.world_size(),
        "threads_per_process": torch.get_num_threads(),
    }
    adapter_info = {
        "base_model": {
            "model_id": info.model_id,
            "revision": info.revision,
            "source": info.source,
            "folder": str(folder.root),
        },
        "handler": getattr(handler, "name", type(handler).__name__),
        "method": plan.value("method"),
        "objective": plan.value("objective", "sft"),  # issue 15: sft, dpo or orpo
        "mode": plan.value("mode"),
        "dataset": {
            "spec": plan.value("data"),
            "train_examples": len(train_set),
            "validation_examples": len(val_set),
        },
        "plan": plan,
        "fingerprint": fingerprint,
        "data": {
            "spec": plan.value("data"),
            "fingerprint": data_fp,
            "train_examples": len(train_set),
            "validation_examples": len(val_set),
            "stats": _jsonable(getattr(data, "stats", {})),
        },
        "metrics": metrics,
        "chat_format": chat_format.to_dict(),  # serving and export keep to what the adapter learned
        "stop_reason": stats.stop_reason,
        "interrupted": interrupted,
        "run_dir": str(run_dir),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    # an interrupted run never replaces a finished adapter: it goes into the run folder instead
    kept_previous = interrupted and (target / "adapter_config.json").is_file()
    adapter_dir = run_dir / "adapter" if kept_previous else target
    if main:  # the main process writes the report, the plot and the adapter; the others wait until it has
        plot = plot_losses(state.log_history, run_dir / "loss.png", f"{info.model_id} ({plan.value('mode')})")
        report = write_report(
            run_dir / "report.md",
            info=adapter_info,
            tokenizer=tokenizer,
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
        run_info.update(
            finished=_dt.datetime.now().isoformat(timespec="seconds"),
            stop_reason=stats.stop_reason,
            adapter_dir=str(adapter_dir),
            metrics=metrics,
        )
        (run_dir / RUN_INFO).write_text(json.dumps(run_info, indent=2, default=str), encoding="utf-8")
    distributed.barrier()
    return TrainResult(
        stop_reason=stats.stop_reason,
        adapter_dir=adapter_dir,
        run_dir=run_dir,
        metrics=metrics,
        interrupted=interrupted,
        resumed_from=resumed_from,
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
