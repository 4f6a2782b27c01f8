"""`prepare_dataset`: the whole data pipeline the trainer calls once.

spec -> load (detect, validate, convert) -> handler format check -> drop duplicates -> shuffle / limit /
split (deterministic with the seed) -> render through the chat template with the loss mask -> batch
tokenize -> truncate (never silently: records whose answers would be cut away entirely are dropped and
reported) -> cache. The result is plain Python lists so the trainer, a future DPO trainer or a web UI can
use it without this module knowing about them.

The cache file is `<cache_dir>/<fingerprint>.npz`; the fingerprint hashes the data files' bytes, the
tokenizer (vocabulary, specials, chat template), the handler's data-related parameters and the settings,
so any change re-prepares and nothing stale is ever reused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from llm_installer.chat_format import handler_chat_format
from llm_installer.data.load import load_records
from llm_installer.data.loaders import resolve_spec, source_fingerprint
from llm_installer.data.records import LoadResult, Record, RecordError, Reject
from llm_installer.data.render import IGNORE_INDEX, Renderer
from llm_installer.errors import DataError, UserError

CACHE_VERSION = "1"
CHUNK = 2000


@dataclass
class DataSettings:
    """Every setting that changes the prepared data (all JSON-serialisable; part of the fingerprint except
    `cache_dir` and `rejects_path`, which only say where files go)."""

    format: str | None = None
    max_seq_length: int = 2048
    max_examples: int | None = None
    validation_split: float = 0.0  # a fraction (0-1) or a count (>= 1)
    seed: int = 42
    shuffle: bool = True
    train_on_inputs: bool = False
    strict: bool = False
    system_prompt: str | None = None
    cache_dir: str | None = None
    rejects_path: str | None = None
    dedup: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    stats: dict[str, Any]
    fingerprint: str
    rejects_path: Path | None = None
    settings: DataSettings = field(default_factory=DataSettings)


# ---- handler and tokenizer facts --------------------------------------------------------------------


def handler_data_params(handler: Any, params: Any = None) -> dict[str, Any]:
    """The handler's data-related parameters: the ones the plan recorded (`params`), else the handler's
    own validated ones (`BaseHandler.training_params()`, asked once per handler)."""
    if params is not None:
        return params.to_dict() if hasattr(params, "to_dict") else dict(params)
    if handler is None:
        return {}
    from llm_installer.handlers.params import handler_params

    try:
        asked = handler.training_params() if hasattr(handler, "training_params") else handler_params(handler)
        return asked.to_dict()
    except DataError:
        raise
    except UserError as exc:  # the validation's one line already names the handler and the key
        raise DataError(str(exc)) from None
    except Exception as exc:  # a broken user handler should name itself, not crash the data step
        raise DataError(f"handler {getattr(handler, 'name', type(handler).__name__)} failed: {exc}") from None


def split_processor(tokenizer: Any) -> tuple[Any, Any]:
    """(text tokenizer, processor or None): a vision-language processor may be passed as the tokenizer."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and (hasattr(tokenizer, "image_processor") or hasattr(tokenizer, "video_processor")):
        return inner, tokenizer
    return tokenizer, None


def tokenizer_fingerprint(tokenizer: Any, template: str | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([getattr(tokenizer, "all_special_tokens", []), template or ""], default=str).encode())
    return h.hexdigest()


