"""Benchmark: preparing 20,000 mixed-format records for SmolLM2's tokenizer.

Compares `prepare_dataset` (end to end: reading the files, detection, validation, rendering, masking,
tokenization, splitting, writing the cache) with a naive loop over already-loaded records that does what
most fine-tuning scripts do: `apply_chat_template` per record, tokenize it, and find each answer's start by
rendering and tokenizing every prefix with `add_generation_prompt=True`. Then runs `prepare_dataset`
again with the same cache folder.

    python3 bench/data_prep.py [--records 20000]

The last line is `speedup=X.XX cached_fraction=Y.YY` (naive time / ours; cached run / first run).

Measured 2026-11-25 on this project's 2-core machine while four other engineers' jobs ran (load average
about 7.8, so absolute times are inflated and noisy; the ratios are what matter), 20,000 records in 8 files
(alpaca, sharegpt multi-turn, openai with system, qa, multi_choice, code_instruct, completion, text):

    naive per-record loop:          93.75 s        213 records/s
    prepare_dataset, first run:     14.41 s       1388 records/s  (load+render+mask+cache)
    prepare_dataset, cached run:     0.84 s      23858 records/s
    stages on 4000 chat records: shape rendering 10.2x per-record jinja, batch tokenization 2.4x per-record calls
    speedup=6.51 cached_fraction=0.06

(An earlier run at the same load, before the detection/labels/GC changes below: speedup=3.80.)
What each step gained:
- one chat-template render per conversation shape + string joins instead of a jinja render per record:
  ~10x on rendering; and the answer positions come for free, so the naive loop's prefix re-renders and
  re-tokenizations (2 per answer) disappear entirely — the largest single gain;
- one backend `encode_batch` (with offsets) per 2,000 records instead of per-record tokenizer calls: ~2x on
  tokenization, which is now about half of our first-run time;
- labels from character spans with `bisect` on token offsets instead of numpy masks per record: 0.58 s ->
  0.14 s per 4,000 records; format detection memoised per key set: 1.05 s -> 0.11 s per 4,000;
- pausing the cyclic garbage collector while millions of small lists are built: 8.4 s -> 7.8 s on 8,000 records (~7%);
- the cache (`<cache_dir>/data-<fingerprint>.npz`: flat int32 arrays + offsets): the second run only
  hashes the data files and tokenizer and loads the arrays: 0.06 of the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = (
    "the model learns to answer questions about rivers mountains cities and history while keeping its "
    "replies short clear and polite so that people can trust what it says every single day"
).split()


def sentence(rng: random.Random, lo: int = 4, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_rows(n: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    files: dict[str, list] = {
        k: [] for k in ("alpaca", "sharegpt", "openai", "qa", "mc", "code", "completion", "text")
    }
    kinds = list(files)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        s = lambda lo=4, hi=30, i=i: sentence(rng, lo, hi) + f" ({i})"  # noqa: E731 - unique records
        if kind == "alpaca":
            files[kind].append({"instruction": s(), "input": rng.choice(["", s()]), "output": s(10, 60)})
        elif kind == "sharegpt":
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns += [{"from": "human", "value": s()}, {"from": "gpt", "value": s(10, 50)}]
            files[kind].append({"conversations": turns})
        elif kind == "openai":
            files[kind].append({"messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": s()}, {"role": "assistant", "content": s(10, 50)},
            ]})  # fmt: skip
        elif kind == "qa":
            files[kind].append({"question": s(), "answer": s(), "context": rng.choice([None, s(20, 60)])})
        elif kind == "mc":
            files[kind].append(
                {"question": s(), "choices": [s(2, 5) for _ in range(4)], "answer": rng.randint(0, 3)}
            )
        elif kind == "code":
            files[kind].append(
                {"instruction": s(), "code": "def f(x):\n    return x * 2\n", "language": "python"}
            )
        elif kind == "completion":
            files[kind].append({"prompt": s(), "completion": " " + s()})
        else:
            files[kind].append({"text": s(20, 80)})
    return files


def naive(records, tok) -> float:
    """The common per-record loop: render, tokenize, and find answers by rendering every prefix."""
    start = time.perf_counter()
    for r in records:
        if r.text is not None:
            ids = tok(r.text)["input_ids"] + [tok.eos_token_id]
            labels = list(ids)
            continue
        msgs = r.messages
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
            upto = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
            a = len(tok(prefix, add_special_tokens=False)["input_ids"])
            b = len(tok(upto, add_special_tokens=False)["input_ids"])
            labels[a:b] = ids[a:b]
    return time.perf_counter() - start


def load_tokenizer():
    from transformers import AutoTokenizer

    from llm_installer.data.inspect import bundled_tokenizer

    tok = bundled_tokenizer()  # SmolLM2's tokenizer from the bundled GGUF (cached after the first use)
    return AutoTokenizer.from_pretrained(tok.name_or_path) if not hasattr(tok, "backend_tokenizer") else tok


def stage_timings(records, tok) -> dict[str, float]:
    """Rendering and tokenizing alone, per-record vs ours, on the same records."""
    from llm_installer.data.render import Renderer

    chat = [r for r in records if r.messages is not None and r.format != "completion"][:4000]
    t = time.perf_counter()
    texts = [tok.apply_chat_template(r.messages, tokenize=False) for r in chat]
    jinja = time.perf_counter() - t
    renderer = Renderer(tok)
    t = time.perf_counter()
    rendered = [renderer.render(r) for r in chat]
    shapes = time.perf_counter() - t
    assert [x.text for x in rendered] == texts
    t = time.perf_counter()
    for x in texts:
        tok(x, add_special_tokens=False, return_offsets_mapping=True)
    per_record_tok = time.perf_counter() - t
    t = time.perf_counter()
    renderer.encode(rendered)
    batch_tok = time.perf_counter() - t
    return {"render_gain": jinja / shapes, "tokenize_gain": per_record_tok / batch_tok, "n": len(chat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()

    from llm_installer.data.load import load_records
    from llm_installer.data.prepare import DataSettings, prepare_dataset

    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, rows in make_rows(args.records).items():
            with (
                (root / "data" / f"{name}.jsonl").open("w")
                if (root / "data").is_dir()
                else _mk(root, name) as f
            ):
                f.writelines(json.dumps(r) + "\n" for r in rows)
        settings = DataSettings(max_seq_length=1024, validation_split=0.05, cache_dir=str(root / "cache"))

        t = time.perf_counter()
        first = prepare_dataset(str(root / "data"), tok, None, settings)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        second = prepare_dataset(str(root / "data"), tok, None, settings)
        cached = time.perf_counter() - t
        assert second.stats["cached"] and second.train == first.train

        records = load_records(str(root / "data")).records
        base = naive(records, tok)
        stages = stage_timings(records, tok)

    n = args.records
    used = first.stats["records_used"]
    print(f"records: {n} ({used} used, {first.stats['rejects']} rejected), formats: {first.stats['formats']}")
    print(f"naive per-record loop:        {base:7.2f} s  {n / base:9.0f} records/s")
    print(f"prepare_dataset, first run:   {ours:7.2f} s  {n / ours:9.0f} records/s  (load+render+mask+cache)")
    print(f"prepare_dataset, cached run:  {cached:7.2f} s  {n / cached:9.0f} records/s")
    print(
        f"stages on {stages['n']} chat records: shape rendering {stages['render_gain']:.1f}x per-record jinja, "
        f"batch tokenization {stages['tokenize_gain']:.1f}x per-record calls"
    )
    print(f"speedup={base / ours:.2f} cached_fraction={cached / ours:.2f}")


def _mk(root: Path, name: str):
    (root / "data").mkdir(parents=True, exist_ok=True)
    return (root / "data" / f"{name}.jsonl").open("w")


if __name__ == "__main__":
    main()
