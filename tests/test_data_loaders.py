"""Every input form and file type, malformed files, bad records (exact messages, good records survive),
--strict, duplicates, and a property test that random JSON never crashes the loader."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_installer.data import loaders
from llm_installer.data.load import load_records
from llm_installer.errors import DataError, UserError

GOOD = [
    {"instruction": "Say hi.", "output": "Hi!"},
    {"instruction": "Say bye.", "output": "Bye!"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def contents(result):
    return [r.messages[-1]["content"] for r in result.records]


# ---- file types and spec forms ----------------------------------------------------------------------


def test_json_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(GOOD))
    r = load_records(str(p))
    assert contents(r) == ["Hi!", "Bye!"]
    assert [x.origin for x in r.records] == [f"{p}#0", f"{p}#1"]
    assert r.files[0].format == "alpaca" and r.files[0].kind == "json"


def test_json_object_holding_a_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"version": 2, "data": GOOD}))
    assert contents(load_records(str(p))) == ["Hi!", "Bye!"]
    q = tmp_path / "e.json"
    q.write_text(json.dumps({"name": "mine", "my_rows": GOOD}))
    assert contents(load_records(str(q))) == ["Hi!", "Bye!"]
    # a single sharegpt record is an object holding a list too, but it is a record
    one = tmp_path / "one.json"
    one.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
    )
    assert contents(load_records(str(one))) == ["b"]


def test_jsonl_with_line_origins(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    r = load_records(str(p))
    assert [x.origin for x in r.records] == [f"{p}:1", f"{p}:2"]


def test_jsonl_saved_as_json(tmp_path):
    p = write_jsonl(tmp_path / "d.json", GOOD)
    assert contents(load_records(str(p))) == ["Hi!", "Bye!"]


@pytest.mark.parametrize(("suffix", "sep"), [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, sep):
    p = tmp_path / f"d{suffix}"
    p.write_text(
        f"instruction{sep}input{sep}output\n"
        f'"Say hi, please."{sep}{sep}Hi!\n'
        f'Multi{sep}"line\ninput"{sep}Bye!\n'
    )
    r = load_records(str(p))
    assert [m["content"] for m in r.records[1].messages] == ["Multi\n\nline\ninput", "Bye!"]
    assert r.records[0].messages[0]["content"] == "Say hi, please."
    assert [x.origin for x in r.records] == [f"{p}:2", f"{p}:3"]


def test_csv_cells_holding_json_conversations(tmp_path):
    p = tmp_path / "d.csv"
    conv = json.dumps([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}])
    p.write_text("conversations\n" + '"' + conv.replace('"', '""') + '"\n')
    r = load_records(str(p))
    assert r.records[0].format == "sharegpt" and contents(r) == ["b"]


def test_csv_row_with_too_many_cells_is_rejected(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\nA,B\nC,D,E\n")
    r = load_records(str(p))
    assert contents(r) == ["B"]
    assert [(x.origin, x.reason) for x in r.rejects] == [
        (f"{p}:3", "row has 3 cells but the header names 2 columns")
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), str(p))
    r = load_records(str(p))
    assert contents(r) == ["Hi!", "Bye!"]
    assert r.records[1].origin == f"{p}#1"


def test_directory_recursive_glob_and_comma_mix(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", GOOD[:1])
    write_jsonl(d / "sub" / "b.jsonl", GOOD[1:])
    (d / "notes.md").write_text("ignored")
    (d / ".hidden").mkdir()
    write_jsonl(d / ".hidden" / "c.jsonl", [{"instruction": "x", "output": "hidden"}])
    assert contents(load_records(str(d))) == ["Hi!", "Bye!"]
    assert contents(load_records(str(d / "**" / "*.jsonl"))) == ["Hi!", "Bye!"]
    other = tmp_path / "c.txt"
    other.write_text("plain text line\n")
    mixed = load_records(f"{d / 'a.jsonl'}, {other}")
    assert [r.format for r in mixed.records] == ["alpaca", "text"]
    with pytest.raises(DataError, match="the pattern matches no data files"):
        load_records(str(tmp_path / "*.parquet"))


def test_bundled_example_name_resolves_with_a_note(tmp_path, monkeypatch):
    examples = tmp_path / "examples"
    examples.mkdir()
    write_jsonl(examples / "test_data.jsonl", GOOD)
    monkeypatch.setattr(loaders, "EXAMPLES_DIR", examples)
    monkeypatch.chdir(tmp_path)
    r = load_records("test_data.jsonl")
    assert contents(r) == ["Hi!", "Bye!"]
    assert r.notes == [
        f"test_data.jsonl is not a path here: using the bundled example dataset {examples / 'test_data.jsonl'}"
    ]


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(DataError) as err:
        load_records(str(tmp_path / "nope.jsonl"))
    assert str(err.value).startswith(f"{tmp_path / 'nope.jsonl'}: no such file or folder")
    p = tmp_path / "d.xlsx"
    p.write_text("x")
    with pytest.raises(DataError, match=r"d.xlsx: unsupported file type '.xlsx'; use .csv, .json"):
        load_records(str(p))


def _cache_hf_dataset(tmp_path, monkeypatch, name: str, rows, features=None):
    """Put `name` into a fresh HF datasets cache the way an earlier online load_dataset would have."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    builder = datasets.load_dataset_builder(
        "json", data_files={"train": str(src)}, cache_dir=str(tmp_path / "b"), features=features
    )
    builder.download_and_prepare()
    built = tmp_path / "b" / "json"
    version_dir = next(p for p in built.rglob("dataset_info.json")).parent
    org, ds_name = name.split("/")
    dest = cache / f"{org}___{ds_name}" / "default" / version_dir.parent.name / version_dir.name
    shutil.copytree(version_dir, dest)
    info = json.loads((dest / "dataset_info.json").read_text())
    info["config_name"] = "default"
    (dest / "dataset_info.json").write_text(json.dumps(info))
    for arrow in dest.glob("json-*.arrow"):
        arrow.rename(dest / arrow.name.replace("json-", f"{ds_name}-"))


