"""Training throughput: our trainer vs a plain transformers Trainer + PEFT script, on SmolLM2-135M.

Both train the same LoRA (rank, alpha, target modules) on the same tokenized examples (prompt-masked, same
sequence limit) in the same order (the same Trainer sampler and seed), so every step sees the same batch;
each runs in its own subprocess so peak resident memory is measured fairly. The held-out loss is taken on
separately generated examples neither contestant trains on. The baseline is the script a user would write: dynamic padding
(DataCollatorForSeq2Seq), random order, LoRA dropout 0.05, float32. Ours is `run_training(plan)` with the
plan `--mode fast` gives on this machine.

Prints, for each: non-padding tokens/s, padding fraction, seconds per optimizer step, peak RSS, held-out
loss after training; then the ratios and one final line:

    speedup=X.XX memory_ratio=Y.YY loss_delta=Z.ZZZ

Usage: python bench/train_throughput.py [--batch-size 4] [--examples 48] [--steps N] [--model-dir DIR]
By default both train exactly one epoch over the same examples (each in its own random order, so the batch
mix differs but the tokens are the same).
(without --model-dir the bundled GGUF is converted once into ~/.cache/llm-installer/bench-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, MAX_LEN, LR = 16, 32, 512, 1e-3

WORDS = (
    "model adapter training data handler token sequence batch memory layer weight gradient loss epoch "
    "install folder server chat answer question learning rate precision attention output head packing "
    "padding example record format template system user assistant value source plan report checkpoint "
    "resume interrupt signal fast medium slow circle progress bar tokens second machine core thread"
).split()


def make_dataset(path: Path, n: int, seed: int = 0) -> None:
    """Alpaca-style records with a realistic spread of prompt and answer lengths (10 to ~300 words)."""
    rnd = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            q_len = int(rnd.lognormvariate(3.3, 0.8)) + 5
            a_len = int(rnd.lognormvariate(3.6, 0.7)) + 5
            q = " ".join(rnd.choice(WORDS) for _ in range(min(q_len, 300)))
            a = " ".join(rnd.choice(WORDS) for _ in range(min(a_len, 300)))
            fh.write(
                json.dumps(
                    {"instruction": f"Task {i}: explain {q}?", "input": "", "output": a.capitalize() + "."}
                )
                + "\n"
            )


def ensure_model(model_dir: str | None) -> Path:
    """An installed-model folder (model/ + model_info.json) for SmolLM2-135M."""
    from llm_installer.install import install_model
    from llm_installer.store import ModelFolder, set_models_dir

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-installer" / "bench-models"
    set_models_dir(cache)
    if model_dir:
        folder = ModelFolder(cache / "bench_smollm2")
        if not folder.is_complete:
            folder = install_model(str(model_dir), name="bench/smollm2", link=True, exist_ok=True)
        return folder.root
    folder = ModelFolder(cache / "smollm2-135m-instruct")
    if not folder.is_complete:
        folder = install_model("smollm2-135m-instruct", exist_ok=True)
    return folder.root


def prepared(folder_root: Path, data: Path, n_val: int):
    """Tokenized examples through the project's data pipeline (identical for both contestants)."""
    from llm_installer.data.prepare import DataSettings, prepare_dataset
    from llm_installer.handlers.registry import get_handler
    from llm_installer.loading import load_tokenizer
    from llm_installer.store import ModelFolder

    folder = ModelFolder(folder_root)
    handler = get_handler(folder.load_info())
    tok = load_tokenizer(folder.model_dir)
    prep = prepare_dataset(
        str(data), tok, handler, DataSettings(max_seq_length=MAX_LEN, validation_split=n_val)
    )
    return tok, prep


def heldout_loss(model, examples) -> float:
    import torch

    from llm_installer.train.collate import PaddedCollator
    from llm_installer.train.loss import causal_lm_loss

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            chunk = examples[i : i + 4]
            batch = PaddedCollator(0)(chunk)
            batch.pop("num_real_tokens")
            n = float((batch["labels"][:, 1:] != -100).sum())
            total += float(causal_lm_loss(model, batch)) * n
            count += n
    return total / count


def bench_plan(args) -> dict:
    """The `--mode fast` plan ours runs with; the baseline takes its training examples from the same plan."""
    from llm_installer.store import ModelFolder
    from llm_installer.train.plan import build_plan

    plan = build_plan(
        ModelFolder(Path(args.folder)),
        {
            "data": args.data,
            "mode": "fast",
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lora_r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": ",".join(TARGETS),
            "max_seq_length": MAX_LEN,
            "learning_rate": LR,
            "validation_split": 0.0,
            "seed": 0,
            "output": str(Path(args.workdir) / "ours-lora"),
            "tensorboard": False,
            "force_epochs": True,
        },
    )
    plan["settings"]["report_prompts"]["value"] = 0
    return plan


