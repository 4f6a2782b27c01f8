"""The bad-data corpus: every file shape that used to end in a traceback, a wrong message, a hang or
minutes of work, each with its exact one-line error or reject (docs/robustness.md)."""

from __future__ import annotations

import codecs
import json
import os
import time
from pathlib import Path

import pytest

from llm_installer.data.load import load_records
from llm_installer.errors import DataError

REC = {"instruction": "Name a colour.", "output": "Blue."}
LINE = json.dumps(REC) + "\n"
TRIED: list[str] = []


def _error(path: Path) -> str:
    TRIED.append(path.name)
    with pytest.raises(DataError) as exc:
        load_records(str(path))
    return str(exc.value)


def _rejects(path: Path) -> tuple[int, list[str]]:
    TRIED.append(path.name)
    result = load_records(str(path))
    return len(result.records), [r.reason for r in result.rejects]


def test_whole_file_problems_are_one_line(tmp_path):
    cases = {
        "empty.jsonl": (b"", "empty file; put records in it or remove it from --data"),
        "blank.jsonl": (b"\n \n\t\n", "empty file; put records in it or remove it from --data"),
        "binary.jsonl": (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
            "looks like a binary file (NUL bytes), not a text dataset; check the path",
        ),
        "truncated.json": (
            b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp',
            "invalid JSON at line 1 column 60: Unterminated string starting at (the file looks truncated)",
        ),
        "utf16-nobom.jsonl": (
            LINE.encode("utf-16-le"),
            "looks like UTF-16 text without a byte-order mark; re-save it as UTF-8",
        ),
        "utf32-nobom.jsonl": (
            LINE.encode("utf-32-le"),
            "looks like UTF-32 text without a byte-order mark; re-save it as UTF-8",
        ),
        "deep.json": (
            b"[" * 100_000 + b"]" * 100_000,
            "JSON nested too deeply to read (about a thousand levels or more); records are objects of text "
            "fields: flatten it",
        ),
        "not-parquet.parquet": (b"PAR1 but not really", None),
        "wrong-schema.csv": (
            b"a,b\n1,2\n",
            "unknown record shape with keys ['a', 'b']; known formats: ",
        ),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        message = _error(path)
        if expected is None:
            assert message.startswith(f"{path}: not a readable Parquet file ("), message
        else:
            assert message.startswith(f"{path}: {expected}"), (name, message)
        assert "\n" not in message


def test_byte_order_marks_of_every_kind_are_read(tmp_path):
    for bom, codec in (
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
        (codecs.BOM_UTF32_LE, "utf-32-le"),  # starts with the UTF-16 LE mark: was read as UTF-16
        (codecs.BOM_UTF32_BE, "utf-32-be"),  # was "a binary file"
    ):
        for suffix in (".jsonl", ".json", ".csv"):
            path = tmp_path / f"bom-{codec}{suffix}"
            text = {
                ".jsonl": LINE,
                ".json": json.dumps([REC]),
                ".csv": "instruction,output\nName a colour.,Blue.\n",
            }
            path.write_bytes(bom + text[suffix].encode(codec))
            n, rejects = _rejects(path)
            assert (n, rejects) == (1, []), (path.name, rejects)
    bad = tmp_path / "bad-utf16.json"
    bad.write_bytes(codecs.BOM_UTF16_LE + b"\x00\xd8")  # a lone high surrogate: not UTF-16
    assert (
        _error(bad)
        == f"{bad}: has a UTF-16 LE byte-order mark but is not valid UTF-16 LE text; re-save it as UTF-8"
    )


def test_bad_records_are_rejected_with_the_reason_and_the_rest_load(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        LINE,
        '{"instruction": "a\\ud800b", "output": "x"}\n',  # lone surrogate as a JSON escape
        '{"instruction": ' + "[" * 5000 + "]" * 5000 + ', "output": "x"}\n',  # deeper than the parser goes
        json.dumps({"instruction": "x", "output": "y", "meta": _nest(100)}) + "\n",  # deep but parseable
        '{"instruction": null, "input": null, "output": null}\n',  # was "unknown record shape"
        '{"instruction": "broken", "outp\n',
        "\n",
        LINE.replace("colour", "color"),
    ]
    path.write_text("".join(lines))
    n, rejects = _rejects(path)
    assert n == 2
    assert rejects == [
        "field 'instruction' is not valid Unicode (a lone surrogate '\\ud800'); fix that text or re-save the "
        "file as UTF-8",
        "JSON nested too deeply to read (about a thousand levels or more); flatten it",
        "nested more than 64 levels deep; records are objects of text fields",
        "alpaca: field 'instruction' is null; give it text",
        "invalid JSON: Unterminated string starting at at column 27",
    ]


def _nest(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_ragged_csv_rows_are_rejected(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('instruction,output\nName a colour.,Blue.\na,b,c\n"unclosed,quote\n')
    n, rejects = _rejects(path)
    assert n == 1
    assert rejects[0] == "row has 3 cells but the header names 2 columns"


def test_wrong_parquet_schema_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"x": [1, 2], "y": [3.0, 4.0]}), str(path))
    assert _error(path).startswith(f"{path}: unknown record shape with keys ['x', 'y']; known formats: ")


