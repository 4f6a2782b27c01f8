"""Preference pairs (DPO / ORPO data): formats, validation and rendering of a prompt with two answers.

A pair is a conversation history plus a chosen and a rejected final assistant answer. The loaders detect
the shapes below like every other format (`formats.FORMATS` names them), so rejects, `--strict`,
duplicates and `data inspect` behave as for supervised data:

- `preference`: `{"prompt", "chosen", "rejected"}`; each a string or a list of messages (a prompt list is
  the history, a chosen/rejected list holds the assistant turn, TRL's conversational form)
- `preference_chat`: `{"chosen": [...], "rejected": [...]}`, two whole conversations that share the history
  before their last answer (the implicit-prompt form)
- `sharegpt_preference` / `openai_preference`: LLaMA-Factory's ranking shape, `conversations` or
  `messages` holding the history and `chosen`/`rejected` one turn object each (`{"from": "gpt", ...}`)

Rendering goes through the supervised `Renderer` (the model's chat template and end-of-turn token): the
rule "loss on the answer's tokens only, end-of-turn included" lives there alone; a pair's completion is
the last labelled run of each rendered side and its prompt the tokens before it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from llm_installer.data.formats import ConvertContext, _system, parse_turns
from llm_installer.data.records import Record, RecordError

PREFERENCE_FORMATS = ("preference", "preference_chat", "sharegpt_preference", "openai_preference")
PROMPT_KEYS = ("prompt", "question", "instruction")
IGNORE_INDEX = -100


@dataclass
class PreferenceRecord(Record):
    """A record whose `messages` end with the chosen answer; `rejected` is the other final answer."""

    rejected: str = ""

    def key(self) -> tuple:
        return (*super().key(), self.rejected)

    def rejected_record(self) -> Record:
        """The same history closed by the rejected answer (rendered like any supervised record)."""
        messages = [*self.messages[:-1], {"role": "assistant", "content": self.rejected}]
        return Record(messages=messages, text=None, format=self.format, origin=self.origin)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rejected": self.rejected}


def _side(value: Any, name: str) -> list[Any]:
    """A chosen/rejected value as raw turns: a string is one assistant turn, an object one turn."""
    if value is None:
        raise RecordError(f"field '{name}' is missing")
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"'{name}' is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        if not value:
            raise RecordError(f"'{name}' is empty")
        return value
    raise RecordError(
        f"field '{name}' must be text, a message or a list of messages, got {type(value).__name__}"
    )


def _pair(history: list[Any], raw: dict, fmt: str) -> PreferenceRecord:
    """Both sides parsed after `history`; they must share it and differ in their final answer."""
    system = _system(raw)
    chosen, _ = parse_turns([*history, *_side(raw.get("chosen"), "chosen")], "chosen", system)
    rejected, _ = parse_turns([*history, *_side(raw.get("rejected"), "rejected")], "rejected", system)
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise RecordError(f"'{name}' must end with an assistant answer, not a {side[-1]['role']} turn")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("chosen and rejected follow different conversations: they must share the history")
    if not any(m["role"] == "user" for m in chosen[:-1]):
        raise RecordError("missing prompt: no user turn before the two answers")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise RecordError("chosen and rejected are identical: nothing to prefer")
    return PreferenceRecord(messages=chosen, text=None, format=fmt, rejected=rejected[-1]["content"])


def convert_preference(raw: Any, ctx: ConvertContext) -> Record:
    """`{"prompt", "chosen", "rejected"}` (prompt may be spelled question/instruction)."""
    key = next((k for k in PROMPT_KEYS if raw.get(k) is not None), None)
    prompt = raw.get(key) if key else None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("missing prompt: 'prompt' is empty")
        history: list[Any] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        history = prompt
    else:
        raise RecordError(f"field '{key}' must be text or a list of messages")
    return _pair(history, raw, "preference")


def convert_preference_chat(raw: Any, ctx: ConvertContext) -> Record:
    """`{"chosen": [...], "rejected": [...]}`: two conversations, the shared part is the prompt."""
    if isinstance(raw.get("chosen"), str) or isinstance(raw.get("rejected"), str):
        raise RecordError(
            "missing prompt: chosen and rejected are plain answers, so a 'prompt' field is needed"
        )
    return _pair([], raw, "preference_chat")


def _ranking(key: str, fmt: str):
    def convert(raw: Any, ctx: ConvertContext) -> Record:
        history = raw.get(key)
        if not isinstance(history, list) or not history:
            raise RecordError(f"missing prompt: field '{key}' must be a non-empty list of turns")
        return _pair(history, raw, fmt)

    return convert


CONVERTERS = {
    "preference": convert_preference,
    "preference_chat": convert_preference_chat,
    "sharegpt_preference": _ranking("conversations", "sharegpt_preference"),
    "openai_preference": _ranking("messages", "openai_preference"),
}


def convert(name: str, raw: Any, ctx: ConvertContext) -> Record:
    """Entry point for formats.FORMATS (imported lazily there: this module imports formats)."""
    if not isinstance(raw, dict):
        raise RecordError(f"expected an object with prompt/chosen/rejected, got {type(raw).__name__}")
    return CONVERTERS[name](raw, ctx)


# ---- rendering -----------------------------------------------------------------------------------------


def _last_run(labels: list[int]) -> tuple[int, int] | None:
    """(start, end) of the last run of labelled tokens: the final answer and its end-of-turn token."""
    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE_INDEX), None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def split_pair(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, list[int]]:
    """Encoded chosen/rejected conversations -> `{"prompt_ids", "chosen_ids", "rejected_ids"}`."""
    rc, rr = _last_run(chosen["labels"]), _last_run(rejected["labels"])
    if rc is None or rr is None:
        raise RecordError("the rendered pair has no answer tokens to compare")
    prompt = chosen["input_ids"][: rc[0]]
    if rejected["input_ids"][: rr[0]] != prompt:
        raise RecordError("chosen and rejected render to different prompts through the chat template")
    return {
        "prompt_ids": list(prompt),
        "chosen_ids": list(chosen["input_ids"][rc[0] : rc[1]]),
        "rejected_ids": list(rejected["input_ids"][rr[0] : rr[1]]),
    }


def encode_pairs(
    records: list[Record], renderer: Any, max_seq_length: int, stats: dict[str, Any], rejects: list[Any]
) -> list[dict[str, list[int]]]:
    """Render + tokenize both sides of every pair; unusable pairs become rejects with their reason."""
    from llm_installer.data.prepare import _progress
    from llm_installer.data.records import Reject

    out: list[dict[str, list[int]]] = []
    with _progress(len(records), "tokenizing pairs") as progress:
        task = progress.add_task("tokenizing pairs", total=len(records))
        for record in records:
            progress.advance(task)
            try:
                if not isinstance(record, PreferenceRecord):
                    raise RecordError("not a preference pair (needs chosen and rejected answers)")
                sides = renderer.encode([renderer.render(record), renderer.render(record.rejected_record())])
                pair = split_pair(*sides)
            except RecordError as exc:
                rejects.append(Reject(record.origin, f"{record.format}: {exc}", record.to_dict()))
                continue
            room = max_seq_length - len(pair["prompt_ids"])
            if room < 2:
                rejects.append(
                    Reject(
                        record.origin,
                        f"{record.format}: the prompt alone has {len(pair['prompt_ids'])} tokens, "
                        f"max_seq_length={max_seq_length} leaves no room for the answers (raise --max-seq-length)",
                        record.to_dict(),
                    )
                )
                stats["dropped_too_long"] += 1
                continue
            if max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) > room:
                pair["chosen_ids"], pair["rejected_ids"] = (
                    pair["chosen_ids"][:room],
                    pair["rejected_ids"][:room],
                )
                stats["truncated"] += 1
            out.append(pair)
    return out


def _fingerprint(sources: list[Any], tokenizer: Any, chat_format: Any, settings: Any) -> str:
    from llm_installer.data.loaders import source_fingerprint
    from llm_installer.data.prepare import tokenizer_fingerprint

    settings_key = {k: v for k, v in settings.to_dict().items() if k not in ("cache_dir", "rejects_path")}
    payload = {
        "kind": "preference-1",
        "sources": [source_fingerprint(s) for s in sources],
        "tokenizer": tokenizer_fingerprint(tokenizer, chat_format.template),
        "end_of_turn": chat_format.end_of_turn,
        "settings": settings_key,
    }
    return hashlib.blake2b(
        json.dumps(payload, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


def _check_pairs(spec: Any, records: list[Record]) -> None:
    from llm_installer.errors import DataError

    other = sorted({r.format for r in records if not isinstance(r, PreferenceRecord)})
    if other:
        raise DataError(
            f"--data {spec}: preference training needs pairs with chosen and rejected answers, but the data is "
            f"{', '.join(other)}; see docs/data.md (preference pairs) or train it without --method dpo/orpo"
        )


def prepare_pairs(spec: str | os.PathLike, tokenizer: Any, handler: Any, settings: Any) -> Any:
    """Load, validate, render, split preference pairs -> PreparedData whose examples are token-id pairs.

    Not cached: pairs are rendered twice per record but preference sets are small next to SFT corpora."""
    from llm_installer.chat_format import handler_chat_format
    from llm_installer.data.load import load_records
    from llm_installer.data.loaders import resolve_spec
    from llm_installer.data.prepare import PreparedData, _say_skipped, split_records, write_rejects
    from llm_installer.data.render import Renderer
    from llm_installer.errors import DataError

    if handler is not None and hasattr(handler, "apply_tokenizer_config"):
        handler.apply_tokenizer_config(tokenizer)
    chat_format = handler_chat_format(handler, tokenizer)
    notes: list[str] = []
    sources = resolve_spec(spec, notes)
    result = load_records(spec, format=settings.format, strict=settings.strict, sources=sources)
    _check_pairs(spec, result.records)
    rejects = list(result.rejects)
    dup = {origin for origin, _ in result.duplicates}
    records = [r for r in result.records if r.origin not in dup]
    if not records:
        first = f" (first: {rejects[0].origin}: {rejects[0].reason})" if rejects else ""
        raise DataError(f"{spec}: no usable preference pairs; {len(rejects)} rejected{first}")
    train_records, val_records = split_records(records, settings)
    renderer = Renderer(
        tokenizer,
        chat_template=chat_format.template,
        end_of_turn=chat_format.end_of_turn,
        system_prompt=settings.system_prompt,
    )
    stats: dict[str, Any] = {"truncated": 0, "answers_cut": 0, "dropped_too_long": 0}
    n_load = len(rejects)
    train = encode_pairs(train_records, renderer, settings.max_seq_length, stats, rejects)
    validation = encode_pairs(val_records, renderer, settings.max_seq_length, stats, rejects)
    if settings.strict and len(rejects) > n_load:
        bad = rejects[n_load]
        raise DataError(f"{bad.origin}: {bad.reason} (--strict stops at the first bad record)")
    if not train:
        raise DataError(f"{spec}: no training pairs left after rendering; {len(rejects)} rejected")
    stats.update(
        records_read=len(result.records) + len(result.rejects),
        records_used=len(train) + len(validation),
        formats=result.formats,
        rejects=len(rejects),
        duplicates=len(result.duplicates),
        train_examples=len(train),
        validation_examples=len(validation),
        notes=notes + result.notes,
        cached=False,
    )
    written = None
    if settings.rejects_path and rejects:
        from pathlib import Path

        written = Path(settings.rejects_path)
        write_rejects(written, [r.to_json() for r in rejects])
    _say_skipped(len(rejects), written)
    fingerprint = _fingerprint(sources, tokenizer, chat_format, settings)
    return PreparedData(train, validation, stats, fingerprint, written, settings)


def describe_pair(pair: dict[str, list[int]], tokenizer: Any) -> list[tuple[str, str, str]]:
    """(label, text, masked-token text) rows for `data inspect`: the prompt (no loss) and both answers,
    whose tokens all carry the loss (the end-of-turn token included)."""
    prompt = tokenizer.decode(pair["prompt_ids"])
    rows = [("prompt (no loss)", prompt, "")]
    for side in ("chosen", "rejected"):
        ids = pair[f"{side}_ids"]
        rows.append(
            (
                f"{side} ({len(ids)} trained tokens)",
                tokenizer.decode(ids),
                "|".join(tokenizer.decode([t]) for t in ids),
            )
        )
    return rows


def inspect_pair(renderer: Any, record: Record, tokenizer: Any) -> dict[str, list[str]] | None:
    """The pair `data inspect` shows: prompt tokens (masked) and each answer's tokens (trained), as
    training renders them; None for a record that is not a pair or does not render."""
    if not isinstance(record, PreferenceRecord):
        return None
    try:
        sides = renderer.encode([renderer.render(record), renderer.render(record.rejected_record())])
        pair = split_pair(*sides)
    except RecordError:
        return None
    return {k: [tokenizer.decode([t]) for t in pair[f"{k}_ids"]] for k in ("prompt", "chosen", "rejected")}


def print_pair(console: Any, pair: dict[str, list[str]], origin: str) -> None:
    """Both answers of a pair after the shared prompt: trained tokens green (or between « and »)."""
    from rich.text import Text

    plain = console.color_system is None
    console.print(
        f"\npair {origin}: the shared prompt (masked), then each answer; "
        "[green]green = trained (loss)[/green], [dim]dim = masked[/dim]",
        soft_wrap=True,
    )
    console.print(Text("".join(pair["prompt"]), style="dim"), soft_wrap=True)
    for side in ("chosen", "rejected"):
        text = Text(f"{side} ({len(pair[side])} trained tokens): ", style="bold")
        text.append("«" if plain else "")
        for token in pair[side]:
            text.append(token, style="bold green")
        text.append("»" if plain else "")
        console.print(text, soft_wrap=True)