def heldout_examples(folder_root: Path, heldout: str) -> list:
    _, prep = prepared(folder_root, Path(heldout), 0)
    return list(prep.train)


def worker_ours(args) -> dict:
    from peft import PeftModel

    from llm_installer.loading import load_model
    from llm_installer.store import ModelFolder
    from llm_installer.train.trainer import run_training

    folder = ModelFolder(Path(args.folder))
    plan = bench_plan(args)
    res = run_training(plan, show_progress=False)
    m = res.metrics
    model = PeftModel.from_pretrained(
        load_model(folder.model_dir, dtype="fp32"), str(plan["settings"]["output"]["value"])
    )
    return {
        "tokens_per_s": m["trained_tokens"] / m["train_seconds"],
        "padding_fraction": m["padding_fraction"],
        "s_per_step": m["train_seconds"] / m["global_step"],
        "steps": m["global_step"],
        "tokens": m["trained_tokens"],
        "heldout_loss": heldout_loss(model, heldout_examples(folder.root, args.heldout)),
    }


def worker_baseline(args) -> dict:
    """The plain script: Trainer + PEFT, DataCollatorForSeq2Seq dynamic padding, random order, fp32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llm_installer.store import ModelFolder
    from llm_installer.train.plan import TrainingPlan
    from llm_installer.train.trainer import load_components, load_tokenizer_for, prepare_data

    folder = ModelFolder(Path(args.folder))
    # the very examples ours trains on, in the same order (same Trainer sampler, same seed)
    plan = TrainingPlan.from_dict(bench_plan(args))
    _, info, handler = load_components(plan)
    tok = load_tokenizer_for(folder, handler, info)
    train = list(prepare_data(plan, tok, handler).train)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder.model_dir), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    counts = {"real": 0, "computed": 0}
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = collator([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        counts["real"] += int(batch["attention_mask"].sum())
        counts["computed"] += int(batch["attention_mask"].numel())
        return batch

    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["t1"] = time.perf_counter()

    targs = TrainingArguments(
        output_dir=str(Path(args.workdir) / "baseline"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=[Clock()]
    )
    trainer.train()
    seconds = times["t1"] - times["t0"]
    return {
        "tokens_per_s": counts["real"] / seconds,
        "padding_fraction": 1 - counts["real"] / counts["computed"],
        "s_per_step": seconds / args.steps,
        "steps": args.steps,
        "tokens": counts["real"],
        "heldout_loss": heldout_loss(model, heldout_examples(folder.root, args.heldout)),
    }


def levers(args) -> None:
    """Ablation: one optimizer step's time for each lever added in turn, on the same batches, in one process.

    Rows: plain padded batch + full head + LoRA dropout 0.05 (the baseline's step), then dropout 0, then
    padding-free packing, then the labels-only head, then the fused LoRA layers. With --cpu-time each
    variant is timed by process CPU time on one thread, which other jobs on a shared machine barely move. Each variant runs `--steps` batches, interleaved, so
    a busy machine slows all of them alike.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from llm_installer.loading import load_model
    from llm_installer.store import ModelFolder
    from llm_installer.train.collate import PaddedCollator, PaddingFreeCollator
    from llm_installer.train.lora_fast import fuse_lora_layers, unfuse_lora_layers
    from llm_installer.train.loss import causal_lm_loss

    folder = ModelFolder(ensure_model(args.model_dir))
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        data = Path(tmp) / "bench.jsonl"
        make_dataset(data, args.examples)
        tok, prep = prepared(folder.root, data, args.val)
    torch.manual_seed(0)
    model = load_model(folder.model_dir, dtype="fp32", attn_implementation="sdpa")
    model = get_peft_model(
        model,
        LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    rnd = random.Random(0)
    batches = [rnd.sample(prep.train, args.batch_size) for _ in range(args.steps)]
    from llm_installer.train.attention import register

    register()
    pad = tok.pad_token_id
    one_row = MAX_LEN * args.batch_size
    variants = [
        ("padded, full head, dropout 0.05", PaddedCollator(pad), False, 0.05, "sdpa", False),
        ("+ LoRA dropout 0", PaddedCollator(pad), False, 0.0, "sdpa", False),
        ("+ packed rows (<=512, masked SDPA)", PaddingFreeCollator(pad, MAX_LEN), False, 0.0, "sdpa", False),
        ("+ one row, per-example SDPA", PaddingFreeCollator(pad, one_row), False, 0.0, "packed_sdpa", False),
        ("+ head on labels only", PaddingFreeCollator(pad, one_row), True, 0.0, "packed_sdpa", False),
        ("+ fused LoRA layers", PaddingFreeCollator(pad, one_row), True, 0.0, "packed_sdpa", True),
    ]
    times = {name: 0.0 for name, *_ in variants}
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
    real = sum(len(e["input_ids"]) for b in batches for e in b)
    base = model.get_base_model()
    for batch in batches:
        for name, collate, head, dropout, attn, fused in variants:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = dropout
            base.set_attn_implementation(attn)
            if fused:
                fuse_lora_layers(model)
            else:
                unfuse_lora_layers(model)
            inputs = collate(batch)
            inputs.pop("num_real_tokens")
            t0 = clock()
            loss = causal_lm_loss(model, inputs, head_on_labels=head)
            loss.backward()
            model.zero_grad(set_to_none=True)
            times[name] += clock() - t0
    first = times[variants[0][0]]
    print(
        f"{args.steps} batches x {args.batch_size} examples, {real} non-padding tokens, {torch.get_num_threads()} threads"
    )
    for name, *_ in variants:
        print(f"{name:34} {real / times[name]:8.1f} tok/s  x{first / times[name]:.2f}")

    # The floor of the last variant: the time its matrix multiplications alone take (profiled, same batches).
    # Everything else (attention, norms, activations, autograd) is overhead; with exact fp32 arithmetic the
    # step cannot run faster than this on this CPU.
    from torch.profiler import ProfilerActivity, profile

    name, collate, head = variants[-1][0], variants[-1][1], variants[-1][2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            inputs = collate(batch)
            inputs.pop("num_real_tokens")
            causal_lm_loss(model, inputs, head_on_labels=head).backward()
            model.zero_grad(set_to_none=True)
    matmul_s = (
        sum(
            e.self_cpu_time_total
            for e in prof.key_averages()
            if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")
        )
        / 1e6
    )
    print(
        f"{'matmuls alone (the fp32 ceiling)':34} {real / matmul_s:8.1f} tok/s  x{first * 1.0 / matmul_s:.2f}"
        f"  ({matmul_s / times[name]:.0%} of the last step's time)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default: one epoch, so both see every example)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--val", type=int, default=8, help="held-out examples for the loss comparison")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--levers", action="store_true", help="time each optimisation in turn instead")
    p.add_argument("--cpu-time", action="store_true", help="with --levers: one thread, process CPU time")
    p.add_argument("--worker", choices=["ours", "baseline"])
    p.add_argument("--folder")
    p.add_argument("--data")
    p.add_argument("--heldout")
    p.add_argument("--workdir")
    args = p.parse_args()
    if args.steps is None:
        args.steps = -(-args.examples // args.batch_size)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        result = worker_ours(args) if args.worker == "ours" else worker_baseline(args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print("RESULT " + json.dumps(result))
        return

    if args.levers:
        levers(args)
        return
    folder = ensure_model(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        data, heldout = Path(tmp) / "bench.jsonl", Path(tmp) / "heldout.jsonl"
        make_dataset(data, args.examples)
        make_dataset(heldout, args.val, seed=1)  # never trained on by either contestant
        results = {}
        for who in ("baseline", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                who,
                "--folder",
                str(folder),
                "--data",
                str(data),
                "--workdir",
                tmp,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--heldout",
                str(heldout),
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO))
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{who} failed (exit {proc.returncode})")
            results[who] = json.loads(line[len("RESULT ") :])
    print(
        f"SmolLM2-135M LoRA r={RANK} alpha={ALPHA} on {len(TARGETS)} projections, max {MAX_LEN} tokens, "
        f"{args.steps} steps x batch {args.batch_size}, {os.cpu_count()} CPU threads"
    )
    print(f"{'':10} {'tok/s':>8} {'tokens':>7} {'padding':>8} {'s/step':>8} {'peak GiB':>9} {'loss':>8}")
    for who, r in results.items():
        print(
            f"{who:10} {r['tokens_per_s']:8.1f} {r['tokens']:7d} {r['padding_fraction']:8.1%} "
            f"{r['s_per_step']:8.2f} {r['peak_rss_gb']:9.2f} {r['heldout_loss']:8.4f}"
        )
    b, o = results["baseline"], results["ours"]
    speedup = o["tokens_per_s"] / b["tokens_per_s"]
    memory = o["peak_rss_gb"] / b["peak_rss_gb"]
    delta = o["heldout_loss"] - b["heldout_loss"]
    print(
        f"ratios: tokens/s x{speedup:.2f}, s/step x{o['s_per_step'] / b['s_per_step']:.2f}, "
        f"peak memory x{memory:.2f}"
    )
    print(f"speedup={speedup:.2f} memory_ratio={memory:.2f} loss_delta={delta:.3f}")


if __name__ == "__main__":
    main()
