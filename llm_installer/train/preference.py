"""Preference training (DPO, ORPO) on TRL's `DPOTrainer`: the plan keys, the data and the trainer.

The objective is chosen beside the adapter kind: `--method dpo|orpo` is DPO/ORPO on a LoRA adapter,
`--objective dpo|orpo --method dora|qlora` picks another adapter. The loop is TRL 1.16's `DPOTrainer`
(itself a transformers `Trainer`), so checkpoints, resume, our callbacks (auto-stop, Ctrl-C, progress,
best adapter) and TensorBoard work as in supervised runs. What is ours:

- the pairs are rendered by our chat-template renderer (data/preference.py), so the trainer receives
  token ids and its own tokenization is skipped (`_prepare_dataset`);
- the reference model is the base with the adapter disabled: TRL copies a PEFT model's adapter into a
  "ref" adapter, which for a new (zero-initialised) adapter is the base again at the cost of a second
  LoRA pass: we delete it, and keep it only when the run starts from a previous adapter (`--init-adapter`,
  SFT then DPO: the reference is then the SFT model);
- ORPO: TRL 1.16 has it only in `trl.experimental.orpo`, a separate trainer that tokenizes by itself; we
  compute ORPO's loss (NLL of the chosen answer + beta x odds-ratio term, no reference pass) in
  `_compute_loss` of the same trainer instead, so both objectives share the data path and the callbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_installer.constants import IGNORE_INDEX
from llm_installer.errors import UserError

OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
# TRL 1.16's DPOConfig.loss_type values (its help text lists them)
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
LOSS_TYPES = {"dpo": DPO_LOSS_TYPES, "orpo": ("orpo",)}
DEFAULT_LOSS = {"dpo": "sigmoid", "orpo": "orpo"}


# ---- the plan ----------------------------------------------------------------------------------------


def check_preference_flags(user: dict[str, Any]) -> None:
    """`--method dpo|orpo` becomes the objective (on LoRA); refuse unknown objectives and loss types."""
    method = user.get("method")
    if method in PREFERENCE_OBJECTIVES:
        if user.get("objective") not in (None, method):
            raise UserError(f"--method {method} and --objective {user['objective']} disagree: give one")
        user["objective"] = method
        user["_objective_from_method"] = True
        del user["method"]
    objective = user.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise UserError(f"--objective {objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    beta = user.get("beta")
    if beta is not None and not beta > 0:
        raise UserError(f"--beta must be positive, got {beta}")
    loss = user.get("loss_type")
    if loss is not None:
        if objective not in PREFERENCE_OBJECTIVES:
            raise UserError("--loss-type applies to preference training: add --method dpo or --method orpo")
        if loss not in LOSS_TYPES[objective]:
            raise UserError(
                f"--loss-type {loss!r} is unknown for {objective}: use one of {', '.join(LOSS_TYPES[objective])}"
            )
    if user.get("beta") is not None and objective not in PREFERENCE_OBJECTIVES:
        raise UserError("--beta applies to preference training: add --method dpo or --method orpo")


def resolve_preference(plan: Any, user: Any) -> None:
    """Derived settings of a preference run: its loss, PEFT's LoRA forward, padded pair batches."""
    objective = plan.value("objective")
    if objective not in PREFERENCE_OBJECTIVES:
        return
    source = plan.source("objective")
    if user.get("_objective_from_method"):
        plan.set("objective", objective, "user", f"--method {objective} (on a LoRA adapter)")
    why = plan.settings["objective"]["why"]
    loss = plan.value("loss_type")
    if loss is None:
        plan.set("loss_type", DEFAULT_LOSS[objective], source, f"{objective}'s own loss")
    elif loss not in LOSS_TYPES[objective]:  # a handler's loss type for the other objective
        raise UserError(
            f"loss type {loss!r} ({plan.settings['loss_type']['why']}) does not apply to {objective}"
        )
    if plan.source("beta") == "default" and objective == "orpo":
        plan.set("beta", 0.1, "default", "ORPO paper's lambda (weight of the odds-ratio term)")
    plan.set("packing", False, source, f"{why}: TRL pads each pair (chosen and rejected in one batch)")
    plan.set(
        "fused_lora", False, source, f"{why}: the reference pass switches the adapter off (PEFT's forward)"
    )
    plan.set("head_on_labels", False, source, f"{why}: TRL's fused head computes only the answer tokens")


