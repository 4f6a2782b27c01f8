"""File types and data specs: turn `--data SPEC` into raw records with their origins.

A spec is a path, a directory (searched recursively), a quoted glob, a comma-separated mix of these,
`name:split` of a Hugging Face dataset in the local datasets cache, or the name of a bundled example file
(`llm_installer/examples/`). Readers yield `(origin, raw, problem)`: `raw` is a dict (json/jsonl/csv/
parquet/hf) or a string (txt line); `problem` is a reason when the record could not even be parsed (a bad
JSONL line, undecodable text) — the record is then rejected, and the rest of the file still loads.
Whole-file problems (empty, binary, truncated JSON, not UTF-8 JSON) raise a one-line `DataError`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_installer.errors import DataError

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
}
CONTAINER_KEYS = ("data", "records", "examples", "train", "rows", "items", "instances", "dataset")
_GLOB_CHARS = set("*?[")

Item = tuple[str, Any, str | None]


@dataclass(frozen=True)
class Source:
    """One input: a file (kind = its type) or a cached Hugging Face split (kind 'hf')."""

    kind: str
    path: Path | None = None
    name: str = ""
    split: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}:{self.split}" if self.kind == "hf" else str(self.path)

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None


def _file_source(path: Path, where: str) -> Source:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{where}: unsupported file type '{path.suffix or path.name}'; use {', '.join(sorted(SUFFIXES))}"
        )
    return Source(kind, path=path)


def _dir_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def resolve_spec(spec: str | os.PathLike, notes: list[str] | None = None) -> list[Source]:
    """Expand a data spec into sources, in a stable order; a one-line error for anything not found."""
    notes = notes if notes is not None else []
    text = str(spec).strip()
    if not text:
        raise DataError("no data given: pass --data with a file, folder, glob or name:split")
    parts = [text] if Path(text).expanduser().exists() else [p.strip() for p in text.split(",") if p.strip()]
    sources: list[Source] = []
    for part in parts:
        path = Path(part).expanduser()
        if path.is_dir():
            files = _dir_files(path)
            if not files:
                raise DataError(f"{part}: folder holds no data files ({', '.join(sorted(SUFFIXES))})")
            sources += [Source(SUFFIXES[f.suffix.lower()], path=f) for f in files]
        elif path.is_file():
            sources.append(_file_source(path, part))
        elif _GLOB_CHARS & set(part):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in SUFFIXES]
            for m in matches:
                if m.is_dir():
                    files += _dir_files(m)
            if not files:
                raise DataError(f"{part}: the pattern matches no data files")
            sources += [Source(SUFFIXES[f.suffix.lower()], path=f) for f in files]
        elif (EXAMPLES_DIR / part).is_file() and "/" not in part:
            example = EXAMPLES_DIR / part
            notes.append(f"{part} is not a path here: using the bundled example dataset {example}")
            sources.append(_file_source(example, part))
        elif ":" in part and not part.startswith((".", "/", "~")):
            name, _, split = part.rpartition(":")
            if not name or not split:
                raise DataError(
                    f"{part}: a Hugging Face dataset is given as name:split, e.g. tatsu-lab/alpaca:train"
                )
            sources.append(Source("hf", name=name, split=split))
        else:
            raise DataError(
                f"{part}: no such file or folder (give a path, a folder, a quoted glob, a comma-separated mix, "
                "or name:split of a cached Hugging Face dataset)"
            )
    seen: set[str] = set()
    unique = []
    for s in sources:
        if s.label not in seen:
            seen.add(s.label)
            unique.append(s)
    return unique


# ---- raw bytes to text ------------------------------------------------------------------------------


def _read_text(path: Path, *, whole: bool) -> str:
    """Decode a data file: UTF-8 (BOM tolerated) or UTF-16 with a BOM; binary and empty files refused.

    `whole=True` (JSON) fails on undecodable bytes; line-based files keep them as surrogates so the
    affected records alone are rejected.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise DataError(f"{path}: empty file; put records in it or remove it from --data")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise DataError(
                f"{path}: has a UTF-16 byte-order mark but is not valid UTF-16; re-save it as UTF-8"
            ) from None
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not a text dataset; check the path")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if whole:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{path}: not valid UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); re-save it as UTF-8"
            ) from None
    return data.decode("utf-8", errors="surrogateescape")


