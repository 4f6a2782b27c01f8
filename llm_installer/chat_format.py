"""One chat format per model: its template, the one token that ends an assistant turn, and the stop ids.

Why this module exists: training renders each answer with a chat template and trains the token that
closes it; the training report, `chat`, `start` and `export` must then prompt with the *same* template
and stop at the *same* token. When these were decided in several places (a list of known end-of-turn
spellings here, vocabulary membership there), a base model could be trained to end answers with a
marker its tokenizer splits into pieces (`<`, `end`, `_of`, `_turn`, `>`), which nothing stops on: the
model answered, then ran on to the token limit.

The rule, applied by `resolve_chat_format` (and through it by `BaseHandler.resolve_chat_format`):

* The end-of-turn token is the one the chosen template writes right after an assistant answer
  (`<|im_end|>` for ChatML, `<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3), found by rendering
  the template, not by a list of names. A template that writes nothing there (or plain text) ends turns
  with the EOS token, which the data renderer appends after the answer.
* That token must be ONE id in this tokenizer: it encodes to a single id, alone and inside text, and
  decodes back to itself (`single_token_id`). A template whose markers are split into pieces is not
  chosen.
* Candidates, first usable wins: a handler's own `get_chat_template` override; the tokenizer's own
  template; the handler's family template (base models have none); ChatML; a plain template that ends
  answers with the EOS token.
* The stop ids are the end-of-turn id first, then the EOS and the model config's eos ids (a model that
  emits its EOS has finished too), then any ids a handler's `get_stop_token_ids` override adds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_installer.errors import UserError

# What an assistant answer is replaced with to find what the template writes after it.
_SENTINEL = "\ue000answer\ue001"
# Text that looks like a turn marker: `<|im_end|>`, `<end_of_turn>`, `</s>`, `[/INST]`. When a template
# closes answers with such text and the tokenizer has no single token for it, the template is unusable.
_NAMES = {"chatml": "ChatML", "llama3": "Llama-3", "gemma": "Gemma", "phi3": "Phi-3", "mistral": "Mistral"}
_MARKER_RE = re.compile(r"<\|[^\s<>|]{1,48}\|>|</?[A-Za-z_][^\s<>]{0,48}>|\[/?[A-Z_]{2,24}\]")


@dataclass(frozen=True)
class ChatFormat:
    """The chat template a model is trained and served with, and the single token that ends its turns.

    `origin` is "tokenizer" (the tokenizer's own template), "handler" (a handler's get_chat_template
    override) or "fallback" (one of ours: `name` says which); `source` says the same in words, with why
    earlier candidates were not used.
    """

    template: str
    end_of_turn: str
    end_of_turn_id: int
    stop_token_ids: list[int] = field(default_factory=list)
    source: str = ""
    origin: str = "tokenizer"
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for adapter_info.json and the server's /info."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatFormat:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in keys})

    def describe(self) -> str:
        """One line for people: which template and which token ends a turn."""
        return f"end of turn {self.end_of_turn} (id {self.end_of_turn_id}); template: {self.source}"


def text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer inside a processor (vision-language models), or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's (or its processor's) own chat template; the default one of several named ones."""
    tok = text_tokenizer(tokenizer)
    own = getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default") or next(iter(own.values()), None)
    return own or None


def single_token_id(tokenizer: Any, text: str | None) -> int | None:
    """The id of `text` if this tokenizer encodes it as exactly one token, else None.

    Checked alone and inside text (a sentencepiece tokenizer may merge a marker with what precedes it),
    and by decoding back: being in the vocabulary is not enough, since a vocabulary entry that is not an
    added token is still cut into pieces when it appears in text.
    """
    if not text:
        return None
    tok = text_tokenizer(tokenizer)
    try:
        alone = tok.encode(text, add_special_tokens=False)
        inside = tok.encode("Hi." + text + "\n", add_special_tokens=False)
        back = tok.decode(alone, skip_special_tokens=False) if len(alone) == 1 else None
    except Exception:  # a tokenizer that cannot encode this text cannot end turns with it
        return None
    if len(alone) != 1 or alone[0] not in inside or (back or "").strip() != text.strip():
        return None
    unk = getattr(tok, "unk_token_id", None)
    if alone[0] == unk and text != getattr(tok, "unk_token", None):
        return None  # an unknown word, not a token
    return int(alone[0])


