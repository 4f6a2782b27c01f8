"""DPO steps/s and peak memory: `train --method dpo` against TRL's DPOTrainer written as a user would.

Same model (the bundled SmolLM2-135M), same pairs (the bundled preferences.jsonl), same LoRA (rank 16,
alpha 32, the 7 projections), same batch, steps and learning rate, float32 on both sides. TRL's side is
a plain script: `DPOTrainer(model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok,
peft_config=LoraConfig(...))` with TRL's defaults otherwise (its gradient checkpointing included; pass
`--trl-no-checkpointing` to switch it off). Each run is its own subprocess (peak RSS is that run's);
rounds are interleaved (ours, trl, ours, trl, ...) and medians reported, because a shared machine's speed
drifts. The last line is `speedup=X.XX memory_ratio=Y.YY` (ours over trl: speed higher is better,
memory lower is better).

    python bench/dpo_throughput.py --rounds 3 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.train_throughput import cpu_description, ensure_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 5e-5


def clock(times: dict):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:  # the first step warms allocators and caches: timed from here
                times["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["t1"] = time.perf_counter()
            times["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    return Clock()


def worker_ours(args) -> dict:
    from llm_installer.store import ModelFolder, set_models_dir
    from llm_installer.train.plan import build_plan
    from llm_installer.train.trainer import run_training

    folder = ModelFolder(Path(args.folder))
    set_models_dir(folder.root.parent)
    flags = {
        "data": "preferences.jsonl",
        "method": "dpo",
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": LR,
        "lora_r": 16,
        "lora_alpha": 32,
        "target_modules": ",".join(TARGETS),
        "validation_split": 0,
        "precision": "fp32",
        "tensorboard": False,
        "output": str(Path(args.workdir) / "ours-lora"),
    }
    times: dict = {}
    run_training(build_plan(folder, flags), show_progress=False, extra_callbacks=[clock(times)])
    return {"s_per_step": (times["t1"] - times["t0"]) / (args.steps - 1), "peak_rss_gb": times["rss"]}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = Path(args.folder) / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in (REPO / "llm_installer/examples/preferences.jsonl").open()]
    pairs = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=LR,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **({"gradient_checkpointing": False} if args.trl_no_checkpointing else {}),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    times: dict = {}
    trainer = DPOTrainer(
        model,
        args=config,
        train_dataset=pairs,
        processing_class=tok,
        peft_config=lora,
        callbacks=[clock(times)],
    )
    trainer.train()
    return {"s_per_step": (times["t1"] - times["t0"]) / (args.steps - 1), "peak_rss_gb": times["rss"]}


def run_worker(who: str, args, folder: Path, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", who, "--folder", str(folder), "--workdir", str(workdir)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    if args.trl_no_checkpointing:
        cmd.append("--trl-no-checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise SystemExit(f"{who} failed: {tail[-1] if tail else proc.returncode}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model-dir", default=None, help="a SmolLM2 folder to install (default: the bundled one)")
    p.add_argument(
        "--trl-no-checkpointing", action="store_true", help="switch TRL's default checkpointing off"
    )
    p.add_argument("--worker", choices=["ours", "trl"])
    p.add_argument("--folder")
    p.add_argument("--workdir")
    args = p.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed)")
    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_trl)(args)
        print("RESULT " + json.dumps(result))
        return
    import tempfile

    folder = ensure_model(args.model_dir)
    cpu, _ = cpu_description()
    print(
        f"machine: {cpu}, {os.cpu_count()} CPUs; {args.rounds} interleaved rounds of {args.steps} steps, batch {args.batch_size}"
    )
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for who in ("ours", "trl"):
                res = run_worker(who, args, folder, Path(tmp) / f"{who}-{r}")
                runs[who].append(res)
                print(
                    f"round {r + 1} {who}: {1 / res['s_per_step']:.3f} steps/s, peak {res['peak_rss_gb']:.2f} GiB",
                    flush=True,
                )
    med = {
        w: {k: statistics.median(x[k] for x in v) for k in ("s_per_step", "peak_rss_gb")}
        for w, v in runs.items()
    }
    for who, m in med.items():
        print(f"median {who}: {1 / m['s_per_step']:.3f} steps/s, peak {m['peak_rss_gb']:.2f} GiB")
    speedup = med["trl"]["s_per_step"] / med["ours"]["s_per_step"]
    print(f"speedup={speedup:.2f} memory_ratio={med['ours']['peak_rss_gb'] / med['trl']['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
