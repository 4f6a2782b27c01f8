"""Training throughput: our trainer vs a plain transformers Trainer + PEFT script (and TRL), on SmolLM2-135M.

Every contestant trains the same LoRA (rank, alpha, target modules) on the same tokenized examples
(prompt-masked, same sequence limit) in the same order (the same Trainer sampler and seed), for the same
steps at the same batch size. Each run is its own subprocess (so peak resident memory is that process's
own), and the runs are interleaved: round 1 runs every contestant once, round 2 again in a rotated order,
and so on, so a noisy neighbour slows every contestant alike instead of one of them. The figures are
medians over the rounds with their min..max; ratios are taken within each round, then their median.

Contestants (`--contestants`, default all four; trl only when it is installed):

- `baseline`: the script a user would write: `Trainer` + `get_peft_model`, LoRA dropout 0.05,
  `DataCollatorForSeq2Seq` dynamic padding, random order, float32.
- `ours`: `run_training(plan)` with the `--mode fast` plan, at the precision the plan chooses.
- `ours-fp32`: the same plan with its `precision` setting forced to fp32 (as `--precision fp32` would).
- `trl`: TRL's `SFTTrainer` with `padding_free=True`, gradient checkpointing off, the baseline's
  `LoraConfig`, bf16 autocast where the CPU has native bf16 (AVX512-BF16 or AMX-BF16), else fp32.

Per contestant: non-padding tokens/s and seconds per optimizer step (wall time from the Trainer's
`on_train_begin` to `on_train_end`), CPU seconds per non-padding token (`time.process_time()` of the
training process over the same window: every thread's CPU time, so it barely moves when other jobs take
the cores), peak RSS at the end of training, and the loss on separately generated held-out examples that
no contestant trains on (each adapter loaded onto a fresh float32 base model). Then ratios to the baseline
and to trl, and one final line (ours at the plan's precision against the baseline, medians of the
per-round ratios):

    speedup=X.XX memory_ratio=Y.YY loss_delta=Z.ZZZ

A contestant that fails prints its one-line error in the table; the others go on, and the exit status is
non-zero.

Usage: python bench/train_throughput.py [--rounds 3] [--contestants baseline,ours,ours-fp32,trl]
       [--batch-size 4] [--examples 48] [--val 8] [--steps N] [--model-dir DIR]
By default every contestant trains exactly one epoch over the same examples.
(without --model-dir the bundled GGUF is converted once into ~/.cache/llm-installer/bench-models).
`--levers` times each optimisation in turn instead, in one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, MAX_LEN, LR = 16, 32, 512, 1e-3
CONTESTANTS = ("baseline", "ours", "ours-fp32", "trl")
# the CPU features that decide whether bf16 matmuls are fast (AVX512-BF16, AMX) or emulated
FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
TRL_INSTALL = "pip install 'llm-installer[bench]'  (or: pip install trl)"

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
            "output": str(Path(args.workdir) / f"{args.worker or 'ours'}-lora"),
            "tensorboard": False,
            "force_epochs": True,
        },
    )
    # no before/after answers in the run's report: they are outside the timed window but cost minutes of
    # generation per process. held_out_prompts(..., 0) still returns one prompt, so cap its answer too.
    plan["settings"]["report_prompts"]["value"] = 0
    plan["settings"]["report_max_new_tokens"]["value"] = 1
    return plan


def heldout_examples(folder_root: Path, heldout: str) -> list:
    _, prep = prepared(folder_root, Path(heldout), 0)
    return list(prep.train)


def cpu_description() -> tuple[str, set[str]]:
    """(CPU model name, the flags of /proc/cpuinfo) for the header and the trl precision rule."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def native_bf16(flags: set[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def training_clock(times: dict):
    """A Trainer callback noting wall and process CPU time at the start and the end of training."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["t0"], times["c0"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            times["t1"], times["c1"] = time.perf_counter(), time.process_time()
            # the peak of training (loading included), before the held-out evaluation loads another model
            times["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    return Clock()


def adapter_heldout_loss(folder, adapter_dir: Path, heldout: str) -> float:
    """The held-out loss of a saved adapter on a fresh float32 base model: the same evaluation for everyone."""
    from peft import PeftModel

    from llm_installer.loading import load_model

    model = PeftModel.from_pretrained(load_model(folder.model_dir, dtype="fp32"), str(adapter_dir))
    return heldout_loss(model, heldout_examples(folder.root, heldout))


def timed_result(times: dict, real: int, computed: int, steps: int) -> dict:
    seconds, cpu = times["t1"] - times["t0"], times["c1"] - times["c0"]
    return {
        "tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / computed if computed else 0.0,
        "s_per_step": seconds / steps,
        "cpu_s_per_token": cpu / real,
        "train_s": seconds,
        "cpu_s": cpu,
        "steps": steps,
        "tokens": real,
        "peak_rss_gb": times["rss"],
    }


def worker_ours(args) -> dict:
    from llm_installer.store import ModelFolder
    from llm_installer.train.trainer import run_training

    folder = ModelFolder(Path(args.folder))
    plan = bench_plan(args)
    if args.worker == "ours-fp32":
        plan["settings"]["precision"] = {"value": "fp32", "source": "user", "why": "--precision fp32"}
    precision = plan["settings"]["precision"]["value"]
    times: dict = {}
    res = run_training(plan, show_progress=False, extra_callbacks=[training_clock(times)])
    m = res.metrics
    real = int(m["trained_tokens"])
    computed = round(real / (1 - m["padding_fraction"])) if m["padding_fraction"] < 1 else real
    result = timed_result(times, real, computed, int(m["global_step"]))
    result["precision"] = precision
    result["heldout_loss"] = adapter_heldout_loss(
        folder, Path(plan["settings"]["output"]["value"]), args.heldout
    )
    return result


def baseline_inputs(args):
    """(model folder, tokenizer, training examples): the very examples ours trains on, from the same plan."""
    from llm_installer.store import ModelFolder
    from llm_installer.train.plan import TrainingPlan
    from llm_installer.train.trainer import load_components, load_tokenizer_for, prepare_data

    folder = ModelFolder(Path(args.folder))
    plan = TrainingPlan.from_dict(bench_plan(args))
    _, info, handler = load_components(plan)
    tok = load_tokenizer_for(folder, handler, info)
    train = [
        {"input_ids": list(e["input_ids"]), "labels": list(e["labels"])}
        for e in prepare_data(plan, tok, handler).train
    ]
    return folder, tok, train


def lora_config():
    """The LoRA a user writes: the baseline's and trl's (ours takes rank, alpha and targets from its plan)."""
    from peft import LoraConfig

    return LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def common_training_args(args) -> dict:
    """The Trainer arguments the baseline and trl share: same steps, batch, learning rate, seeds, order."""
    return {
        "output_dir": str(Path(args.workdir) / args.worker),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
    }


def worker_baseline(args) -> dict:
    """The plain script: Trainer + PEFT, DataCollatorForSeq2Seq dynamic padding, random order, fp32."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    folder, tok, train = baseline_inputs(args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder.model_dir), dtype=torch.float32)
    model = get_peft_model(model, lora_config())
    counts = {"real": 0, "computed": 0}
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["computed"] += int(batch["attention_mask"].numel())
        return batch

    times: dict = {}
    targs = TrainingArguments(**common_training_args(args), remove_unused_columns=False)
    trainer = Trainer(
        model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=[training_clock(times)]
    )
    trainer.train()
    result = timed_result(times, counts["real"], counts["computed"], args.steps)
    adapter = Path(args.workdir) / "baseline-lora"
    model.save_pretrained(str(adapter))
    result["precision"] = "fp32"
    result["heldout_loss"] = adapter_heldout_loss(folder, adapter, args.heldout)
    return result