def test_cached_hugging_face_dataset_and_the_not_cached_error(tmp_path, monkeypatch):
    _cache_hf_dataset(tmp_path, monkeypatch, "myorg/tiny-alpaca", GOOD)
    r = load_records("myorg/tiny-alpaca:train")
    assert contents(r) == ["Hi!", "Bye!"]
    assert r.records[0].origin == "myorg/tiny-alpaca:train#0"
    with pytest.raises(DataError) as err:
        load_records("other/not-here:train")
    assert str(err.value).startswith(
        "other/not-here:train: not in the local Hugging Face datasets cache ("
    ) and "we work offline" in str(err.value)


# ---- malformed files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "trunc.json",
            b'[{"instruction": "a", "output": "b"}, {"instr',
            "invalid JSON at line 1 column 40: Unterminated string starting at (the file looks truncated)",
        ),
        (
            "enc.json",
            b'[{"instruction": "caf\xe9", "output": "b"}]',
            "not valid UTF-8 text (byte 0xe9 on line 1)",
        ),
        ("bin.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks like a binary file (NUL bytes)"),
        ("empty.jsonl", b"  \n\n", "empty file; put records in it or remove it from --data"),
        ("scalar.json", b"42", "top-level JSON is int; expected a list of records or an object holding one"),
    ],
)
def test_malformed_files_get_one_line_errors(tmp_path, name, data, message):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(DataError) as err:
        load_records(str(p))
    text = str(err.value)
    assert text.startswith(f"{p}: ") and message in text and "\n" not in text


