"""Rendering records into token ids and labels: the chat template plus our own loss mask.

Masking does not rely on `{% generation %}` markers (SmolLM2's template and most others lack them).
Instead each assistant message's *character span* in the rendered text is known, and after batch
tokenization with offsets every token overlapping a trained span keeps its label; everything else gets
-100. A trained span is the answer's content plus the end-of-turn token that follows it, so the model
learns to stop. That token is the model's one end-of-turn token (`ChatFormat.end_of_turn`, passed in by
training; by default found the same way, from what the template writes after an answer: see
llm_installer/chat_format.py) — `chat`, `start` and `export` stop at exactly that token. When the
template closes the turn with no such token, the end-of-turn token (then the EOS) is appended after the
last answer and trained.

Speed: the template is rendered once per conversation *shape* (the sequence of roles) with sentinel
strings in place of the contents; each record's text is then the literal pieces joined with its contents,
with offsets known for free. The first record of each shape is checked against a real render, and every
record when the template looks inside contents (`| trim`, `.split`, `in content`); a record that differs
is rendered on its own, its answers located by rendering each prefix with `add_generation_prompt=True`.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any

from llm_installer.data.records import Record, RecordError

IGNORE_INDEX = -100
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")

_CONTENT_SENSITIVE = re.compile(
    r"content['\"]?\]?\s*(\||\.\s*(strip|split|startswith|endswith|replace|lstrip|rstrip)|\[)"
    r"|\bin\s+\w+(\.content|\[['\"]content['\"]\])"
)

# Used only when neither the tokenizer nor the handler has a chat template (a base model, no handler).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Rendered:
    """One record as text plus the character spans that carry loss; `add_special` for raw text."""

    text: str
    spans: list[tuple[int, int]]
    raw: bool = False  # text/completion: tokenized with the tokenizer's own specials, EOS appended
    answer_starts: list[int] = field(default_factory=list)  # char start of each answer (truncation report)


@dataclass
class _Shape:
    pieces: list[str]  # literal text around the contents: len(messages) + 1 pieces
    eot: list[int]  # per message: length of the trained end-of-turn text after it (assistant only)
    append_eos: bool  # the last answer is not closed by the end-of-turn token: append it and train it
    merge_system: bool = False
    strip: bool = False  # the template trims contents (`| trim`): join stripped contents
    verified: bool = False
    slow: bool = False
    error: str | None = None


class Renderer:
    """Turns records into `{"input_ids", "labels"}` for one tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        train_on_inputs: bool = False,
        image_token: str | None = None,
        video_token: str | None = None,
        end_of_turn: str | None = None,
    ) -> None:
        """`end_of_turn`: the token trained after each answer (the model's ChatFormat.end_of_turn);
        None finds it from the template as resolve_chat_format does (its closer, else the EOS)."""
        from llm_installer.chat_format import end_token_for

        self.tokenizer = tokenizer
        template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        if isinstance(template, dict):  # several named templates: the default one renders conversations
            template = template.get("default") or next(iter(template.values()))
        self.template: str = template
        self.system_prompt = system_prompt
        self.train_on_inputs = train_on_inputs
        self.image_token = image_token
        self.video_token = video_token
        self.eos_token: str | None = getattr(tokenizer, "eos_token", None)
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        # Only the one token that ends a turn is trained after an answer: a template that goes straight on
        # to the next role marker (`<|user|>`) must not teach the model to emit that marker, and a token
        # that generation does not stop at must not be taught either.
        self.end_token: str | None = end_of_turn or end_token_for(tokenizer, self.template)
        self.end_tokens = [self.end_token] if self.end_token else []
        self._shapes: dict[tuple[str, ...], _Shape] = {}
        # A template that looks inside contents (trims them, splits them, tests `'x' in content`) may
        # render one record of a shape like the sentinels and the next one differently: check every record.
        self.verify_all = bool(_CONTENT_SENSITIVE.search(self.template))

    # ---- text rendering --------------------------------------------------------------------------

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
        )

    def _eot_length(self, following: str) -> int:
        """Length of the end-of-turn text to train: up to and including the first special token, if it
        comes right after the answer (only whitespace before it)."""
        stripped = following.lstrip()
        lead = len(following) - len(stripped)
        for s in self.end_tokens:
            if stripped.startswith(s):
                return lead + len(s)
        return 0

    def _build_shape(self, roles: tuple[str, ...]) -> _Shape:
        merge = False
        try:
            text = self._apply([{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)])
        except Exception as exc:  # jinja TemplateError / raise_exception in the template
            if roles and roles[0] == "system" and len(roles) > 1:
                merge = True
                try:
                    text = self._apply(
                        [{"role": r, "content": _SENTINEL.format(i + 1)} for i, r in enumerate(roles[1:])]
                    )
                except Exception as exc2:
                    return _Shape([], [], False, error=_short(exc2))
            else:
                return _Shape([], [], False, error=_short(exc))
        parts = _SENTINEL_RE.split(text)
        order = [int(x) for x in parts[1::2]]
        expected = list(range(1 if merge else 0, len(roles)))
        if order != expected:
            return _Shape([], [], False, merge_system=merge, slow=True)
        pieces = parts[0::2]
        if merge:  # message 0 (system) is folded into message 1: an empty slot before it
            pieces = [pieces[0], ""] + pieces[1:]
        eot = [0] * len(roles)
        append_eos = False
        for i, role in enumerate(roles):
            if role == "assistant":
                eot[i] = self._eot_length(pieces[i + 1])
        last = max((i for i, r in enumerate(roles) if r == "assistant"), default=None)
        if last is not None and eot[last] == 0 and self.end_token:
            append_eos = True
        return _Shape(pieces, eot, append_eos, merge_system=merge)

    def _messages(self, record: Record) -> list[dict[str, str]]:
        messages = [dict(m) for m in record.messages or []]
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        markers = ""
        if record.images and self.image_token:
            markers += self.image_token * len(record.images)
        if record.videos and self.video_token:
            markers += self.video_token * len(record.videos)
        if markers:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is not None and self.image_token not in first_user["content"]:
                first_user["content"] = markers + "\n" + first_user["content"]
        return messages

    def render(self, record: Record) -> Rendered:
        """The record's text and trained character spans (no tokenization)."""
        if record.text is not None:
            return Rendered(record.text, [(0, len(record.text))], raw=True)
        if record.format == "completion":
            prompt, completion = record.messages[0]["content"], record.messages[1]["content"]
            text = prompt + completion
            return Rendered(text, [(len(prompt), len(text))], raw=True, answer_starts=[len(prompt)])
        messages = self._messages(record)
        roles = tuple(m["role"] for m in messages)
        shape = self._shapes.get(roles)
        if shape is None:
            shape = self._shapes[roles] = self._build_shape(roles)
        if shape.error:
            raise RecordError(f"the chat template refused this conversation: {shape.error}")
        if shape.merge_system:
            messages = [dict(m) for m in messages]
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages[0] = {"role": "system", "content": ""}
        real_messages = messages[1:] if shape.merge_system else messages
        out = None
        if not shape.slow:
            out = self._fast(shape, messages)
            if self.verify_all or not shape.verified:
                real = self._apply(real_messages)
                if not self._same(shape, real, out) and not shape.verified and not shape.strip:
                    # templates such as Llama 3's trim each content: try the shape with stripped contents
                    shape.strip = True
                    out = self._fast(shape, messages)
                    if not self._same(shape, real, out):
                        shape.strip = False
                        out = None
                elif not self._same(shape, real, out):
                    out = None
                if out is not None:
                    shape.verified = True
                elif not self.verify_all:
                    shape.slow = True  # the first record already differs: render this shape per record
        if out is None:
            out = self._slow(real_messages, shape)
        if self.train_on_inputs:
            out.spans = [(0, len(out.text))]
        return out

    def _same(self, shape: _Shape, real: str, out: Rendered) -> bool:
        return real == out.text or (shape.append_eos and real + self.end_token == out.text)

    def _fast(self, shape: _Shape, messages: list[dict[str, str]]) -> Rendered:
        chunks: list[str] = []
        spans: list[tuple[int, int]] = []
        starts: list[int] = []
        pos = 0
        for i, message in enumerate(messages):
            chunks.append(shape.pieces[i])
            pos += len(shape.pieces[i])
            content = message["content"].strip() if shape.strip else message["content"]
            chunks.append(content)
            if message["role"] == "assistant":
                spans.append((pos, pos + len(content) + shape.eot[i]))
                starts.append(pos)
            pos += len(content)
        chunks.append(shape.pieces[-1])
        text = "".join(chunks)
        if shape.append_eos:
            last = spans[-1]
            spans[-1] = (last[0], len(text) + len(self.end_token))
            text += self.end_token
        return Rendered(text, spans, answer_starts=starts)

    def _slow(self, messages: list[dict[str, str]], shape: _Shape) -> Rendered:
        """Per-record render; each answer is located after the render of its prefix + generation prompt."""
        try:
            text = self._apply(messages)
        except Exception as exc:
            raise RecordError(f"the chat template refused this conversation: {_short(exc)}") from None
        spans: list[tuple[int, int]] = []
        starts: list[int] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._apply(messages[:k], add_generation_prompt=True) if k else ""
            start = text.find(message["content"].strip(), len(prefix) if text.startswith(prefix) else 0)
            if start < 0:
                raise RecordError(f"cannot find answer {k} in the rendered chat template output")
            end = start + len(message["content"].strip())
            spans.append((start, end + self._eot_length(text[end:])))
            starts.append(start)
        last = messages[-1]
        if spans and last["role"] == "assistant" and self.end_token:
            s0, e0 = spans[-1]
            if e0 == starts[-1] + len(last["content"].strip()):  # no end-of-turn token closes the answer
                text = text[:e0] + self.end_token + text[e0:]
                spans[-1] = (s0, e0 + len(self.end_token))
        return Rendered(text, spans, answer_starts=starts)

    # ---- tokenization ------------------------------------------------------------------------------

    def encode(self, rendered: list[Rendered]) -> list[dict[str, Any]]:
        """Batch-tokenize rendered texts (one fast-tokenizer call per kind) and build labels."""
        out: list[dict[str, Any] | None] = [None] * len(rendered)
        for raw in (False, True):
            idx = [i for i, r in enumerate(rendered) if r.raw == raw]
            if not idx:
                continue
            ids_list, offsets_list = self._tokenize([rendered[i].text for i in idx], add_special=raw)
            for i, ids, offsets in zip(idx, ids_list, offsets_list, strict=True):
                out[i] = self._labels(rendered[i], ids, offsets)
        return out  # type: ignore[return-value]

    def _tokenize(self, texts: list[str], *, add_special: bool) -> tuple[list[list[int]], list[Any]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(
            self.tokenizer, "_tokenizer", None
        )
        if backend is not None and hasattr(backend, "encode_batch"):
            encs = backend.encode_batch(texts, add_special_tokens=add_special)
            return [e.ids for e in encs], [e.offsets for e in encs]
        enc = self.tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _labels(self, rendered: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> dict[str, Any]:
        """Labels from character spans: a token is trained when it overlaps a trained span."""
        ids = list(ids)
        spans = rendered.spans
        if rendered.raw and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            n = len(rendered.text)
            ids.append(self.eos_id)
            offsets = [*offsets, (n, n + 1)]
            spans = [(s, e + 1 if e == n else e) for s, e in spans]
        starts = [o[0] for o in offsets]
        ends = [o[1] for o in offsets]
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            lo = bisect_right(ends, s)  # first token ending after the span starts
            hi = bisect_left(starts, e)  # first token starting at/after the span ends
            labels[lo:hi] = ids[lo:hi]
        # token index where each answer starts: truncation reports lost answers from it
        first = [bisect_right(ends, a) for a in rendered.answer_starts]
        return {"input_ids": ids, "labels": labels, "answer_token_starts": first}


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