def worker_trl(args) -> dict:
    """TRL's SFTTrainer, configured as its best measured peer: padding_free=True, no gradient checkpointing,
    bf16 where the CPU has native bf16; the baseline's LoraConfig, examples, steps, batch and seeds."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    folder, tok, train = baseline_inputs(args)
    bf16 = args.trl_precision == "bf16" or (
        args.trl_precision == "auto" and native_bf16(cpu_description()[1])
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder.model_dir), dtype=torch.float32)
    config = SFTConfig(
        **common_training_args(args),
        padding_free=True,
        max_length=None,  # padding_free without packing refuses a max_length; the examples are cut at 512
        gradient_checkpointing=False,
        bf16=bf16,
    )
    times: dict = {}
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train),
        processing_class=tok,
        peft_config=lora_config(),
        callbacks=[training_clock(times)],
    )
    counts = {"real": 0, "computed": 0}
    inner = trainer.data_collator  # TRL's own padding-free collator (a custom one is refused)

    def collate(features):
        batch = inner(features)
        counts["real"] += sum(len(f["input_ids"]) for f in features)
        counts["computed"] += int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = collate
    trainer.train()
    result = timed_result(times, counts["real"], counts["computed"], args.steps)
    adapter = Path(args.workdir) / "trl-lora"
    trainer.model.save_pretrained(str(adapter))
    result["precision"] = "bf16" if bf16 else "fp32"
    result["heldout_loss"] = adapter_heldout_loss(folder, adapter, args.heldout)
    return result


WORKERS = {"baseline": worker_baseline, "ours": worker_ours, "ours-fp32": worker_ours, "trl": worker_trl}


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


def run_worker(who: str, args, folder: Path, data: Path, heldout: Path, workdir: Path) -> dict:
    """One contestant in its own process: its RESULT, or {"error": its one-line error}."""
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
        str(workdir),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--heldout",
        str(heldout),
        "--trl-precision",
        args.trl_precision,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {
        "process_s": wall,
        "process_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    }
    lines = proc.stdout.splitlines()
    line = next((ln for ln in lines if ln.startswith("RESULT ")), None)
    if proc.returncode == 0 and line is not None:
        return {**out, **json.loads(line[len("RESULT ") :])}
    error = next((ln[len("ERROR ") :] for ln in lines if ln.startswith("ERROR ")), None)
    if error is None:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        error = tail[-1].strip() if tail else f"exit {proc.returncode} without output"
    return {**out, "error": error, "log": proc.stderr[-3000:]}


def spread(values: list[float], spec: str) -> str:
    """'median [min..max]' of the values."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, spec)
    return f"{med:{spec}} [{min(values):{spec}}..{max(values):{spec}}]"