def test_truncated_json_says_so(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp')
    with pytest.raises(DataError, match=r"the file looks truncated"):
        load_records(str(p))


def test_utf8_and_utf16_byte_order_marks_are_read(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    assert contents(load_records(str(p))) == ["Hi!", "Bye!"]
    q = tmp_path / "bom16.jsonl"
    q.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GOOD).encode("utf-16"))
    assert contents(load_records(str(q))) == ["Hi!", "Bye!"]


def test_undecodable_line_is_one_reject_and_the_rest_survives(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        json.dumps(GOOD[0]).encode()
        + b"\n"
        + b'{"instruction": "caf\xe9", "output": "x"}\n'
        + json.dumps(GOOD[1]).encode()
    )
    r = load_records(str(p))
    assert contents(r) == ["Hi!", "Bye!"]
    assert [(x.origin, x.reason) for x in r.rejects] == [
        (f"{p}:2", "alpaca: field 'instruction' is not valid UTF-8 text (re-save the file as UTF-8)")
    ]


# ---- bad records ------------------------------------------------------------------------------------

BAD = [
    ({"instruction": "x"}, "alpaca: missing field 'output'"),
    ({"instruction": "x", "output": "   "}, "alpaca: empty field 'output'"),
    ({"instruction": ["x"], "output": "y"}, "alpaca: field 'instruction' must be text, got list"),
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
        "sharegpt: turn 1: unknown role 'robot' (use system, user/human or assistant/gpt/bot/model)",
    ),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt: no assistant turn to learn from"),
    ({"conversations": "hello"}, "sharegpt: field 'conversations' must be a list of turns, got text"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
        "openai: turn 1 (assistant) has empty content",
    ),
    ({"image": "missing.png", "question": "q", "answer": "a"}, "vision_qa: image not found: missing.png"),
    (
        {"question": "q", "choices": ["a", "b"], "answer": "D"},
        "multi_choice: answer 'D' is not one of the choices A-B (by letter, index or text)",
    ),
    (["not", "an", "object"], "alpaca: record is a list, expected an object with fields"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_record_is_reported_and_good_records_survive(tmp_path, raw, reason):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], raw, GOOD[1]])
    r = load_records(str(p))
    assert contents(r) == ["Hi!", "Bye!"]
    assert [(x.origin, x.reason) for x in r.rejects] == [(f"{p}:2", reason)]
    assert r.files[0].rejects == 1


def test_invalid_jsonl_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n{oops\n" + json.dumps(GOOD[1]) + "\n")
    r = load_records(str(p))
    assert contents(r) == ["Hi!", "Bye!"]
    assert (
        r.rejects[0].reason == "invalid JSON: Expecting property name enclosed in double quotes at column 2"
    )


def test_strict_fails_on_the_first_bad_record(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], {"instruction": "x"}, GOOD[1]])
    with pytest.raises(DataError) as err:
        load_records(str(p), strict=True)
    assert str(err.value) == (
        f"{p}:2: alpaca: missing field 'output' (--strict stops at the first bad record; "
        "fix it or drop --strict to skip bad records)"
    )


def test_duplicates_are_counted_with_their_first_copy(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", GOOD)
    q = tmp_path / "b.json"
    q.write_text(json.dumps([GOOD[1], GOOD[1]]))
    r = load_records(f"{p},{q}")
    assert r.duplicates == [(f"{q}#0", f"{p}:2"), (f"{q}#1", f"{p}:2")]


# ---- detection -------------------------------------------------------------------------------------


def test_file_format_comes_from_a_sample_not_the_first_record(tmp_path):
    rows = [{"instruction": "only instruction"}] + GOOD * 5
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    r = load_records(str(p))
    assert r.files[0].format == "alpaca"
    assert r.rejects[0].reason == "alpaca: missing field 'output'"


def test_ambiguous_file_names_keys_and_suggests_format(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "x", "code": "y", "output": "z"}, {"instruction": "a", "code": "b", "output": "c"}],
    )
    with pytest.raises(DataError) as err:
        load_records(str(p))
    assert str(err.value) == (
        f"{p}: cannot tell the format: records with keys ['code', 'instruction', 'output'] fit "
        "alpaca and code_instruct; pass --format alpaca (or another)"
    )
    r = load_records(str(p), format="code_instruct")
    assert r.records[0].messages[-1]["content"] == "```\ny\n```"