@dataclass(frozen=True)
class TurnEnd:
    """What a template writes right after an assistant answer."""

    token: str | None  # the single token that closes the turn, if there is one
    marker: str | None  # marker-looking text there that is NOT a single token (template unusable)
    error: str | None = None  # the template could not render a user/assistant exchange


def turn_end(tokenizer: Any, template: str) -> TurnEnd:
    """Render [user, assistant] with `template` and look at what follows the answer."""
    tok = text_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception as exc:  # jinja TemplateError, raise_exception() in the template
        return TurnEnd(None, None, error=str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "")
    if not isinstance(text, str) or _SENTINEL not in text:
        return TurnEnd(None, None, error="the template drops the answer's text")
    following = text.split(_SENTINEL, 1)[1].lstrip()
    if not following:
        return TurnEnd(None, None)
    candidates = [t for t in _added_tokens(tok) if following.startswith(t)]
    eos = getattr(tok, "eos_token", None)
    if eos and following.startswith(eos):
        candidates.append(eos)
    marker = _MARKER_RE.match(following)
    if marker:
        candidates.append(marker.group(0))
    for cand in sorted(set(candidates), key=len, reverse=True):
        if single_token_id(tok, cand) is not None:
            return TurnEnd(cand, None)
    return TurnEnd(None, marker.group(0) if marker else None)


def _added_tokens(tok: Any) -> list[str]:
    try:
        return [t for t in (tok.get_added_vocab() or {}) if t]
    except Exception:  # slow or custom tokenizers without added tokens
        return []


def end_token_for(tokenizer: Any, template: str) -> str | None:
    """The token that ends an answer under `template`: its own closer, else the EOS (None: neither)."""
    end = turn_end(tokenizer, template)
    if end.token:
        return end.token
    eos = getattr(text_tokenizer(tokenizer), "eos_token", None)
    return eos if single_token_id(tokenizer, eos) is not None else None