FIGURES = (  # (result key, column title, format, width)
    ("tokens_per_s", "tok/s", ".1f", 20),
    ("s_per_step", "s/step", ".2f", 20),
    ("cpu_s_per_token", "CPU s/token", ".4f", 26),
    ("peak_rss_gb", "peak GiB", ".2f", 20),
    ("heldout_loss", "held-out loss", ".4f", 26),
)


def print_table(contestants: list[str], runs: dict[str, list[dict]]) -> None:
    print(
        f"{'':10} {'prec':>5} {'tokens':>7} {'padding':>8} " + " ".join(f"{t:>{w}}" for _, t, _, w in FIGURES)
    )
    for who in contestants:
        ok = [r for r in runs[who] if "error" not in r]
        errors = [r["error"] for r in runs[who] if "error" in r]
        if ok:
            prec = "/".join(sorted({str(r.get("precision")) for r in ok}))
            cells = " ".join(f"{spread([r[k] for r in ok], f):>{w}}" for k, _, f, w in FIGURES)
            tokens = int(statistics.median(r["tokens"] for r in ok))
            padding = statistics.median(r["padding_fraction"] for r in ok)
            print(f"{who:10} {prec:>5} {tokens:7d} {padding:8.1%} {cells}")
        if errors:
            print(f"{who:10} FAILED in {len(errors)} of {len(runs[who])} round(s): {errors[0]}")


def paired(runs: dict[str, list[dict]], who: str, ref: str, key: str, op) -> list[float]:
    """Per-round op(who, ref) of one figure, for the rounds where both ran."""
    return [
        op(a[key], b[key])
        for a, b in zip(runs[who], runs[ref], strict=True)
        if "error" not in a and "error" not in b
    ]


def ratio_line(runs: dict[str, list[dict]], who: str, ref: str) -> str | None:
    def div(a, b):
        return a / b

    def sub(a, b):
        return a - b

    speed = paired(runs, who, ref, "tokens_per_s", div)
    if not speed:
        return None
    return (
        f"{who} / {ref}: tokens/s x{spread(speed, '.2f')}, "
        f"s/step x{spread(paired(runs, who, ref, 's_per_step', div), '.2f')}, "
        f"CPU s/token x{spread(paired(runs, who, ref, 'cpu_s_per_token', div), '.2f')}, "
        f"peak memory x{spread(paired(runs, who, ref, 'peak_rss_gb', div), '.2f')}, "
        f"loss {spread(paired(runs, who, ref, 'heldout_loss', sub), '+.3f')}  ({len(speed)} round(s))"
    )