def make_truncate(tokenizer: Any):
    """truncate(text, n): the text cut after its n-th token (used by medical_qa's max_context_length)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def truncate(text: str, n: int) -> str:
        if backend is not None:
            enc = backend.encode(text, add_special_tokens=False)
            return text if len(enc.ids) <= n else text[: enc.offsets[n - 1][1]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else tokenizer.decode(ids[:n])

    return truncate


def check_formats(result: LoadResult, supported: list[str] | None, handler: Any) -> None:
    """Data in formats the handler does not list: one error naming them and what it does support."""
    if not supported:
        return
    bad = {f: n for f, n in result.formats.items() if f not in supported}
    if bad:
        name = getattr(handler, "name", type(handler).__name__)
        found = ", ".join(f"{f} ({n} record{'s' if n != 1 else ''})" for f, n in sorted(bad.items()))
        raise DataError(
            f"the model's handler '{name}' does not support dataset format {found}; it supports: "
            f"{', '.join(supported)} (convert the data or use another model)"
        )


# ---- splitting ----------------------------------------------------------------------------------


def split_records(records: list[Record], settings: DataSettings) -> tuple[list[Record], list[Record]]:
    """Shuffle, limit and split deterministically from `settings.seed`."""
    order = list(range(len(records)))
    seed = 42 if settings.seed is None else settings.seed  # never an unseeded (irreproducible) split
    rng = random.Random(seed)
    if settings.shuffle:
        rng.shuffle(order)
    if settings.max_examples is not None:
        if settings.max_examples < 1:
            raise DataError(f"--max-examples {settings.max_examples}: must be at least 1")
        order = order[: settings.max_examples]
    vs = settings.validation_split or 0
    if vs < 0 or (vs >= 1 and vs != int(vs)):
        raise DataError(
            f"--validation-split {vs}: give a fraction between 0 and 1 or a whole count of records"
        )
    n_val = int(vs) if vs >= 1 else int(round(len(order) * vs))
    if vs and n_val == 0 and len(order) > 1:
        n_val = 1
    if n_val >= len(order) and vs:
        raise DataError(
            f"--validation-split {vs}: leaves no training records out of {len(order)}; use a smaller split"
        )
    if settings.shuffle:
        val_idx = order[:n_val]
        train_idx = order[n_val:]
    else:
        chosen = set(random.Random(seed).sample(order, n_val)) if n_val else set()
        val_idx = [i for i in order if i in chosen]
        train_idx = [i for i in order if i not in chosen]
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


# ---- rendering ----------------------------------------------------------------------------------


def _progress(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llm_installer.console import err_console

    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=total < CHUNK,
    )
    return progress


def encode_records(
    records: list[Record],
    renderer: Renderer,
    max_seq_length: int,
    stats: dict[str, Any],
    rejects: list[Reject],
    label: str = "tokenizing",
    processor: Any = None,
) -> list[dict[str, Any]]:
    """Render + tokenize + truncate; records that cannot be used become rejects with reasons."""
    out: list[dict[str, Any]] = []
    with _progress(len(records), label) as progress:
        task = progress.add_task(label, total=len(records))
        for start in range(0, len(records), CHUNK):
            chunk = records[start : start + CHUNK]
            rendered, kept = [], []
            for record in chunk:
                try:
                    r = renderer.render(record)
                    rendered.append(r)
                    kept.append(record)
                except RecordError as exc:
                    rejects.append(Reject(record.origin, f"{record.format}: {exc}", record.to_dict()))
            for record, rend, example in zip(kept, rendered, renderer.encode(rendered), strict=True):
                answer_starts = example.pop("answer_token_starts")
                n = len(example["input_ids"])
                if processor is not None and (record.images or record.videos):
                    from llm_installer.data.media import attach_media

                    try:
                        spans = None if rend.raw else rend.spans
                        out.append(attach_media(example, record, processor, rend.text, max_seq_length, spans))
                    except RecordError as exc:
                        rejects.append(Reject(record.origin, f"{record.format}: {exc}", record.to_dict()))
                    continue
                if n > max_seq_length:
                    labels = example["labels"][:max_seq_length]
                    if all(x == IGNORE_INDEX for x in labels):
                        rejects.append(
                            Reject(
                                record.origin,
                                f"{record.format}: {n} tokens, longer than max_seq_length={max_seq_length} and "
                                "truncating would cut away every answer (raise --max-seq-length or shorten it)",
                                record.to_dict(),
                            )
                        )
                        stats["dropped_too_long"] += 1
                        continue
                    example["input_ids"] = example["input_ids"][:max_seq_length]
                    example["labels"] = labels
                    stats["truncated"] += 1
                    stats["answers_cut"] += sum(1 for a in answer_starts if a >= max_seq_length)
                out.append(example)
            progress.advance(task, len(chunk))
    return out


def _length_stats(examples: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    if not examples:
        return {"count": 0}
    lengths = np.array([len(e["input_ids"]) for e in examples])
    trained = sum(len(e["labels"]) - e["labels"].count(IGNORE_INDEX) for e in examples)
    return {
        "count": int(len(lengths)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "total": int(lengths.sum()),
        "trained": int(trained),
    }


# ---- cache ---------------------------------------------------------------------------------------


def _pack(examples: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e["input_ids"] for e in examples), dtype=np.int32, count=total)
    labels = np.fromiter(chain.from_iterable(e["labels"] for e in examples), dtype=np.int32, count=total)
    return {"lengths": lengths, "ids": ids, "labels": labels}


def _unpack(lengths, ids, labels) -> list[dict[str, Any]]:
    import numpy as np

    cuts = np.cumsum(lengths)[:-1]
    return (
        [
            {"input_ids": i, "labels": lab}
            for i, lab in zip(
                (a.tolist() for a in np.split(ids, cuts)),
                (a.tolist() for a in np.split(labels, cuts)),
                strict=True,
            )
        ]
        if len(lengths)
        else []
    )


def save_cache(path: Path, data: PreparedData, rejects: list[Reject]) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    train, val = _pack(data.train), _pack(data.validation)
    meta = json.dumps({"stats": data.stats, "rejects": [r.to_json() for r in rejects]})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(
            f,
            meta=np.array(meta),
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
        )
    os.replace(tmp, path)


def load_cache(path: Path) -> tuple[list, list, dict[str, Any], list[str]] | None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            train = _unpack(z["train_lengths"], z["train_ids"], z["train_labels"])
            val = _unpack(z["val_lengths"], z["val_ids"], z["val_labels"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # unreadable cache: prepare again
    return train, val, meta["stats"], meta["rejects"]


def write_rejects(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


# ---- the pipeline --------------------------------------------------------------------------------


def _say_skipped(count: int, written: Path | None) -> None:
    if count:
        from llm_installer.console import err_console

        where = f"; see {written}" if written else ""
        err_console.print(f"[yellow]skipped {count} bad record(s){where}[/yellow]", soft_wrap=True)


def prepare_dataset(
    spec: str | os.PathLike, tokenizer: Any, handler: Any, settings: DataSettings, *, params: Any = None
) -> PreparedData:
    """Load, validate, render, mask, split and cache `spec` for `tokenizer` (a tokenizer or, for
    vision-language models, the model's processor) and `handler` (None = tokenizer's template, every
    format allowed). `params`: the handler parameters the training plan recorded (HandlerParams or its
    dict) — formats, preprocessing hints, special tokens; None = the handler's own."""
    # Millions of small lists and dicts are created and all kept: the cyclic garbage collector would
    # rescan them again and again for nothing (about 7% of the run time measured), so pause it meanwhile.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _prepare(spec, tokenizer, handler, settings, params)
    finally:
        if enabled:
            gc.enable()