def _ids(value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [int(i) for i in items if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


def resolve_chat_format(
    tokenizer: Any,
    *,
    family: str | None = None,
    handler_template: str | None = None,
    handler_name: str = "base",
    config_eos_ids: Any = None,
    extra_stop_ids: Any = None,
) -> ChatFormat:
    """The chat format for `tokenizer` under the rule in this module's docstring.

    `family`: the handler's default template name (templates.TEMPLATES), used when the tokenizer has no
    template of its own. `handler_template`: a template a handler chose itself (its own
    get_chat_template), tried first. Raises UserError when no candidate has a single end-of-turn token.
    """
    from llm_installer.handlers import templates

    tok = text_tokenizer(tokenizer)
    eos = getattr(tok, "eos_token", None)
    eos_id = single_token_id(tok, eos)
    notes: list[str] = []
    own = own_template(tokenizer)
    candidates: list[tuple[str, str, str | None, str]] = []  # (template, origin, name, label)
    if handler_template and handler_template != own:
        candidates.append((handler_template, "handler", None, f"the {handler_name} handler's own template"))
    if own:
        candidates.append((own, "tokenizer", None, "the tokenizer's own chat template"))
    else:
        notes.append("the tokenizer has no chat template")
    for name in dict.fromkeys(n for n in (family, "chatml", "plain") if n in templates.TEMPLATES):
        if name == "plain":
            label = "plain fallback template, turns ended by the EOS token"
        elif name == family:
            label = f"the {handler_name} handler's fallback template ({name})"
        else:
            label = f"{_NAMES.get(name, name)} fallback template"
        candidates.append((templates.TEMPLATES[name], "fallback", name, label))

    for template, origin, name, label in candidates:
        if name is not None and name not in templates.TEXT_MARKERS:
            split = [m for m in templates.MARKERS.get(name, ()) if single_token_id(tok, m) is None]
            if split:
                notes.append(
                    f"{name} template not used: {', '.join(split)} not single tokens in this tokenizer"
                )
                continue
        end = turn_end(tok, template)
        if end.error is not None:
            notes.append(f"{label} not used: it cannot render a user/assistant exchange ({end.error})")
            continue
        if end.marker:
            notes.append(f"{label} not used: it ends turns with {end.marker}, which this tokenizer splits")
            continue
        token = end.token
        if token is None:  # the template writes no token after answers: the renderer appends the EOS
            if eos_id is None:
                notes.append(f"{label} not used: it writes no end token and the tokenizer has no single EOS")
                continue
            token = eos
        token_id = single_token_id(tok, token)
        assert token_id is not None  # turn_end only returns single tokens
        stops: list[int] = []
        for i in [token_id, *_ids(eos_id), *_ids(config_eos_ids), *_ids(extra_stop_ids)]:
            if i not in stops:
                stops.append(i)
        why = f" ({'; '.join(notes)})" if notes else ""
        return ChatFormat(template, token, token_id, stops, label + why, origin, name)
    raise UserError(
        "no chat template fits this tokenizer with a single end-of-turn token: " + "; ".join(notes)
    )


def handler_chat_format(handler: Any, tokenizer: Any) -> ChatFormat:
    """`handler.resolve_chat_format(tokenizer)`, or the base rule for a handler-shaped object without it."""
    if handler is not None and hasattr(handler, "resolve_chat_format"):
        return handler.resolve_chat_format(tokenizer)
    template = None
    if handler is not None and hasattr(handler, "get_chat_template"):
        template = handler.get_chat_template(tokenizer)
    return resolve_chat_format(
        tokenizer, handler_template=template, handler_name=str(getattr(handler, "name", "base"))
    )


_warned: set[str] = set()


def model_chat_format(info: Any, tokenizer: Any, adapter_dir: Any = None) -> ChatFormat:
    """The chat format serving and export use for an installed model (and its adapter).

    The model's handler decides, as in training. An adapter records the format it was trained with in
    adapter_info.json; when that differs from today's choice (an adapter from an older version, or a
    changed handler), the recorded one is used if its end token is still a single token here, because
    that is what the adapter learned to stop at.
    """
    from llm_installer.console import warn
    from llm_installer.handlers.base import BaseHandler

    try:
        from llm_installer.handlers.registry import get_handler

        handler = get_handler(info)
        fmt = handler.resolve_chat_format(tokenizer)
    except UserError:
        raise
    except Exception as exc:  # a broken (user) handler must not stop serving: the base rule decides
        warn(f"the model's handler could not give its chat format ({exc}); using the base rule")
        fmt = BaseHandler(info).resolve_chat_format(tokenizer)
    recorded = _recorded_format(adapter_dir)
    if recorded is None or (recorded.template == fmt.template and recorded.end_of_turn == fmt.end_of_turn):
        return fmt
    token_id = single_token_id(tokenizer, recorded.end_of_turn)
    key = f"{adapter_dir}:{recorded.end_of_turn}:{fmt.end_of_turn}"
    if token_id is None or end_token_for(tokenizer, recorded.template) != recorded.end_of_turn:
        if key not in _warned:
            _warned.add(key)
            warn(
                f"the adapter was trained ending turns with {recorded.end_of_turn}, which is not a single "
                f"token of this tokenizer; serving with {fmt.end_of_turn} ({fmt.source}): retrain the adapter"
            )
        return fmt
    if key not in _warned:
        _warned.add(key)
        warn(
            f"the adapter was trained with another chat format than the model's handler gives today; "
            f"using the adapter's (end of turn {recorded.end_of_turn}, {recorded.source})"
        )
    stops = [token_id, *(i for i in fmt.stop_token_ids if i != token_id)]
    return ChatFormat(
        recorded.template, recorded.end_of_turn, token_id, stops,
        f"recorded by the adapter's training: {recorded.source}", recorded.origin, recorded.name,
    )  # fmt: skip


def _recorded_format(adapter_dir: Any) -> ChatFormat | None:
    import json
    from pathlib import Path

    if adapter_dir is None:
        return None
    try:
        data = json.loads((Path(adapter_dir) / "adapter_info.json").read_text(encoding="utf-8"))
        recorded = data.get("chat_format")
        return (
            ChatFormat.from_dict(recorded)
            if isinstance(recorded, dict) and recorded.get("template")
            else None
        )
    except (OSError, ValueError, TypeError):
        return None