def print_header(args, contestants: list[str]) -> None:
    import torch

    model, flags = cpu_description()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for name in ("torch", "transformers", "peft", "accelerate", "trl"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:
            versions.append(f"{name} -")
    print(
        f"CPU: {model}; {os.cpu_count()} logical CPUs ({affinity} usable); torch threads {torch.get_num_threads()}"
    )
    print("CPU flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS))
    print(", ".join(versions))
    print(
        f"SmolLM2-135M LoRA r={RANK} alpha={ALPHA} on {len(TARGETS)} projections, max {MAX_LEN} tokens, "
        f"{args.examples} examples, {args.steps} steps x batch {args.batch_size}, {args.rounds} round(s) of "
        f"{', '.join(contestants)} (each in its own process, order rotated per round); "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default: one epoch, so every contestant sees every example)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--examples", type=int, default=48, help="training examples to generate")
    p.add_argument("--val", type=int, default=8, help="held-out examples for the loss comparison")
    p.add_argument("--model-dir", default=None)
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (each contestant once per round)"
    )
    p.add_argument(
        "--contestants",
        default=None,
        help=f"comma-separated, from {','.join(CONTESTANTS)} (default: all; trl only when installed)",
    )
    p.add_argument(
        "--trl-precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="trl's precision (auto: bf16 where the CPU has AVX512-BF16 or AMX-BF16)",
    )
    p.add_argument("--levers", action="store_true", help="time each optimisation in turn instead")
    p.add_argument("--cpu-time", action="store_true", help="with --levers: one thread, process CPU time")
    p.add_argument("--worker", choices=list(WORKERS))
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
        try:
            result = WORKERS[args.worker](args)
        except BaseException as exc:
            import traceback

            traceback.print_exc()
            message = " ".join(str(exc).split())[:300]
            print(f"ERROR {type(exc).__name__}: {message}", flush=True)
            raise SystemExit(1) from None
        result["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(result))
        return

    if args.levers:
        levers(args)
        return

    if args.contestants:
        contestants = [c.strip() for c in args.contestants.split(",") if c.strip()]
        unknown = [c for c in contestants if c not in CONTESTANTS]
        if unknown or not contestants:
            p.error(
                f"--contestants: unknown {', '.join(unknown) or '(none)'}; choose from {','.join(CONTESTANTS)}"
            )
    else:
        contestants = list(CONTESTANTS)
        if importlib.util.find_spec("trl") is None:
            contestants.remove("trl")
            print(f"trl is not installed: its SFTTrainer is left out ({TRL_INSTALL})")
    if "baseline" not in contestants:
        p.error("--contestants must include baseline (every ratio is to it)")
    has_trl = importlib.util.find_spec("trl") is not None

    print_header(args, contestants)
    folder = ensure_model(args.model_dir)
    runs: dict[str, list[dict]] = {who: [] for who in contestants}
    shown_logs: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        data, heldout = Path(tmp) / "bench.jsonl", Path(tmp) / "heldout.jsonl"
        make_dataset(data, args.examples)
        make_dataset(heldout, args.val, seed=1)  # never trained on by any contestant
        for rnd in range(args.rounds):
            shift = rnd % len(contestants)
            for who in contestants[shift:] + contestants[:shift]:
                if who == "trl" and not has_trl:
                    r = {"error": f"trl is not installed ({TRL_INSTALL})"}
                else:
                    workdir = Path(tmp) / f"round{rnd + 1}"
                    workdir.mkdir(exist_ok=True)
                    r = run_worker(who, args, folder, data, heldout, workdir)
                runs[who].append(r)
                head = f"round {rnd + 1}/{args.rounds} {who:9}"
                if "error" in r:
                    print(f"{head} FAILED: {r['error']}", flush=True)
                    if who not in shown_logs and r.get("log"):
                        shown_logs.add(who)
                        print(f"--- {who}'s stderr (last lines) ---\n{r['log']}\n---", file=sys.stderr)
                else:
                    print(
                        f"{head} {r['precision']:>4} {r['tokens_per_s']:7.1f} tok/s {r['s_per_step']:6.2f} s/step "
                        f"{r['cpu_s_per_token']:.4f} CPU s/token {r['peak_rss_gb']:5.2f} GiB loss "
                        f"{r['heldout_loss']:.4f}  (process {r['process_s']:.0f} s, {r['process_cpu_s']:.0f} CPU s; "
                        f"load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )

    print(f"\nmedian [min..max] over {args.rounds} round(s):")
    print_table(contestants, runs)
    for who in contestants:
        if who != "baseline":
            line = ratio_line(runs, who, "baseline")
            print(line or f"{who} / baseline: no round where both ran")
    if "trl" in contestants:
        for who in ("ours", "ours-fp32"):
            if who in contestants:
                line = ratio_line(runs, who, "trl")
                print(line or f"{who} / trl: no round where both ran")

    if "ours" in contestants:

        def med(values: list[float]) -> float:
            return statistics.median(values) if values else float("nan")

        speedup = med(paired(runs, "ours", "baseline", "tokens_per_s", lambda a, b: a / b))
        memory = med(paired(runs, "ours", "baseline", "peak_rss_gb", lambda a, b: a / b))
        delta = med(paired(runs, "ours", "baseline", "heldout_loss", lambda a, b: a - b))
        print(f"speedup={speedup:.2f} memory_ratio={memory:.2f} loss_delta={delta:.3f}")
    failed = sum("error" in r for rs in runs.values() for r in rs)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