def _records_of_json(value: Any, path: Path) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key in CONTAINER_KEYS:
            if isinstance(value.get(key), list):
                return value[key]
        lists = [
            k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ]
        from llm_installer.data.detect import candidates

        if len(lists) == 1 and not candidates(value):
            return value[lists[0]]
        return [value]  # one record
    raise DataError(
        f"{path}: top-level JSON is {type(value).__name__}; expected a list of records or an object holding one"
    )


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_json(path: Path) -> Iterator[Item]:
    text = _read_text(path, whole=True)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_line_is_object(text):  # JSON Lines saved as .json
            yield from _jsonl_lines(path, text)
            return
        stripped = text.rstrip()
        truncated = exc.msg != "Extra data" and (
            exc.pos >= len(stripped) - 1 or not stripped.endswith(("]", "}"))
        )
        hint = "the file looks truncated" if truncated else "fix the JSON syntax"
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} ({hint})"
        ) from None
    for i, raw in enumerate(_records_of_json(value, path)):
        yield f"{path}#{i}", raw, None


def _jsonl_lines(path: Path, text: str) -> Iterator[Item]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        origin = f"{path}:{n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            yield origin, line[:500], f"invalid JSON: {exc.msg} at column {exc.colno}"
            continue
        except UnicodeEncodeError:
            yield origin, None, "not valid UTF-8 text (re-save the file as UTF-8)"
            continue
        yield origin, raw, None


def read_jsonl(path: Path) -> Iterator[Item]:
    yield from _jsonl_lines(path, _read_text(path, whole=False))


def _cell(value: str) -> Any:
    v = value.strip()
    if v[:1] in "[{" and v[-1:] in "]}":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return value
    return value if v else None


def read_delimited(path: Path, delimiter: str) -> Iterator[Item]:
    text = _read_text(path, whole=False)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the header row: {exc}") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError(f"{path}: the first row must name the columns (e.g. instruction,output)")
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield f"{path}:{line}", None, f"malformed row: {exc}"
            continue
        if not any(c.strip() for c in row):
            continue
        origin = f"{path}:{line}"
        if len(row) > len(header):
            yield origin, row, f"row has {len(row)} cells but the header names {len(header)} columns"
            continue
        yield origin, {h: _cell(c) for h, c in zip(header, row, strict=False) if h}, None


def read_parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # pyarrow raises several types for broken files
        raise DataError(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    for i, raw in enumerate(rows):
        yield f"{path}#{i}", raw, None


def read_txt(path: Path) -> Iterator[Item]:
    for n, line in enumerate(_read_text(path, whole=False).splitlines(), 1):
        if line.strip():
            yield f"{path}:{n}", line, None


def read_hf(name: str, split: str) -> Iterator[Item]:
    """A split of a Hugging Face dataset from the local cache only (we never reach the Hub)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}:{split}: reading Hugging Face datasets needs `pip install datasets`"
        ) from None
    try:
        datasets.config.HF_HUB_OFFLINE = True
    except AttributeError:
        pass
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        cache = datasets.config.HF_DATASETS_CACHE
        if "split" in str(exc).lower() and "unknown" in str(exc).lower():
            raise DataError(
                f"{name}:{split}: the cached dataset has no split '{split}' ({str(exc)[:160]})"
            ) from None
        raise DataError(
            f"{name}:{split}: not in the local Hugging Face datasets cache ({cache}) and we work offline; "
            "load it once where there is network (datasets.load_dataset) and copy the cache here, or give a file"
        ) from None
    try:  # images stay undecoded ({"path", "bytes"}): formats.py keeps a file path per image
        from datasets import Image

        for column, feature in ds.features.items():
            if isinstance(feature, Image):
                ds = ds.cast_column(column, Image(decode=False))
    except (ImportError, ValueError, TypeError):
        pass
    for i, raw in enumerate(ds):
        yield f"{name}:{split}#{i}", raw, None


def read_source(source: Source) -> Iterator[Item]:
    if source.kind == "hf":
        return read_hf(source.name, source.split)
    assert source.path is not None
    readers = {
        "json": read_json,
        "jsonl": read_jsonl,
        "csv": lambda p: read_delimited(p, ","),
        "tsv": lambda p: read_delimited(p, "\t"),
        "parquet": read_parquet,
        "txt": read_txt,
    }
    return readers[source.kind](source.path)


def source_fingerprint(source: Source) -> str:
    """Content identity of a source for the prepared-data cache: file bytes, or the HF cache files."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    if source.kind == "hf":
        h.update(source.label.encode())
        try:
            import datasets

            os.environ["HF_DATASETS_OFFLINE"] = "1"
            ds = datasets.load_dataset(source.name, split=source.split)
            h.update(str(getattr(ds, "_fingerprint", "")).encode())
        except Exception:  # an unreadable dataset fails later with its own one-line error
            h.update(b"unreadable")
        return h.hexdigest()
    assert source.path is not None
    h.update(str(source.path.resolve()).encode())
    try:
        with source.path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        h.update(b"unreadable")
    return h.hexdigest()
