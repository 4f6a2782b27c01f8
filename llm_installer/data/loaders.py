"""File types and data specs: turn `--data SPEC` into raw records with their origins.

A spec is a path, a directory (searched recursively), a quoted glob, a comma-separated mix of these,
`name:split` of a Hugging Face dataset in the local datasets cache, or the name of a bundled example file
(`llm_installer/examples/`). Readers yield `(origin, raw, problem)`: `raw` is a dict (json/jsonl/csv/
parquet/hf) or a string (txt line); `problem` is a reason when the record could not even be parsed (a bad
JSONL line, undecodable text) — the record is then rejected, and the rest of the file still loads.
Whole-file problems (empty, binary, truncated JSON, not UTF-8 JSON) raise a one-line `DataError`.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import os
import stat
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
MAX_RECORD_BYTES = 8 << 20  # one JSONL/text line; longer ones are rejected unread (about 2M tokens)
MAX_WHOLE_FILE_BYTES = 512 << 20  # a .json/.csv/.tsv file is parsed in one piece: larger ones are refused
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


def _refuse_special(path: Path, where: str) -> None:
    """One-line errors for what is there but cannot be read as data: a FIFO or device (reading one would
    block or never end), a link that loops or leads nowhere."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if path.is_symlink():
            why = "loops" if exc.errno == 40 else "leads nowhere"
            raise DataError(
                f"{where}: is a symbolic link that {why}; fix the link or give the file itself"
            ) from None
        if exc.errno == 36:  # ENAMETOOLONG: not a path at all
            raise DataError(f"{where[:60]}...: name too long to be a file; check --data") from None
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file (a device or socket)"
        raise DataError(f"{where}: is {kind}, not a data file; give a .jsonl/.json/.csv/.parquet/.txt file")


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
        _refuse_special(path, part)
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


# Byte-order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)


def _encoding(head: bytes, path: Path) -> tuple[str, int, str]:
    """(codec, BOM length, name) from a file's first bytes; DataError for binary files and for UTF-16/32
    without a byte-order mark (which cannot be told apart from binary with certainty)."""
    for bom, codec, name in _BOMS:
        if head.startswith(bom):
            return codec, len(bom), name
    sample = head[:4096]
    if b"\x00" in sample:
        even, odd = sample[0::2], sample[1::2]
        nul_even, nul_odd = even.count(0) / max(1, len(even)), odd.count(0) / max(1, len(odd))
        quads = [sample[i : i + 4] for i in range(0, len(sample) - 3, 4)]
        if quads and sum(q[1:] == b"\x00\x00\x00" or q[:3] == b"\x00\x00\x00" for q in quads) > 0.9 * len(
            quads
        ):
            raise DataError(f"{path}: looks like UTF-32 text without a byte-order mark; re-save it as UTF-8")
        if max(nul_even, nul_odd) > 0.3 and min(nul_even, nul_odd) < 0.05:
            raise DataError(f"{path}: looks like UTF-16 text without a byte-order mark; re-save it as UTF-8")
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not a text dataset; check the path")
    return "utf-8", 0, "UTF-8"


def _open_checked(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 - the callers close it
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_text(path: Path, *, whole: bool) -> str:
    """Decode a data file read in one piece: UTF-8, or UTF-8/16/32 with a byte-order mark.

    Binary and empty files are refused, and so are files over MAX_WHOLE_FILE_BYTES (parsed in one piece,
    they would take many times their size in memory). `whole=True` (JSON) fails on undecodable bytes;
    line-based files keep them as surrogates so the affected records alone are rejected.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size > MAX_WHOLE_FILE_BYTES:
        raise DataError(
            f"{path}: {size / 2**20:.0f} MiB is more than the {MAX_WHOLE_FILE_BYTES >> 20} MiB a {path.suffix} file "
            "may have (it is read in one piece); split it, or convert it to JSON Lines (.jsonl), which is streamed"
        )
    with _open_checked(path) as fh:
        try:
            data = fh.read()
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise DataError(f"{path}: empty file; put records in it or remove it from --data")
    codec, skip, name = _encoding(data[:8192], path)
    data = data[skip:]
    if codec != "utf-8":
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            raise DataError(
                f"{path}: has a {name} byte-order mark but is not valid {name} text; re-save it as UTF-8"
            ) from None
    if whole:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{path}: not valid UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); re-save it as UTF-8"
            ) from None
    return data.decode("utf-8", errors="surrogateescape")


def _lines(path: Path) -> Iterator[tuple[int, str | None, int]]:
    """(line number, text, bytes) of each non-blank line, streamed: a line over MAX_RECORD_BYTES is
    skipped unread (text None), so one 50 MB line costs neither its size in memory nor a parse."""
    with _open_checked(path) as fh:
        head = fh.read(8192)
        codec, skip, _ = _encoding(head, path)
        if codec != "utf-8":  # UTF-16/32 with a BOM: rare, decoded in one piece
            fh.close()
            for n, line in enumerate(_read_text(path, whole=False).splitlines(), 1):
                if line.strip():
                    yield n, line, len(line)
            return
        fh.seek(skip)
        n = 0
        seen = False
        while True:
            raw = fh.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                break
            n += 1
            size = len(raw)
            if size > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                while chunk := fh.readline(1 << 20):  # skip the rest of this line
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                seen = True
                yield n, None, size
                continue
            if raw.strip():
                seen = True
                yield n, raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n"), size
    if not seen:
        raise DataError(f"{path}: empty file; put records in it or remove it from --data")


def _too_long(size: int) -> str:
    return (
        f"record is {size / 2**20:.1f} MiB long, more than the {MAX_RECORD_BYTES >> 20} MiB a record may have; "
        "split it or leave it out"
    )


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
    except RecursionError:
        raise DataError(
            f"{path}: JSON nested too deeply to read (about a thousand levels or more); records are objects of "
            "text fields: flatten it"
        ) from None
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
    lines = ((n, line, len(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    yield from _jsonl_items(path, lines)


def _jsonl_items(path: Path, lines) -> Iterator[Item]:
    for n, line, size in lines:
        origin = f"{path}:{n}"
        if line is None:
            yield origin, None, _too_long(size)
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            yield origin, line[:500], f"invalid JSON: {exc.msg} at column {exc.colno}"
            continue
        except RecursionError:
            yield origin, None, "JSON nested too deeply to read (about a thousand levels or more); flatten it"
            continue
        except UnicodeEncodeError:
            yield origin, None, "not valid UTF-8 text (re-save the file as UTF-8)"
            continue
        yield origin, raw, None


def read_jsonl(path: Path) -> Iterator[Item]:
    yield from _jsonl_items(path, _lines(path))


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
    for n, line, size in _lines(path):
        if line is None:
            yield f"{path}:{n}", None, _too_long(size)
        else:
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