@dataclass
class _ModelFacts:
    """What the data step needs from the model: its tokenizer (and processor), chat format and the
    handler's data parameters (formats, preprocessing hints, media placeholders)."""

    text_tok: Any
    processor: Any
    chat_format: Any
    handler_name: str | None
    supported: list[str] | None
    preprocessing: dict[str, Any]
    special: dict[str, Any]
    image_token: str | None
    video_token: str | None


def _model_facts(tokenizer: Any, handler: Any, hparams: Any) -> _ModelFacts:
    text_tok, processor = split_processor(tokenizer)
    params = handler_data_params(handler, hparams)
    if handler is not None and hasattr(handler, "apply_tokenizer_config"):
        handler.apply_tokenizer_config(text_tok)
    special = dict(params.get("special_tokens") or {})
    # The placeholder the processor expands is the one it names itself (Gemma 3's is <start_of_image>, not
    # the <image_soft_token> it expands it into); the handler's is for a processor that names none.
    return _ModelFacts(
        text_tok=text_tok,
        processor=processor,
        # the model's one chat format: the template, and the end-of-turn token trained after each answer
        chat_format=handler_chat_format(handler, text_tok),
        handler_name=getattr(handler, "name", None),
        supported=list(params.get("dataset_formats") or []) or None,
        preprocessing=dict(params.get("dataset_preprocessing") or {}),
        special=special,
        image_token=getattr(processor, "image_token", None) or special.get("image_token"),
        video_token=getattr(processor, "video_token", None) or special.get("video_token"),
    )


def _fingerprint(sources: list[Any], facts: _ModelFacts, settings: DataSettings) -> str:
    """The cache key: data bytes, tokenizer and template, the handler's data parameters, the settings."""
    settings_key = {k: v for k, v in settings.to_dict().items() if k not in ("cache_dir", "rejects_path")}
    payload = {
        "v": CACHE_VERSION,
        "sources": [source_fingerprint(s) for s in sources],
        "tokenizer": tokenizer_fingerprint(facts.text_tok, facts.chat_format.template),
        "end_of_turn": facts.chat_format.end_of_turn,
        "handler": [facts.handler_name, facts.supported, facts.preprocessing, facts.special],
        "settings": settings_key,
        "processor": facts.processor is not None,
    }
    fp = hashlib.blake2b(digest_size=16)
    fp.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return fp.hexdigest()


def _cached(cache_path: Path | None, rejects_path: Path | None, fingerprint: str, settings: DataSettings):
    """The prepared data from the cache (its rejects written again), or None."""
    if cache_path is None or not cache_path.is_file():
        return None
    cached = load_cache(cache_path)
    if cached is None:
        return None
    train, val, stats, reject_lines = cached
    if rejects_path is not None and reject_lines:
        write_rejects(rejects_path, reject_lines)
    _say_skipped(len(reject_lines), rejects_path if reject_lines else None)
    kept = rejects_path if reject_lines else None
    return PreparedData(train, val, dict(stats, cached=True), fingerprint, kept, settings)