def is_preference(plan: Any) -> bool:
    return plan.value("objective") in PREFERENCE_OBJECTIVES


def plan_rows(plan: Any) -> list[tuple[str, Any, str, str]]:
    """(key, value, source, why) of the preference settings, for `train --dry-run`."""
    keys = ("objective", "beta", "loss_type", "init_adapter")
    return [
        (k, plan.value(k), plan.source(k), plan["settings"][k]["why"]) for k in keys if k in plan["settings"]
    ]


# ---- the data --------------------------------------------------------------------------------------


def prepare_preference_data(plan: Any, tokenizer: Any, handler: Any, rejects_path: Path | None = None) -> Any:
    """The plan's pairs, prepared with the same settings as supervised data (split, limits, rejects)."""
    from llm_installer.data.preference import prepare_pairs
    from llm_installer.train.trainer import data_settings_for

    settings = data_settings_for(plan)
    settings.train_on_inputs = False  # a pair's prompt is shared: only the answers are compared
    if rejects_path is not None:
        settings.rejects_path = str(rejects_path)
    return prepare_pairs(plan.value("data"), tokenizer, handler, settings)


def example_lengths(examples: list[dict[str, Any]]) -> tuple[list[int], int]:
    """(token count of each example, trained tokens in all): a pair counts its prompt with each answer."""
    lengths, labelled = [], 0
    for e in examples:
        if "prompt_ids" in e:
            p = len(e["prompt_ids"])
            lengths += [p + len(e["chosen_ids"]), p + len(e["rejected_ids"])]
            labelled += len(e["chosen_ids"]) + len(e["rejected_ids"])
        else:
            lengths.append(len(e["input_ids"]))
            labelled += sum(1 for t in e["labels"] if t != IGNORE_INDEX)
    return lengths, labelled


