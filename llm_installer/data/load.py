"""`load_records(spec)`: read every input, detect each record's format, validate, convert, find duplicates.

Nothing is lost silently: a record that cannot be used becomes a `Reject` (origin "file:line" or
"file#index", and the reason); whole-file problems raise one-line `DataError`s; `strict=True` turns the
first reject into an error instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from llm_installer.data.detect import candidates, dominant_format
from llm_installer.data.formats import FORMATS, ConvertContext
from llm_installer.data.loaders import Source, read_source, resolve_spec
from llm_installer.data.records import FileSummary, LoadResult, Record, RecordError, Reject
from llm_installer.errors import DataError

MAX_RECORD_DEPTH = 64  # a record is an object of text fields, lists of messages, a few image dicts


def raw_problem(raw: Any) -> str | None:
    """Why a parsed record cannot be used at all, before any format looks at it: nested deeper than
    MAX_RECORD_DEPTH (later code walks records recursively), or text with a lone surrogate — valid as a
    JSON escape ("\\ud800"), but not Unicode, and tokenizers fail on it. Iterative, so it cannot
    recurse too deeply itself."""
    stack: list[tuple[Any, int, str]] = [(raw, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_RECORD_DEPTH:
            return f"nested more than {MAX_RECORD_DEPTH} levels deep; records are objects of text fields"
        if isinstance(value, str):
            try:
                value.encode("utf-8", errors="surrogateescape")  # undecodable bytes: formats.check_text's
            except UnicodeEncodeError as exc:
                field = f"field '{where}'" if where else "the text"
                return (
                    f"{field} is not valid Unicode (a lone surrogate {value[exc.start]!a}); "
                    "fix that text or re-save the file as UTF-8"
                )
        elif isinstance(value, dict):
            stack.extend((v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1, f"{where}.{i}" if where else str(i)) for i, v in enumerate(value))
    return None


def _check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise DataError(f"--format {format}: unknown format; use one of {', '.join(FORMATS)}")


def load_records(
    spec: str | os.PathLike,
    *,
    format: str | None = None,
    strict: bool = False,
    prefer: Iterable[str] | None = None,
    preprocessing: dict[str, dict[str, Any]] | None = None,
    truncate: Callable[[str, int], str] | None = None,
    sources: list[Source] | None = None,
) -> LoadResult:
    """Load `spec` into canonical records.

    `format` forces one format for every record (else detection per record, see detect.py); `prefer` is
    the handler's supported formats (breaks ties such as qa vs medical_qa); `preprocessing` are the
    handler's `dataset_preprocessing` hints; `truncate(text, n)` cuts text to n tokens for hints such as
    medical_qa's max_context_length (characters when None). `sources` skips resolving `spec` again.
    """
    _check_format(format)
    notes: list[str] = []
    if sources is None:
        sources = resolve_spec(spec, notes)
    records: list[Record] = []
    rejects: list[Reject] = []
    files: list[FileSummary] = []
    ctx_args = {"preprocessing": preprocessing or {}, "truncate": truncate}
    for source in sources:
        ctx = ConvertContext(base_dir=source.base_dir, **ctx_args)
        files.append(_load_source(source, format, list(prefer or []), ctx, records, rejects))
        if strict and rejects:
            first = rejects[0]
            raise DataError(
                f"{first.origin}: {first.reason} (--strict stops at the first bad record; "
                "fix it or drop --strict to skip bad records)"
            )
    return LoadResult(
        records=records, rejects=rejects, files=files, duplicates=_duplicates(records), notes=notes
    )


def _load_source(
    source: Source, format: str | None, prefer: list[str], ctx: ConvertContext,
    records: list[Record], rejects: list[Reject],
) -> FileSummary:  # fmt: skip
    """Convert one source's records (appended to `records`, the bad ones to `rejects`): a record fitting
    several formats takes the source's dominant one when that is among them, else it is rejected."""
    items = [
        (origin, raw, problem or (raw_problem(raw) if raw is not None else None))
        for origin, raw, problem in read_source(source)
    ]
    if not items:
        raise DataError(f"{source.label}: holds no records; put records in it or remove it from --data")
    summary = FileSummary(path=source.label, kind=source.kind)
    fallback = format
    if fallback is None:
        parsed = [raw for _, raw, problem in items if problem is None]
        fallback, why = dominant_format(parsed, prefer)
        if fallback is None and parsed:
            raise DataError(f"{source.label}: {why}")
    for origin, raw, problem in items:
        name = format
        if problem is None and name is None:
            found = candidates(raw, prefer)
            name = found[0] if len(found) == 1 else fallback
            if len(found) > 1 and fallback not in found:
                problem = f"ambiguous record: keys {sorted(map(str, raw))} fit {' and '.join(found)} (pass --format)"
        if problem is None:
            try:
                record = FORMATS[name].convert(raw, ctx)
            except RecordError as exc:
                problem = f"{name}: {exc}"
        if problem is not None:
            rejects.append(Reject(origin, problem, raw))
            summary.rejects += 1
            continue
        record.origin = origin
        records.append(record)
        summary.records += 1
        summary.formats[record.format] = summary.formats.get(record.format, 0) + 1
    return summary


def _duplicates(records: list[Record]) -> list[tuple[str, str]]:
    """(origin, origin of its first copy) for each record whose content appeared before."""
    seen: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    for record in records:
        key = record.key()
        if key in seen:
            duplicates.append((record.origin, seen[key]))
        else:
            seen[key] = record.origin
    return duplicates