def _load_checked(spec: Any, settings: DataSettings, facts: _ModelFacts, handler: Any, sources: list[Any]):
    """Records in formats the handler supports, duplicates dropped; (load result, records, rejects)."""
    result = load_records(
        spec,
        format=settings.format,
        strict=settings.strict,
        prefer=facts.supported,
        preprocessing=facts.preprocessing,
        truncate=make_truncate(facts.text_tok),
        sources=sources,
    )
    check_formats(result, facts.supported, handler)
    rejects = list(result.rejects)
    records = result.records
    if settings.dedup and result.duplicates:
        dup = {origin for origin, _ in result.duplicates}
        records = [r for r in records if r.origin not in dup]
    if any(r.images or r.videos for r in records) and facts.processor is None:
        raise DataError(
            "the data has images or video frames but the model has no image processor: "
            "use a vision-language model or text-only data"
        )
    if not records:
        first = f" (first: {rejects[0].origin}: {rejects[0].reason})" if rejects else ""
        raise DataError(f"{spec}: no usable records; {len(rejects)} rejected{first}")
    return result, records, rejects


def _summary(result: LoadResult, rejects: list[Reject], train: list, validation: list, notes: list) -> dict:
    """The data's numbers for the report and adapter_info.json."""
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    files = [
        {"path": f.path, "kind": f.kind, "format": f.format, "records": f.records, "rejects": f.rejects}
        for f in result.files
    ]
    return {
        "records_read": len(result.records) + len(result.rejects),
        "records_used": len(train) + len(validation),
        "files": files,
        "formats": result.formats,
        "rejects": len(rejects),
        "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:20]),
        "duplicates": len(result.duplicates),
        "train_examples": len(train),
        "validation_examples": len(validation),
        "tokens": _length_stats(train + validation),
        "notes": notes + result.notes,
        "cached": False,
    }


def _prepare(
    spec: str | os.PathLike, tokenizer: Any, handler: Any, settings: DataSettings, hparams: Any = None
) -> PreparedData:
    from llm_installer.console import err_console

    if settings.max_seq_length is None or settings.max_seq_length < 2:
        raise DataError(f"--max-seq-length {settings.max_seq_length}: must be at least 2")
    facts = _model_facts(tokenizer, handler, hparams)
    notes: list[str] = []
    sources = resolve_spec(spec, notes)
    for note in notes:
        err_console.print(f"[cyan]note:[/cyan] {note}", soft_wrap=True)
    fingerprint = _fingerprint(sources, facts, settings)
    rejects_path = Path(settings.rejects_path) if settings.rejects_path else None
    cache_path = Path(settings.cache_dir) / f"data-{fingerprint}.npz" if settings.cache_dir else None
    cached = _cached(cache_path, rejects_path, fingerprint, settings)
    if cached is not None:
        return cached

    result, records, rejects = _load_checked(spec, settings, facts, handler, sources)
    train_records, val_records = split_records(records, settings)
    renderer = Renderer(
        facts.text_tok,
        chat_template=facts.chat_format.template,
        end_of_turn=facts.chat_format.end_of_turn,
        system_prompt=settings.system_prompt,
        train_on_inputs=settings.train_on_inputs,
        image_token=facts.image_token,
        video_token=facts.video_token,
    )
    stats: dict[str, Any] = {"truncated": 0, "answers_cut": 0, "dropped_too_long": 0}
    n_load_rejects = len(rejects)
    limit, proc = settings.max_seq_length, facts.processor
    train = encode_records(train_records, renderer, limit, stats, rejects, "tokenizing", proc)
    validation = encode_records(val_records, renderer, limit, stats, rejects, "tokenizing validation", proc)
    if settings.strict and len(rejects) > n_load_rejects:
        bad = rejects[n_load_rejects]
        raise DataError(f"{bad.origin}: {bad.reason} (--strict stops at the first bad record)")
    if not train:
        raise DataError(f"{spec}: no training records left after rendering; {len(rejects)} rejected")
    stats.update(_summary(result, rejects, train, validation, notes))
    written = None
    if rejects_path is not None and rejects:
        write_rejects(rejects_path, [r.to_json() for r in rejects])
        written = rejects_path
    _say_skipped(len(rejects), written)
    data = PreparedData(train, validation, stats, fingerprint, written, settings)
    has_media = any("pixel_values" in e or "pixel_values_videos" in e for e in train)
    if cache_path is not None and not has_media:
        save_cache(cache_path, data, rejects)
    return data