def report_prompts(examples: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Held-out prompts for report.md: the pair's prompt, the chosen answer as the expected one."""
    return [
        {"prompt": list(ex["prompt_ids"]), "expected": list(ex["chosen_ids"])} for ex in examples[: max(n, 0)]
    ]


# ---- the model -------------------------------------------------------------------------------------


def load_init_adapter(model: Any, path: str) -> None:
    """Start from a previous adapter's weights (SFT then DPO); it must have this run's LoRA shape."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"--init-adapter {path}: not an adapter folder (no adapter_config.json)")
    try:
        result = set_peft_model_state_dict(model, load_peft_weights(str(folder)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(
            f"--init-adapter {path}: its LoRA shape differs from this run's ({first}); train with the same "
            "--lora-r and target modules as that adapter"
        ) from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(
            f"--init-adapter {path}: it trains modules this run has no LoRA on ({unexpected[0]}); use the same "
            "--target-modules as that adapter"
        )


def dpo_config(plan: Any, args: Any) -> Any:
    """TRL's DPOConfig carrying every TrainingArguments field the plan set, plus beta and the loss."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import DPOConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    objective = plan.value("objective")
    values.update(
        train_sampling_strategy="random",  # length grouping reads input_ids, which pairs do not have
        beta=float(plan.value("beta")),
        loss_type=[plan.value("loss_type") if objective == "dpo" else "sigmoid"],
        max_length=None,  # data/preference.py fitted each pair to max_seq_length already
        precompute_ref_log_probs=False,
        dataset_num_proc=None,
    )
    return DPOConfig(**values)


def build_preference_trainer(
    plan: Any, stats: Any, *, args: Any, model: Any, train_dataset, eval_dataset, **kw
):
    """TRL's DPOTrainer (our subclass) for the plan's objective; the reference is the base model."""
    from datasets import Dataset

    trainer_cls = _trainer_class(plan, stats)
    trainer = trainer_cls(
        model=model,
        ref_model=None,
        args=dpo_config(plan, args),
        train_dataset=Dataset.from_list(list(train_dataset)),
        eval_dataset=Dataset.from_list(list(eval_dataset)) if eval_dataset else None,
        **kw,
    )
    peft_config = getattr(trainer.model, "peft_config", {})
    if "ref" in peft_config and not plan.value("init_adapter"):
        # a new adapter: the copy TRL made is the base model again; disabling the adapter gives the same
        # reference with one LoRA pass less
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer


def _trainer_class(plan: Any, stats: Any) -> type:
    """The DPOTrainer subclass: our token ids, token counts, ORPO's loss, complete-checkpoint markers."""
    import torch
    from trl import DPOTrainer

    from llm_installer import faults
    from llm_installer.train.trainer import mark_checkpoint_complete

    orpo = plan.value("objective") == "orpo"

    class PreferenceTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:  # rendered by data/preference.py already
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                stats.real_tokens += int(inputs["attention_mask"].sum())
                stats.computed_tokens += int(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _compute_loss(self, model, inputs, return_outputs):
            if not orpo:
                return super()._compute_loss(model, inputs, return_outputs)
            loss = orpo_loss(self, model, inputs)
            return (loss, None) if return_outputs else loss

        def evaluate(self, *a: Any, **kw: Any):
            with torch.random.fork_rng(devices=[]):  # evaluation must not move the training's random stream
                return super().evaluate(*a, **kw)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            faults.point("checkpoint.written")
            if self.args.should_save:
                mark_checkpoint_complete(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")

    return PreferenceTrainer


def orpo_loss(trainer: Any, model: Any, inputs: dict[str, Any]) -> Any:
    """ORPO (Hong et al. 2024): NLL of the chosen answer + beta x -log sigmoid(log odds(chosen) - log
    odds(rejected)), odds from the per-token mean log-probability; no reference model. Logs the same
    reward metrics as DPO (beta x mean log-probability) so auto-stop, TensorBoard and the report match."""
    import torch
    import torch.nn.functional as F

    mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=labels,
        use_cache=False,
        fused_lm_head=True,
    )
    shift = mask[..., 1:]
    logps = out.log_probs[:, -shift.size(1) :]
    counts = shift.sum(dim=1).clamp(min=1)
    mean_logps = (logps * shift).sum(dim=1) / counts
    chosen, rejected = mean_logps.chunk(2, dim=0)
    chosen_count = counts.chunk(2, dim=0)[0]

    def log_odds(lp: torch.Tensor) -> torch.Tensor:  # log(p / (1 - p)), p = exp(lp) < 1
        return lp - torch.log1p(-torch.exp(lp).clamp(max=1 - 1e-6))

    ratio = log_odds(chosen) - log_odds(rejected)
    nll = -(chosen * chosen_count).sum() / chosen_count.sum()
    loss = nll - trainer.beta * F.logsigmoid(ratio).mean()
    mode = "train" if model.training else "eval"
    metrics = trainer._metrics[mode]
    gather = trainer.accelerator.gather_for_metrics
    rc, rr = trainer.beta * chosen.detach(), trainer.beta * rejected.detach()
    metrics["rewards/chosen"].append(gather(rc).mean().item())
    metrics["rewards/rejected"].append(gather(rr).mean().item())
    metrics["rewards/margins"].append(gather(rc - rr).mean().item())
    metrics["rewards/accuracies"].append(gather((rc > rr).float()).mean().item())
    metrics["nll_loss"].append(gather(nll.detach()).mean().item())
    metrics["log_odds_ratio"].append(gather(ratio.detach()).mean().item())
    return loss
