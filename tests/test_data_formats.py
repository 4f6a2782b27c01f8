"""Every format converts to the expected messages and renders with the expected trained tokens through
SmolLM2's real chat template (answers + `<|im_end|>` trained, everything else masked)."""

from __future__ import annotations

import json

import pytest

from llm_installer.data.formats import FORMATS, ConvertContext
from llm_installer.data.load import load_records
from llm_installer.data.prepare import DataSettings, prepare_dataset
from llm_installer.data.records import Record
from llm_installer.data.render import IGNORE_INDEX, Renderer
from llm_installer.errors import DataError

END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def trained_runs(tok, example) -> list[str]:
    """The trained tokens as decoded text, one string per contiguous run."""
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(example["input_ids"], example["labels"], strict=True):
        on = lab != IGNORE_INDEX
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(t)
        prev = on
    return [tok.decode(r) for r in runs]


def encode_one(tok, record: Record, **kw):
    renderer = Renderer(tok, **kw)
    rendered = renderer.render(record)
    return rendered, renderer.encode([rendered])[0]


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def s(c):
    return {"role": "system", "content": c}


CASES = [
    ("alpaca", {"instruction": "Add 2 and 2.", "input": "", "output": "4"}, [u("Add 2 and 2."), a("4")]),
    (
        "alpaca",
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be brief."},
        [s("Be brief."), u("Translate.\n\nBonjour"), a("Hello")],
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "user", "value": "Bye"},
                {"from": "bot", "value": "See you."},
            ]
        },
        [s("Be kind."), u("Hi"), a("Hello!"), u("Bye"), a("See you.")],
    ),
    (
        "openai",
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
        [u("Q1"), a("A1")],
    ),
    (
        "openai",
        {
            "messages": [
                {"role": "system", "content": "Sys"},
                {"role": "user", "content": [{"type": "text", "text": "parts"}]},
                {"role": "assistant", "content": "ok"},
            ]
        },
        [s("Sys"), u("parts"), a("ok")],
    ),
    (
        "chat",
        {"turns": [{"speaker": "customer", "text": "Where is it?"}, {"speaker": "model", "text": "Here."}]},
        [u("Where is it?"), a("Here.")],
    ),
    (
        "chat",
        {"dialog": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        [u("x"), a("y")],
    ),
    ("qa", {"question": "Why?", "answer": "Because."}, [u("Why?"), a("Because.")]),
    (
        "qa",
        {"question": "Who?", "answer": "Ann.", "context": "Ann wrote it."},
        [u("Ann wrote it.\n\nWho?"), a("Ann.")],
    ),
    (
        "code_instruct",
        {"instruction": "Print hi.", "code": "print('hi')\n", "language": "Python"},
        [u("Print hi."), a("```python\nprint('hi')\n```")],
    ),
    (
        "multi_choice",
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": "B"},
        [u("2+2?\n\nA) 3\nB) 4\nC) 5"), a("B) 4")],
    ),
    (
        "multi_choice",
        {"question": "Capital of France?", "choices": {"A": "Rome", "B": "Paris"}, "answer": "Paris"},
        [u("Capital of France?\n\nA) Rome\nB) Paris"), a("B) Paris")],
    ),
    (
        "multi_choice",
        {"question": "First?", "options": ["one", "two"], "answer": 0},
        [u("First?\n\nA) one\nB) two"), a("A) one")],
    ),
]