def test_unknown_shape_names_keys(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError) as err:
        load_records(str(p))
    assert str(err.value).startswith(
        f"{p}: unknown record shape with keys ['bar', 'foo']; known formats: alpaca,"
    )
    with pytest.raises(DataError, match="--format nonsense: unknown format; use one of alpaca, sharegpt"):
        load_records(str(p), format="nonsense")


def test_ambiguous_record_in_a_detected_file_is_rejected(tmp_path):
    rows = [*GOOD, {"prompt": "p", "completion": "c", "messages": [{"role": "user", "content": "u"}]}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    r = load_records(str(p))
    assert contents(r) == ["Hi!", "Bye!"]
    assert r.rejects[0].reason == (
        "ambiguous record: keys ['completion', 'messages', 'prompt'] fit openai and completion (pass --format)"
    )


# ---- property test ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "instruction",
                    "output",
                    "input",
                    "messages",
                    "conversations",
                    "role",
                    "content",
                    "from",
                    "value",
                    "question",
                    "answer",
                    "choices",
                    "image",
                    "frames",
                    "text",
                    "prompt",
                    "completion",
                    "code",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=json_values, as_jsonl=st.booleans())
def test_random_json_never_crashes_the_loader(tmp_path, value, as_jsonl):
    p = tmp_path / ("r.jsonl" if as_jsonl else "r.json")
    text = json.dumps(value)
    p.write_text(text if not as_jsonl else text.replace("\n", " ") + "\n")
    try:
        r = load_records(str(p))
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert len(r.records) + len(r.rejects) >= 1
    for rec in r.records:
        assert (rec.messages is None) != (rec.text is None)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".csv", ".tsv", ".txt"]))
def test_random_bytes_never_crash_the_loader(tmp_path, data, suffix):
    p = tmp_path / f"r{suffix}"
    p.write_bytes(data)
    try:
        load_records(str(p))
    except UserError as exc:
        assert "\n" not in str(exc)


def test_json_with_trailing_garbage_is_an_error_not_jsonl(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(GOOD, indent=2) + "\n]\n")
    with pytest.raises(
        DataError, match=r"invalid JSON at line 11 column 1: Extra data \(fix the JSON syntax\)"
    ):
        load_records(str(p))


def test_cached_hugging_face_vision_dataset_keeps_image_files(tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    rows = [{"image": str(tmp_path / "red.png"), "question": "Colour?", "answer": "Red."}]
    _cache_hf_dataset(tmp_path, monkeypatch, "myorg/tiny-vqa", rows, features=features)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (record,) = load_records("myorg/tiny-vqa:train").records
    assert record.format == "vision_qa"
    (image,) = record.images
    assert Image.open(image).getpixel((0, 0)) == (255, 0, 0)


def test_image_bytes_and_decoded_images_are_stored_once_by_content(tmp_path, monkeypatch):
    import io

    from PIL import Image

    from llm_installer.data.formats import FORMATS, ConvertContext

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buffer, format="PNG")
    convert = FORMATS["vision_qa"].convert
    a = convert(
        {"image": {"bytes": buffer.getvalue(), "path": None}, "question": "q", "answer": "a"},
        ConvertContext(),
    )
    b = convert(
        {"image": Image.open(io.BytesIO(buffer.getvalue())), "question": "q", "answer": "a"}, ConvertContext()
    )
    assert a.images[0].startswith(str(tmp_path / "xdg" / "llm-installer" / "media"))
    assert Image.open(a.images[0]).getpixel((0, 0)) == (0, 0, 255)
    assert Image.open(b.images[0]).getpixel((0, 0)) == (0, 0, 255)
