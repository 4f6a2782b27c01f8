"""One small converter per dataset format into the canonical `Record`.

Each converter takes one raw record (a dict from JSON/CSV/Parquet/HF, or a string from a .txt line) and
returns a `Record`, or raises `RecordError` with a short reason that ends up in the rejects file. The
`FORMATS` table also declares which keys identify each format; detect.py uses it.

Why converters are tiny and independent: a new format is one function plus one table row, and a bad
record in one format can never corrupt another.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_installer.data.records import Record, RecordError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
_SURROGATE = re.compile("[\udc80-\udcff]")

USER_ROLES = {"user", "human", "prompter", "customer", "patient", "client", "usr", "question"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt", "ai", "answer", "assistant_response"}
SYSTEM_ROLES = {"system", "sys"}
ROLE_KEYS = ("role", "from", "speaker", "author", "sender")
CONTENT_KEYS = ("content", "value", "text", "message", "utterance")
CHAT_LIST_KEYS = ("conversation", "dialog", "dialogue", "turns", "chat")
IMAGE_KEYS = ("image", "images", "image_path", "image_file")
VIDEO_KEYS = ("video", "frames", "video_frames", "videos")
DEFAULT_CAPTION_PROMPT = "Describe this image."
IMAGE_PLACEHOLDER = "<image>"  # the literal image placeholder of LLaVA / LLaMA-Factory conversation data


@dataclass
class ConvertContext:
    """What a converter may need beyond the raw record.

    `base_dir` resolves relative image paths (the data file's folder); `preprocessing` is the handler's
    `dataset_preprocessing` hints; `truncate(text, n)` cuts text to n tokens when a tokenizer is known
    (else n characters) — used for medical_qa's max_context_length.
    """

    base_dir: Path | None = None
    preprocessing: dict[str, dict[str, Any]] = field(default_factory=dict)
    truncate: Callable[[str, int], str] | None = None


def check_text(value: str, where: str) -> str:
    """Reject text that held undecodable bytes (surrogate-escaped when the file was read)."""
    if _SURROGATE.search(value):
        raise RecordError(f"{where} is not valid UTF-8 text (re-save the file as UTF-8)")
    return value


def get_text(raw: dict, keys: str | tuple[str, ...], *, required: bool = True) -> str | None:
    """The first present key of `keys` as non-empty text; numbers become text, other types are errors."""
    keys = (keys,) if isinstance(keys, str) else keys
    for key in keys:
        if key in raw and raw[key] is not None:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise RecordError(f"field '{key}' must be text, got {type(value).__name__}")
            value = check_text(str(value), f"field '{key}'")
            if not value.strip():
                if required:
                    raise RecordError(f"empty field '{key}'")
                return None
            return value
    if required:
        if any(key in raw for key in keys):  # there, but null: say so, not "missing"
            raise RecordError(f"field '{next(k for k in keys if k in raw)}' is null; give it text")
        raise RecordError(f"missing field '{keys[0]}'")
    return None


def _need_dict(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise RecordError(f"record is {_kind(raw)}, expected an object with fields")
    return raw


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def normalize_role(role: Any, index: int) -> str:
    if not isinstance(role, str):
        raise RecordError(f"turn {index}: role must be text, got {_kind(role)}")
    r = role.strip().lower()
    if r in USER_ROLES:
        return "user"
    if r in ASSISTANT_ROLES:
        return "assistant"
    if r in SYSTEM_ROLES:
        return "system"
    raise RecordError(
        f"turn {index}: unknown role '{role}' (use system, user/human or assistant/gpt/bot/model)"
    )


def _content(value: Any, index: int, images: list[str]) -> str:
    """Turn content: text, or an OpenAI-style list of parts (text parts joined, image parts collected)."""
    if isinstance(value, str):
        return check_text(value, f"turn {index}")
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind in ("image", "image_url"):
                    ref = part.get("image") or part.get("path") or part.get("url") or part.get("image_url")
                    if isinstance(ref, dict):
                        ref = ref.get("url") or ref.get("path")
                    if not isinstance(ref, str):
                        raise RecordError(f"turn {index}: image part without a path")
                    images.append(ref)
                else:
                    raise RecordError(f"turn {index}: unknown content part type '{kind}'")
            else:
                raise RecordError(f"turn {index}: content part is {_kind(part)}")
        return check_text("\n".join(texts), f"turn {index}")
    raise RecordError(f"turn {index}: content must be text, got {_kind(value)}")


def parse_turns(
    turns: Any, field_name: str, system: str | None = None
) -> tuple[list[dict[str, str]], list[str]]:
    """A list of turns with any role/content key spelling -> canonical messages (+ images from parts)."""
    if not isinstance(turns, list):
        raise RecordError(f"field '{field_name}' must be a list of turns, got {_kind(turns)}")
    if not turns:
        raise RecordError(f"field '{field_name}' is an empty list")
    messages: list[dict[str, str]] = []
    images: list[str] = []
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i}: expected an object with role and content, got {_kind(turn)}")
        role_key = next((k for k in ROLE_KEYS if k in turn), None)
        content_key = next((k for k in CONTENT_KEYS if k in turn), None)
        if role_key is None:
            raise RecordError(f"turn {i}: no role field (role/from/speaker); keys: {sorted(turn)}")
        if content_key is None:
            raise RecordError(f"turn {i}: no content field (content/value/text); keys: {sorted(turn)}")
        role = normalize_role(turn[role_key], i)
        content = _content(turn[content_key], i, images)
        if not content.strip():
            raise RecordError(f"turn {i} ({role}) has empty content")
        if role == "system" and messages:
            raise RecordError(f"turn {i}: a system message may only come first")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant turn to learn from")
    return messages, images


def _media_list(raw: dict, keys: tuple[str, ...]) -> tuple[str, Any]:
    for k in keys:
        if k in raw and raw[k] is not None:
            return k, raw[k]
    raise RecordError(f"missing field '{keys[0]}'")


def media_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llm-installer" / "media"


def _stored_image(data: bytes) -> str:
    """Image bytes from a dataset (no file of their own) kept once in the user cache, named by content."""
    digest = hashlib.sha256(data).hexdigest()[:32]
    path = media_cache_dir() / f"{digest}.img"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def _resolve_media(ref: Any, key: str, ctx: ConvertContext) -> str:
    if isinstance(ref, dict):  # Hugging Face Image feature: {"path": ..., "bytes": ...}
        data = ref.get("bytes")
        path = ref.get("path")
        if (
            isinstance(data, (bytes, bytearray))
            and data
            and not (isinstance(path, str) and Path(path).is_file())
        ):
            return _stored_image(bytes(data))
        ref = path
    elif hasattr(ref, "save") and hasattr(ref, "size"):  # a decoded PIL image
        import io

        buffer = io.BytesIO()
        ref.save(buffer, format="PNG")
        return _stored_image(buffer.getvalue())
    if not isinstance(ref, str) or not ref.strip():
        raise RecordError(f"field '{key}' must be a file path, got {_kind(ref)}")
    if ref.startswith(("http://", "https://")):
        raise RecordError(f"{key} '{ref}' is a URL; download it and give the file path (we work offline)")
    path = Path(ref).expanduser()
    if not path.is_absolute() and ctx.base_dir is not None:
        path = ctx.base_dir / path
    if not path.is_file():
        raise RecordError(f"{key} not found: {ref}")
    return str(path)


def images_of(raw: dict, ctx: ConvertContext) -> list[str]:
    key, value = _media_list(raw, IMAGE_KEYS)
    refs = value if isinstance(value, list) else [value]
    if not refs:
        raise RecordError(f"field '{key}' is an empty list")
    return [_resolve_media(r, key, ctx) for r in refs]


def frames_of(raw: dict, ctx: ConvertContext) -> list[list[str]]:
    """A video as a list of frame image paths, or a folder of frames (sorted by name)."""
    key, value = _media_list(raw, VIDEO_KEYS)
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute() and ctx.base_dir is not None:
            path = ctx.base_dir / path
        if path.is_dir():
            frames = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not frames:
                raise RecordError(f"{key} folder holds no frame images: {value}")
            return [frames]
        if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
            raise RecordError(
                f"{key} '{value}' is a video file; give its frames as a list of images or a folder"
            )
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"field '{key}' must be a list of frame paths")
    if all(isinstance(v, list) for v in value):  # several videos
        return [[_resolve_media(f, key, ctx) for f in v] for v in value]
    return [[_resolve_media(f, key, ctx) for f in value]]


def _strip_image_placeholders(text: str) -> str:
    """The text without its literal `<image>` placeholders (and the spaces/newline that set them off)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    out = pieces[0]
    for piece in pieces[1:]:
        left, right = out.rstrip(" \t"), piece.lstrip(" \t")
        if left.endswith("\n") and right.startswith("\n"):  # a placeholder on a line of its own
            right = right[1:]
        glue = " " if left and right and not left.endswith("\n") and not right.startswith("\n") else ""
        out = left + glue + right
    return out.strip()


def _take_image_placeholders(messages: list[dict[str, str]], n_images: int, offset: int) -> None:
    """A record with images: its literal `<image>` placeholders (LLaVA/LLaMA-Factory style) must match the
    images in number, and are taken out of the text; the renderer puts the model's own placeholder for
    every image at the start of the first user turn (as for image content parts). `offset` = messages
    added before the record's own turns (a top-level system), so reasons name the record's turn index."""
    count = 0
    for i, message in enumerate(messages):
        n = message["content"].count(IMAGE_PLACEHOLDER)
        if n and message["role"] != "user":
            where = f"turn {i - offset} ({message['role']})" if i >= offset else "field 'system'"
            raise RecordError(f"{where}: {IMAGE_PLACEHOLDER} placeholder outside a user turn")
        count += n
    if count and count != n_images:
        raise RecordError(
            f"{count} {IMAGE_PLACEHOLDER} placeholder(s) in the text but {n_images} image(s) given"
        )
    if count:
        for message in messages:
            if IMAGE_PLACEHOLDER in message["content"]:
                message["content"] = _strip_image_placeholders(message["content"])


def _system(raw: dict) -> str | None:
    return get_text(raw, ("system", "system_prompt"), required=False)


def _qa_messages(raw: dict, question: str, answer: str) -> list[dict[str, str]]:
    messages = []
    system = _system(raw)
    if system:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


# ---- converters -----------------------------------------------------------------------------------


def convert_alpaca(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    instruction = get_text(raw, "instruction")
    extra = get_text(raw, "input", required=False)
    output = get_text(raw, ("output", "response"))
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record(messages=_qa_messages(raw, prompt, output), text=None, format="alpaca")


def _conversation(raw: dict, key: str, fmt: str, ctx: ConvertContext) -> Record:
    """A conversation record: turns, images from content parts and from a top-level image key."""
    messages, images = parse_turns(raw[key], key, _system(raw))
    images = [_resolve_media(i, "image", ctx) for i in images]
    has_key = any(raw.get(k) is not None for k in IMAGE_KEYS)
    if has_key and _media_list(raw, IMAGE_KEYS)[1] != []:  # "images": [] is a text-only record
        images += images_of(raw, ctx)
    if images or has_key:
        _take_image_placeholders(messages, len(images), len(messages) - len(raw[key]))
    return Record(messages=messages, text=None, images=images, format=fmt)


def convert_sharegpt(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    if "conversations" not in raw:
        raise RecordError("missing field 'conversations'")
    return _conversation(raw, "conversations", "sharegpt", ctx)


def convert_openai(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    if "messages" not in raw:
        raise RecordError("missing field 'messages'")
    return _conversation(raw, "messages", "openai", ctx)


def convert_chat(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    key = next((k for k in CHAT_LIST_KEYS if k in raw), None)
    if key is None:
        raise RecordError(f"missing field '{CHAT_LIST_KEYS[0]}' (or {', '.join(CHAT_LIST_KEYS[1:])})")
    return _conversation(raw, key, "chat", ctx)


def convert_qa(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    question = get_text(raw, "question")
    answer = get_text(raw, "answer")
    context = get_text(raw, "context", required=False)
    prompt = f"{context}\n\n{question}" if context else question
    return Record(messages=_qa_messages(raw, prompt, answer), text=None, format="qa")


def convert_medical_qa(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    question = get_text(raw, "question")
    answer = get_text(raw, "answer")
    context = get_text(raw, "context", required=False)
    hints = ctx.preprocessing.get("medical_qa", {})
    if context and hints.get("add_context", True):
        limit = hints.get("max_context_length")  # tokens (characters when no tokenizer is at hand)
        if isinstance(limit, int) and limit > 0:
            if ctx.truncate is not None:
                context = ctx.truncate(context, limit)
            else:
                context = context[:limit]
        chars = hints.get("max_context_chars")
        if isinstance(chars, int) and chars > 0:
            context = context[:chars]
        prompt = f"Context:\n{context}\n\nQuestion: {question}"
    else:
        prompt = question
    return Record(messages=_qa_messages(raw, prompt, answer), text=None, format="medical_qa")


def convert_completion(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    prompt = get_text(raw, "prompt")
    completion = get_text(raw, "completion")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Record(messages=messages, text=None, format="completion")


def convert_text(raw: Any, ctx: ConvertContext) -> Record:
    if isinstance(raw, str):
        text = check_text(raw, "line")
        if not text.strip():
            raise RecordError("empty text")
    else:
        text = get_text(_need_dict(raw), ("text", "content"))
    return Record(messages=None, text=text, format="text")


def convert_vision_qa(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    question = get_text(raw, "question")
    answer = get_text(raw, "answer")
    images = images_of(raw, ctx)
    return Record(messages=_qa_messages(raw, question, answer), text=None, images=images, format="vision_qa")


def convert_image_caption(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    caption = get_text(raw, "caption")
    prompt = get_text(raw, ("prompt", "question"), required=False) or DEFAULT_CAPTION_PROMPT
    images = images_of(raw, ctx)
    return Record(
        messages=_qa_messages(raw, prompt, caption), text=None, images=images, format="image_caption"
    )


def convert_video_qa(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    question = get_text(raw, "question")
    answer = get_text(raw, "answer")
    videos = frames_of(raw, ctx)
    return Record(messages=_qa_messages(raw, question, answer), text=None, videos=videos, format="video_qa")


def convert_code_instruct(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    instruction = get_text(raw, "instruction")
    extra = get_text(raw, "input", required=False)
    code = get_text(raw, ("code", "output"))
    language = get_text(raw, ("language", "lang"), required=False) or ""
    explanation = get_text(raw, "explanation", required=False)
    tags = ctx.preprocessing.get("code_instruct", {}).get("language_tags", True)
    fence = f"```{language.strip().lower() if tags else ''}\n{code.strip(chr(10))}\n```"
    answer = f"{fence}\n\n{explanation}" if explanation else fence
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record(messages=_qa_messages(raw, prompt, answer), text=None, format="code_instruct")


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER = re.compile(r"^\(?([A-Za-z])[).:]?$")


def convert_multi_choice(raw: Any, ctx: ConvertContext) -> Record:
    raw = _need_dict(raw)
    question = get_text(raw, "question")
    key = "choices" if "choices" in raw else "options"
    choices = raw.get(key)
    if isinstance(choices, dict):
        items = [(str(k).strip().upper(), v) for k, v in choices.items()]
    elif isinstance(choices, list):
        if len(choices) > len(LETTERS):
            raise RecordError(f"field '{key}' has more than {len(LETTERS)} choices")
        items = list(zip(LETTERS, choices, strict=False))
    elif choices is None:
        raise RecordError("missing field 'choices'")
    else:
        raise RecordError(f"field '{key}' must be a list or an object, got {_kind(choices)}")
    if len(items) < 2:
        raise RecordError(f"field '{key}' needs at least two choices")
    for letter, text in items:
        if not isinstance(text, (str, int, float)) or isinstance(text, bool) or not str(text).strip():
            raise RecordError(f"choice {letter} must be non-empty text")
    items = [(letter, str(text)) for letter, text in items]
    answer = raw.get("answer")
    if answer is None:
        raise RecordError("missing field 'answer'")
    chosen: tuple[str, str] | None = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(items):
            chosen = items[answer]
    elif isinstance(answer, str):
        a = answer.strip()
        m = _LETTER.match(a)
        if m:
            chosen = next((it for it in items if it[0] == m.group(1).upper()), None)
        if chosen is None:
            chosen = next((it for it in items if it[1].strip().casefold() == a.casefold()), None)
        if chosen is None and a.isdigit() and 0 <= int(a) < len(items):
            chosen = items[int(a)]
    else:
        raise RecordError(f"field 'answer' must be a letter, index or choice text, got {_kind(answer)}")
    if chosen is None:
        raise RecordError(
            f"answer '{answer}' is not one of the choices {items[0][0]}-{items[-1][0]} (by letter, index or text)"
        )
    hints = ctx.preprocessing.get("multi_choice", {})
    if hints.get("shuffle_choices"):  # reproducible per question, so a re-run renders the same text
        import random

        texts = [text for _, text in items]
        random.Random(question).shuffle(texts)
        items = [(LETTERS[i], text) for i, text in enumerate(texts)]
        chosen = next(it for it in items if it[1] == chosen[1])
    prompt = question + "\n\n" + "\n".join(f"{letter}) {text}" for letter, text in items)
    style = hints.get("answer_format", "letter")
    answer_text = {"letter_only": chosen[0], "text": chosen[1]}.get(style, f"{chosen[0]}) {chosen[1]}")
    return Record(messages=_qa_messages(raw, prompt, answer_text), text=None, format="multi_choice")


def _preference(name: str) -> Callable[[Any, ConvertContext], Record]:
    """The converter of preference format `name`, imported on use (data/preference.py imports this module)."""

    def convert(raw: Any, ctx: ConvertContext) -> Record:
        from llm_installer.data.preference import convert as convert_pair

        return convert_pair(name, raw, ctx)

    return convert


@dataclass(frozen=True)
class FormatSpec:
    """A format: its converter and the key groups that identify it (each group: alternative spellings)."""

    name: str
    convert: Callable[[Any, ConvertContext], Record]
    required: tuple[tuple[str, ...], ...]
    auto: bool = True  # False: only detected when the handler asks for it (medical_qa looks like qa)
    example: str = ""


FORMATS: dict[str, FormatSpec] = {
    f.name: f
    for f in [
        FormatSpec(
            "alpaca",
            convert_alpaca,
            (("instruction",), ("output", "response")),
            example='{"instruction": ..., "input": ..., "output": ...}',
        ),
        FormatSpec(
            "sharegpt",
            convert_sharegpt,
            (("conversations",),),
            example='{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}',
        ),
        FormatSpec(
            "openai",
            convert_openai,
            (("messages",),),
            example='{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}',
        ),
        FormatSpec(
            "chat",
            convert_chat,
            (CHAT_LIST_KEYS,),
            example='{"turns": [{"speaker": "user", "text": ...}, ...]}',
        ),
        FormatSpec(
            "qa",
            convert_qa,
            (("question",), ("answer",)),
            example='{"question": ..., "answer": ..., "context": ...}',
        ),
        FormatSpec(
            "completion",
            convert_completion,
            (("prompt",), ("completion",)),
            example='{"prompt": ..., "completion": ...}',
        ),
        FormatSpec("text", convert_text, (("text",),), example='{"text": ...} or lines of a .txt file'),
        FormatSpec(
            "vision_qa",
            convert_vision_qa,
            (IMAGE_KEYS, ("question",), ("answer",)),
            example='{"image": "cat.png", "question": ..., "answer": ...}',
        ),
        FormatSpec(
            "image_caption",
            convert_image_caption,
            (IMAGE_KEYS, ("caption",)),
            example='{"image": "cat.png", "caption": ...}',
        ),
        FormatSpec(
            "video_qa",
            convert_video_qa,
            (VIDEO_KEYS, ("question",), ("answer",)),
            example='{"frames": ["f1.png", "f2.png"], "question": ..., "answer": ...}',
        ),
        FormatSpec(
            "medical_qa",
            convert_medical_qa,
            (("question",), ("answer",)),
            auto=False,
            example='{"question": ..., "answer": ..., "context": ...}',
        ),
        FormatSpec(
            "code_instruct",
            convert_code_instruct,
            (("instruction",), ("code",)),
            example='{"instruction": ..., "code": ..., "language": "python"}',
        ),
        FormatSpec(
            "multi_choice",
            convert_multi_choice,
            (("question",), ("choices", "options"), ("answer",)),
            example='{"question": ..., "choices": [...], "answer": "B"}',
        ),
        # ---- preference pairs (DPO/ORPO): converters in data/preference.py (hook of issue 15) ----
        *[
            FormatSpec(name, _preference(name), keys, example=example)
            for name, keys, example in (
                (
                    "preference",
                    (("prompt", "question", "instruction"), ("chosen",), ("rejected",)),
                    '{"prompt": ..., "chosen": ..., "rejected": ...}',
                ),
                (
                    "preference_chat",
                    (("chosen",), ("rejected",)),
                    '{"chosen": [messages], "rejected": [messages]}',
                ),
                (
                    "sharegpt_preference",
                    (("conversations",), ("chosen",), ("rejected",)),
                    '{"conversations": [...], "chosen": {"from": "gpt", ...}, "rejected": {...}}',
                ),
                (
                    "openai_preference",
                    (("messages",), ("chosen",), ("rejected",)),
                    '{"messages": [...], "chosen": {"role": "assistant", ...}, "rejected": {...}}',
                ),
            )
        ],
    ]
}