@pytest.mark.parametrize(("fmt", "raw", "messages"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_format_round_trip_and_mask(smollm2_tokenizer, fmt, raw, messages):
    record = FORMATS[fmt].convert(raw, ConvertContext())
    assert record.format == fmt
    assert record.messages == messages
    rendered, example = encode_one(smollm2_tokenizer, record)
    # the fast per-shape render equals the template's own output
    expected_text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.text == expected_text
    answers = [m["content"] + END for m in messages if m["role"] == "assistant"]
    assert trained_runs(smollm2_tokenizer, example) == answers


def test_detection_picks_each_format_from_keys(tmp_path):
    rows = [raw for _, raw, _ in CASES]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = load_records(str(path))
    assert [r.format for r in result.records] == [c[0] for c in CASES]
    assert result.rejects == []
    assert result.files[0].format.startswith("mixed (")


def test_text_format_trains_everything_and_appends_eos(smollm2_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox.\n\nJumps over.\n")
    result = load_records(str(path))
    assert [(r.text, r.format, r.origin) for r in result.records] == [
        ("The quick brown fox.", "text", f"{path}:1"),
        ("Jumps over.", "text", f"{path}:3"),
    ]
    _, example = encode_one(smollm2_tokenizer, result.records[0])
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == smollm2_tokenizer.eos_token_id
    assert smollm2_tokenizer.decode(example["input_ids"]) == "The quick brown fox." + END


def test_completion_trains_only_the_completion(smollm2_tokenizer):
    record = FORMATS["completion"].convert({"prompt": "The sky is", "completion": " blue."}, ConvertContext())
    rendered, example = encode_one(smollm2_tokenizer, record)
    assert rendered.text == "The sky is blue."
    assert trained_runs(smollm2_tokenizer, example) == [" blue." + END]


def test_medical_qa_context_is_cut_to_max_context_length_tokens(smollm2_tokenizer, tmp_path):
    from llm_installer.data.prepare import make_truncate

    path = tmp_path / "med.json"
    context = " ".join(f"word{i}" for i in range(200))
    path.write_text(json.dumps([{"question": "Dose?", "answer": "5 mg.", "context": context}]))
    hints = {"medical_qa": {"add_context": True, "max_context_length": 10}}
    result = load_records(
        str(path), prefer=["medical_qa"], preprocessing=hints, truncate=make_truncate(smollm2_tokenizer)
    )
    (record,) = result.records
    assert record.format == "medical_qa"
    user = record.messages[0]["content"]
    kept = user.removeprefix("Context:\n").split("\n\nQuestion: ")[0]
    assert len(smollm2_tokenizer(kept, add_special_tokens=False)["input_ids"]) == 10
    assert context.startswith(kept) and user.endswith("\n\nQuestion: Dose?")
    # without a handler asking for medical_qa the same record is plain qa
    assert load_records(str(path)).records[0].format == "qa"


def test_code_instruct_without_language_tags(smollm2_tokenizer):
    ctx = ConvertContext(preprocessing={"code_instruct": {"language_tags": False}})
    record = FORMATS["code_instruct"].convert(
        {"instruction": "x", "code": "y = 1", "language": "python"}, ctx
    )
    assert record.messages[-1]["content"] == "```\ny = 1\n```"


def test_vision_and_video_formats_resolve_media(tmp_path):
    (tmp_path / "img.png").write_bytes(b"png")
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(3):
        (frames / f"f{i}.png").write_bytes(b"png")
    rows = [
        {"image": "img.png", "question": "What?", "answer": "A cat."},
        {"image": "img.png", "caption": "A cat on a mat."},
        {"frames": ["clip/f0.png", "clip/f1.png"], "question": "Moving?", "answer": "Yes."},
        {"video": "clip", "question": "How many?", "answer": "3."},
    ]
    path = tmp_path / "media.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    recs = load_records(str(path)).records
    assert [r.format for r in recs] == ["vision_qa", "image_caption", "video_qa", "video_qa"]
    assert recs[0].images == [str(tmp_path / "img.png")]
    assert recs[1].messages == [u("Describe this image."), a("A cat on a mat.")]
    assert recs[2].videos == [[str(frames / "f0.png"), str(frames / "f1.png")]]
    assert recs[3].videos == [[str(frames / f"f{i}.png") for i in range(3)]]


def test_train_on_inputs_trains_every_token(smollm2_tokenizer):
    record = Record([u("Hi"), a("Hello")], None, format="openai")
    _, example = encode_one(smollm2_tokenizer, record, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_system_prompt_setting_is_used_unless_the_record_has_one(smollm2_tokenizer):
    rendered, _ = encode_one(smollm2_tokenizer, Record([u("Hi"), a("Yo")], None), system_prompt="Be terse.")
    assert rendered.text.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert DEFAULT_SYSTEM not in rendered.text
    own = Record([s("Mine."), u("Hi"), a("Yo")], None)
    rendered, _ = encode_one(smollm2_tokenizer, own, system_prompt="Be terse.")
    assert "Mine." in rendered.text and "Be terse." not in rendered.text


def test_template_without_system_role_gets_the_system_prompt_folded_into_the_user_turn(smollm2_tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    record = Record([s("Rules."), u("Hi"), a("Yo")], None)
    rendered, example = encode_one(smollm2_tokenizer, record, chat_template=template)
    assert rendered.text == "<|im_start|>user\nRules.\n\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert trained_runs(smollm2_tokenizer, example) == ["Yo" + END]


def test_template_that_changes_content_falls_back_to_per_record_renders(smollm2_tokenizer):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    record = Record([u("  Hi  "), a("  Answer here.  "), u("more"), a("Second.")], None)
    rendered, example = encode_one(smollm2_tokenizer, record, chat_template=template)
    assert "  Answer" not in rendered.text
    assert trained_runs(smollm2_tokenizer, example) == ["Answer here." + END, "Second." + END]


def test_template_without_end_token_gets_eos_appended_and_trained(smollm2_tokenizer):
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    rendered, example = encode_one(
        smollm2_tokenizer, Record([u("Hi"), a("Yo")], None), chat_template=template
    )
    assert rendered.text == "user: Hi\nassistant: Yo\n" + END
    # " Yo" is one token holding the space before the answer: a token overlapping the answer is trained
    assert trained_runs(smollm2_tokenizer, example) == [" Yo\n" + END]


def test_template_refusal_is_a_rejected_record(smollm2_tokenizer, tmp_path):
    template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    smollm2_tokenizer_copy = smollm2_tokenizer
    path = tmp_path / "d.jsonl"
    good = {"messages": [u("a"), a("b")]}
    bad = {"messages": [u("a"), u("again"), a("b")]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    original = smollm2_tokenizer_copy.chat_template
    try:
        smollm2_tokenizer_copy.chat_template = template
        data = prepare_dataset(str(path), smollm2_tokenizer_copy, None, DataSettings(shuffle=False))
    finally:
        smollm2_tokenizer_copy.chat_template = original
    assert len(data.train) == 1
    assert data.stats["reject_reasons"] == {
        "openai: the chat template refused this conversation: roles must alternate": 1
    }


def test_truncation_never_silently_drops_an_answer(smollm2_tokenizer, tmp_path):
    long_question = "word " * 300
    rows = [
        {"instruction": long_question, "output": "The answer."},  # answer entirely past the limit
        {"instruction": "Short?", "output": "Yes " * 300},  # answer partly kept
        {"instruction": "Fine?", "output": "Fine."},
    ]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    settings = DataSettings(max_seq_length=64, shuffle=False, rejects_path=str(tmp_path / "rejects.jsonl"))
    data = prepare_dataset(str(path), smollm2_tokenizer, None, settings)
    assert data.stats["dropped_too_long"] == 1
    assert data.stats["truncated"] == 1
    assert len(data.train) == 2
    assert all(len(e["input_ids"]) <= 64 for e in data.train)
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["origin"] == f"{path}#0"
    assert "longer than max_seq_length=64" in rejects[0]["reason"]


def test_collate_keeps_eos_label_when_pad_is_eos(smollm2_tokenizer):
    from llm_installer.data.collate import collate

    assert smollm2_tokenizer.pad_token_id == smollm2_tokenizer.eos_token_id  # SmolLM2: <|im_end|> pads
    renderer = Renderer(smollm2_tokenizer)
    recs = [
        Record([u("Hi"), a("Yo")], None),
        Record([u("A longer question here"), a("A longer answer")], None),
    ]
    examples = renderer.encode([renderer.render(r) for r in recs])
    batch = collate(examples, pad_token_id=smollm2_tokenizer.pad_token_id)
    short = len(examples[0]["input_ids"])
    eos_positions = [i for i, t in enumerate(examples[0]["input_ids"]) if t == smollm2_tokenizer.eos_token_id]
    last_answer_eos = eos_positions[-1]
    assert batch["labels"][0, last_answer_eos].item() == smollm2_tokenizer.eos_token_id
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, short:] == 0).all()


def test_unsupported_format_lists_what_the_handler_supports(smollm2_tokenizer, tmp_path):
    class TextOnlyHandler:
        """Shaped like a BaseHandler for the parts the data system reads."""

        name = "text-only"

        def get_training_parameters(self):
            return {"dataset_formats": ["alpaca", "sharegpt"]}

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as err:
        prepare_dataset(str(path), smollm2_tokenizer, TextOnlyHandler(), DataSettings())
    assert str(err.value) == (
        "the model's handler 'text-only' does not support dataset format qa (1 record); "
        "it supports: alpaca, sharegpt (convert the data or use another model)"
    )


def test_other_end_of_turn_tokens_are_trained(smollm2_tokenizer):
    """Gemma/Llama-3 style: the turn closes with a different special token; it is trained after answers."""
    template = (
        "{% for m in messages %}{{ '<file_sep>' + m['role'] + '\n' + m['content'] + '<|endoftext|>\n' }}"
        "{% endfor %}"
    )
    record = Record([u("Q1"), a("A1"), u("Q2"), a("A2")], None)
    rendered, example = encode_one(smollm2_tokenizer, record, chat_template=template)
    assert rendered.text.endswith("assistant\nA2<|endoftext|>\n")
    assert trained_runs(smollm2_tokenizer, example) == ["A1<|endoftext|>", "A2<|endoftext|>"]


def test_a_next_role_marker_is_not_trained_as_end_of_turn(smollm2_tokenizer):
    """`<file_sep>` is special but does not end a turn: the answer is closed with an appended EOS."""
    template = "{% for m in messages %}{{ '<file_sep>' + m['role'] + '\n' + m['content'] }}{% endfor %}"
    rendered, example = encode_one(smollm2_tokenizer, Record([u("Q1"), a("A1"), u("Q2"), a("A2")], None),
                                   chat_template=template)  # fmt: skip
    assert rendered.text.endswith("<file_sep>assistant\nA2" + END)
    assert trained_runs(smollm2_tokenizer, example) == ["A1", "A2" + END]


def test_trimming_template_is_checked_on_every_record(smollm2_tokenizer):
    """Llama-3-style `| trim`: a first record without spaces must not make later ones trust the fast path."""
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    renderer = Renderer(smollm2_tokenizer, chat_template=template)
    assert renderer.verify_all
    assert not Renderer(smollm2_tokenizer).verify_all  # SmolLM2's own template never looks inside contents
    records = [Record([u("Hi"), a("Plain.")], None), Record([u(" Hi "), a("  Padded answer.\n")], None)]
    rendered = [renderer.render(r) for r in records]
    for r, rec in zip(rendered, records, strict=True):
        assert r.text == smollm2_tokenizer.apply_chat_template(
            rec.messages, tokenize=False, chat_template=template
        )
    examples = renderer.encode(rendered)
    assert trained_runs(smollm2_tokenizer, examples[0]) == ["Plain." + END]
    assert trained_runs(smollm2_tokenizer, examples[1]) == ["Padded answer." + END]


def test_chat_records_carry_top_level_images_and_drop_literal_placeholders(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("cat.png", "dog.png"):
        (tmp_path / "img" / name).write_bytes(b"png")
    cat, dog = str(tmp_path / "img" / "cat.png"), str(tmp_path / "img" / "dog.png")
    rows = [  # LLaMA-Factory openai / sharegpt layouts, LLaVA's single "image", no placeholder at all
        {
            "messages": [{"role": "user", "content": "<image>What is this?"}, a("A cat.")],
            "images": ["img/cat.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "Compare <image> and\n<image>\nplease."},
                {"from": "gpt", "value": "Both are pets."},
            ],
            "images": ["img/cat.png", "img/dog.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWho?"},
                {"from": "gpt", "value": "A dog."},
            ],
            "image": "img/dog.png",
        },
        {"messages": [s("Sys"), u("Describe it."), a("A cat.")], "images": ["img/cat.png"]},
        {
            "messages": [u("Look."), a("Ok."), {"role": "user", "content": "<image>"}, a("A dog.")],
            "images": ["img/dog.png"],
        },
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = load_records(str(path))
    assert result.rejects == []
    recs = result.records
    assert [r.format for r in recs] == ["openai", "sharegpt", "sharegpt", "openai", "openai"]
    assert [r.images for r in recs] == [[cat], [cat, dog], [dog], [cat], [dog]]
    assert recs[0].messages == [u("What is this?"), a("A cat.")]
    assert recs[1].messages == [u("Compare and\nplease."), a("Both are pets.")]
    assert recs[2].messages == [u("Who?"), a("A dog.")]
    assert recs[3].messages == [s("Sys"), u("Describe it."), a("A cat.")]
    assert recs[4].messages == [u("Look."), a("Ok."), u(""), a("A dog.")]


@pytest.mark.parametrize("image_token", ["<image>", "<start_of_image>"])
def test_image_placeholder_is_the_models_own_and_appears_once_per_image(
    smollm2_tokenizer, tmp_path, image_token
):
    (tmp_path / "cat.png").write_bytes(b"png")
    raw = {
        "messages": [{"role": "user", "content": "<image>What is this?"}, a("A cat.")],
        "images": ["cat.png"],
    }
    record = FORMATS["openai"].convert(raw, ConvertContext(base_dir=tmp_path))
    rendered, example = encode_one(smollm2_tokenizer, record, image_token=image_token)
    assert rendered.text.count(image_token) == 1
    assert f"user\n{image_token}\nWhat is this?{END}" in rendered.text
    if image_token != "<image>":
        assert "<image>" not in rendered.text
    assert trained_runs(smollm2_tokenizer, example) == ["A cat." + END]


def test_image_placeholder_count_mismatch_is_a_reject(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"png")
    rows = [
        {"messages": [u("<image> and <image>?"), a("One.")], "images": ["cat.png"]},
        {
            "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}],
            "images": [],
        },
        {"messages": [u("<image>Hi"), a("<image>")], "images": ["cat.png", "cat.png"]},
        {"messages": [u("Hi"), a("Yo")], "images": ["missing.png"]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = load_records(str(path))
    assert result.records == []
    assert [(r.origin, r.reason) for r in result.rejects] == [
        (f"{path}:1", "openai: 2 <image> placeholder(s) in the text but 1 image(s) given"),
        (f"{path}:2", "sharegpt: 1 <image> placeholder(s) in the text but 0 image(s) given"),
        (f"{path}:3", "openai: turn 1 (assistant): <image> placeholder outside a user turn"),
        (f"{path}:4", "openai: images not found: missing.png"),
    ]


def test_text_only_chat_records_are_unchanged():
    for raw in (
        {"messages": [u("What does <image> mean in HTML?"), a("Nothing.")]},
        {"messages": [u("What does <image> mean in HTML?"), a("Nothing.")], "images": None},
        {"messages": [u("Hi"), a("Yo")], "images": []},
    ):
        record = FORMATS["openai"].convert(raw, ConvertContext())
        assert record.messages == raw["messages"] and record.images == []
