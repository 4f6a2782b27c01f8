"""The canonical record every dataset format converts into, and the bookkeeping around loading.

One record type keeps the rest of the pipeline format-agnostic: rendering, masking, splitting and the
cache only ever see `Record`s. A record is either a conversation (`messages`) or raw language-model text
(`text`); images and video frames travel beside it as file paths so nothing heavy is read until a
vision-language processor needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """One record cannot be used; the message is the reason written to the rejects file."""


@dataclass
class Record:
    """One training example in canonical form.

    `messages` holds `{"role", "content"}` dicts (roles system/user/assistant); `text` holds raw text for
    language-model data (all tokens trained). `completion` format uses messages [user=prompt,
    assistant=completion] but renders without a chat template (see render.py).
    """

    messages: list[dict[str, str]] | None
    text: str | None
    images: list[str] = field(default_factory=list)
    videos: list[list[str]] = field(default_factory=list)
    format: str = ""
    origin: str = ""

    def key(self) -> tuple:
        """Equal for exact duplicates whatever file or line they came from (a hashable value)."""
        messages = tuple((m["role"], m["content"]) for m in self.messages) if self.messages else None
        videos = tuple(tuple(v) for v in self.videos)
        return (messages, self.text, tuple(self.images), videos, self.format == "completion")

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "text": self.text,
            "images": self.images,
            "videos": self.videos,
            "format": self.format,
            "origin": self.origin,
        }


@dataclass
class Reject:
    """A record that was skipped, with where it came from and why (one line of the rejects file)."""

    origin: str
    reason: str
    raw: Any = None

    def to_json(self) -> str:
        raw = self.raw
        try:
            json.dumps(raw)
        except (TypeError, ValueError):
            raw = repr(raw)[:2000]
        return json.dumps({"origin": self.origin, "reason": self.reason, "record": raw}, ensure_ascii=False)


@dataclass
class FileSummary:
    """What one input file (or cached Hugging Face split) held."""

    path: str
    kind: str  # json, jsonl, csv, tsv, parquet, txt, hf
    records: int = 0
    rejects: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def format(self) -> str:
        """The file's format, 'mixed (a, b)' when records differ, '-' when nothing was usable."""
        if not self.formats:
            return "-"
        if len(self.formats) == 1:
            return next(iter(self.formats))
        return "mixed (" + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())) + ")"


@dataclass
class LoadResult:
    """Everything `load_records` found: good records, rejects with reasons, duplicates, per-file summary."""

    records: list[Record]
    rejects: list[Reject]
    files: list[FileSummary]
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (origin, origin of the first copy)
    notes: list[str] = field(default_factory=list)

    @property
    def formats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.format] = out.get(r.format, 0) + 1
        return out