def test_fifo_symlink_loop_and_dangling_link_are_refused_at_once(tmp_path):
    from llm_installer.data.loaders import resolve_spec

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "nowhere.jsonl")
    t0 = time.monotonic()
    for path, expected in (
        (fifo, "is a FIFO (named pipe), not a data file; give a .jsonl/.json/.csv/.parquet/.txt file"),
        (loop, "is a symbolic link that loops; fix the link or give the file itself"),
        (dangling, "is a symbolic link that leads nowhere; fix the link or give the file itself"),
    ):
        TRIED.append(path.name)
        with pytest.raises(DataError) as exc:
            resolve_spec(str(path))
        assert str(exc.value) == f"{path}: {expected}"
    assert time.monotonic() - t0 < 5  # reading the FIFO would have blocked forever


def test_inspect_bounds_its_work_on_huge_records_and_files(tmp_path, smollm2_tokenizer):
    """A 12 MB line is rejected unread; a 1 MB record is counted on its first 200,000 characters; a
    5,000-record file is measured on 2,000 of them; the example shows 400 tokens. Seconds, not minutes."""
    from llm_installer.data.inspect import EXAMPLE_TOKENS, STAT_SAMPLE, inspect_data

    huge = tmp_path / "huge.jsonl"
    with open(huge, "w") as fh:
        fh.write(json.dumps({"instruction": "hi", "output": "word " * (12 << 18)}) + "\n")  # 15 MiB line
        fh.write(json.dumps({"instruction": "long " * 200_000, "output": "ok"}) + "\n")  # 1 MB record
        fh.write(LINE)
    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5000)]))
    TRIED.extend([huge.name, many.name])
    t0 = time.monotonic()
    report = inspect_data([str(huge)], smollm2_tokenizer)
    assert [r.reason for r in report.result.rejects] == [
        "record is 15.0 MiB long, more than the 8 MiB a record may have; split it or leave it out"
    ]
    assert report.cut == 1 and max(report.lengths) < 60_000
    assert len(report.example) == EXAMPLE_TOKENS and report.example_more > 0
    report = inspect_data([str(many)], smollm2_tokenizer)
    assert report.sampled == STAT_SAMPLE and len(report.result.records) == 5000
    assert time.monotonic() - t0 < 60


def test_too_big_whole_file_is_refused_before_reading(tmp_path, monkeypatch):
    from llm_installer.data import loaders

    monkeypatch.setattr(loaders, "MAX_WHOLE_FILE_BYTES", 1000)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([REC] * 100))
    assert _error(path) == (
        f"{path}: 0 MiB is more than the 0 MiB a .json file may have (it is read in one piece); split it, or "
        "convert it to JSON Lines (.jsonl), which is streamed"
    )


def test_data_inspect_cli_prints_one_line_for_nested_and_surrogates(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    res = subprocess.run(
        [sys.executable, "-m", "llm_installer", "data", "inspect", str(deep)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    TRIED.append(deep.name)
    assert res.returncode == 2
    assert res.stderr.strip().replace("\n", " ").startswith(f"error: {deep}: JSON nested too deeply to read")
    assert "unexpected" not in res.stderr and "Traceback" not in res.stderr


def test_zz_bad_inputs_tried():
    print(f"\nbad data inputs tried: {len(TRIED)}")
