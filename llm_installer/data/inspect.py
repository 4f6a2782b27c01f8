"""What `llm-installer data inspect` shows: per-file formats, counts, rejects, token lengths, one example.

Kept apart from the command so a web UI can show the same report: `inspect_data` returns plain values,
the command only draws them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_installer.chat_format import handler_chat_format
from llm_installer.data.load import load_records
from llm_installer.data.loaders import Source, resolve_spec
from llm_installer.data.records import LoadResult, RecordError
from llm_installer.data.render import IGNORE_INDEX, Rendered, Renderer

# `data inspect` answers in seconds whatever the data: token statistics come from at most STAT_SAMPLE
# records spread over the data, each cut to STAT_MAX_CHARS characters, and the example shows at most
# EXAMPLE_TOKENS tokens. (Tokenising a 50 MB record took 6 minutes and 16 GB; a 100,000-record file
# is described as well by 2,000 of them.)
STAT_SAMPLE = 2000
STAT_MAX_CHARS = 200_000
EXAMPLE_TOKENS = 400


@dataclass
class InspectReport:
    result: LoadResult
    lengths: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    render_rejects: list[tuple[str, str]] = field(default_factory=list)
    example: list[tuple[str, bool]] = field(default_factory=list)  # (token text, trained)
    example_origin: str = ""
    over_limit: int = 0
    tokenizer_name: str = ""
    sampled: int = 0  # records whose tokens were counted (all of them when no more than STAT_SAMPLE)
    cut: int = 0  # of those, records longer than STAT_MAX_CHARS: counted on their first part only
    example_more: int = 0  # tokens of the example not shown
    chat_format: str = ""  # the template and end-of-turn token training uses (ChatFormat.describe)
    pair: dict[str, list[str]] | None = None  # a preference pair's prompt/chosen/rejected tokens (issue 15)


def histogram(values: list[int], bins: int = 8, width: int = 30) -> list[tuple[str, int, str]]:
    """(range label, count, bar) rows: a text histogram small enough for a terminal."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if lo == hi:
        return [(f"{lo}", len(values), "█" * width)]
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min((v - lo) // step, bins - 1)] += 1
    top = max(counts)
    rows = []
    for i, c in enumerate(counts):
        a, b = lo + i * step, min(lo + (i + 1) * step - 1, hi)
        if a > hi:
            break
        rows.append((f"{a}-{b}", c, "█" * round(width * c / top) if c else ""))
    return rows


def bundled_tokenizer_cache(gguf: Path) -> Path:
    """Where the bundled tokenizer is kept once converted: keyed by the GGUF file's path, size and mtime."""
    st = gguf.stat()
    key = hashlib.blake2b(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode(), digest_size=8).hexdigest()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-installer"
    return base / f"bundled-tokenizer-{key}"


def bundled_tokenizer() -> Any:
    """SmolLM2's tokenizer from the bundled GGUF, saved once under the user cache (later loads are fast)."""
    from transformers import AutoTokenizer

    from llm_installer.sources.bundled import bundled_gguf_path

    gguf = bundled_gguf_path()
    cache = bundled_tokenizer_cache(gguf)
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs speed
    return tok


def inspect_data(
    paths: list[str],
    tokenizer: Any | None,
    *,
    handler: Any = None,
    format: str | None = None,
    max_seq_length: int | None = None,
) -> InspectReport:
    """Load `paths` and, with a tokenizer, render every record to measure lengths and show a mask."""
    notes: list[str] = []
    sources: list[Source] = []
    for p in paths:
        for s in resolve_spec(p, notes):
            if s not in sources:
                sources.append(s)
    params: dict[str, Any] = {}
    if handler is not None:
        from llm_installer.data.prepare import handler_data_params

        params = handler_data_params(handler)
    result = load_records(
        ",".join(paths),
        format=format,
        sources=sources,
        prefer=params.get("dataset_formats"),
        preprocessing=params.get("dataset_preprocessing"),
    )
    result.notes = notes + result.notes
    report = InspectReport(result=result)
    if tokenizer is None or not result.records:
        return report
    from llm_installer.data.prepare import split_processor

    text_tok, processor = split_processor(tokenizer)
    chat_format = handler_chat_format(handler, text_tok)  # what training will use
    report.chat_format = chat_format.describe()
    special = dict(params.get("special_tokens") or {})
    renderer = Renderer(
        text_tok,
        chat_template=chat_format.template,
        end_of_turn=chat_format.end_of_turn,
        image_token=getattr(processor, "image_token", None) or special.get("image_token"),
        video_token=getattr(processor, "video_token", None) or special.get("video_token"),
    )
    report.tokenizer_name = getattr(text_tok, "name_or_path", "") or type(text_tok).__name__
    from llm_installer.data.detect import sample_indices

    rendered, kept = [], []
    for i in sample_indices(len(result.records), STAT_SAMPLE):
        record = result.records[i]
        try:
            r = renderer.render(record)
        except RecordError as exc:
            report.render_rejects.append((record.origin, f"{record.format}: {exc}"))
            continue
        if len(r.text) > STAT_MAX_CHARS:
            report.cut += 1
            r = Rendered(
                r.text[:STAT_MAX_CHARS],
                [(a, min(b, STAT_MAX_CHARS)) for a, b in r.spans if a < STAT_MAX_CHARS],
                raw=r.raw,
            )
        rendered.append(r)
        kept.append(record)
    report.sampled = len(rendered) + len(report.render_rejects)
    examples = renderer.encode(rendered)
    for ex in examples:
        report.lengths.append(len(ex["input_ids"]))
        report.trained.append(sum(1 for x in ex["labels"] if x != IGNORE_INDEX))
    if max_seq_length:
        report.over_limit = sum(1 for n in report.lengths if n > max_seq_length)
    if examples:
        ex = examples[0]
        report.example_origin = kept[0].origin
        pairs = list(zip(ex["input_ids"], ex["labels"], strict=True))
        report.example_more = max(0, len(pairs) - EXAMPLE_TOKENS)
        report.example = [(text_tok.decode([t]), lab != IGNORE_INDEX) for t, lab in pairs[:EXAMPLE_TOKENS]]
        from llm_installer.data.preference import inspect_pair  # issue 15 hook: both answers of a pair

        report.pair = inspect_pair(renderer, kept[0], text_tok)
    return report
