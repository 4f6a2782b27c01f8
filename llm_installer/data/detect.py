"""Format detection from the schema of records.

A record's candidates are the formats whose identifying key groups are all present; a candidate whose keys
are a strict subset of another's is dropped (qa < vision_qa < ..., text < everything), so the most
specific shape wins. A file's format comes from a sample spread over the whole file, not the first
record alone, so one odd record (missing a field) is reported as that format's bad record instead of
making the file "unknown".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from llm_installer.data.formats import FORMATS, FormatSpec

SAMPLE_SIZE = 200


def _present(raw: dict, group: tuple[str, ...]) -> bool:
    return any(raw.get(k) is not None for k in group)


def _keys(spec: FormatSpec) -> set[str]:
    return {k for group in spec.required for k in group}


def candidates(raw: Any, prefer: Iterable[str] | None = None) -> list[str]:
    """Formats this one record fits, most specific only; `prefer` = formats the handler supports."""
    if isinstance(raw, str):
        return ["text"]
    if not isinstance(raw, dict):
        return []
    # records of one file share a handful of key sets: decide once per (keys present, prefer)
    present = frozenset(k for k, v in raw.items() if v is not None and isinstance(k, str))
    found = _candidates(present, frozenset(prefer or ()))
    if not found:  # {"instruction": null, "output": null} is a bad alpaca record, not an unknown shape
        named = frozenset(k for k in raw if isinstance(k, str))
        if named != present:
            found = _candidates(named, frozenset(prefer or ()))
    return list(found)


@lru_cache(maxsize=4096)
def _candidates(present: frozenset[str], prefer: frozenset[str]) -> tuple[str, ...]:
    raw = dict.fromkeys(present, True)
    found = []
    for spec in FORMATS.values():
        if not spec.auto and not (spec.name in prefer and "qa" not in prefer):
            continue
        if spec.name == "qa" and "medical_qa" in prefer and "qa" not in prefer:
            continue
        if all(_present(raw, g) for g in spec.required):
            found.append(spec.name)
    if len(found) > 1:
        found = [a for a in found if not any(_keys(FORMATS[a]) < _keys(FORMATS[b]) for b in found if b != a)]
    if len(found) > 1 and prefer:
        preferred = [f for f in found if f in prefer]
        if len(preferred) == 1:
            found = preferred
    return tuple(found)


def sample_indices(n: int, size: int = SAMPLE_SIZE) -> list[int]:
    """Up to `size` indices spread evenly over 0..n-1 (always including the first and last)."""
    if n <= size:
        return list(range(n))
    step = (n - 1) / (size - 1)
    return sorted({round(i * step) for i in range(size)})


def dominant_format(
    raws: Sequence[Any], prefer: Iterable[str] | None = None
) -> tuple[str | None, str | None]:
    """(format, None) for the most common unambiguous shape in a sample, else (None, why-not message)."""
    counts: Counter[str] = Counter()
    ambiguous: list[tuple[list[str], Any]] = []
    unknown_keys: Counter[tuple[str, ...]] = Counter()
    for i in sample_indices(len(raws)):
        raw = raws[i]
        found = candidates(raw, prefer)
        if len(found) == 1:
            counts[found[0]] += 1
        elif len(found) > 1:
            ambiguous.append((found, raw))
        elif isinstance(raw, dict):
            unknown_keys[tuple(sorted(map(str, raw)))] += 1
    if counts:
        return counts.most_common(1)[0][0], None
    if ambiguous:
        found, raw = ambiguous[0]
        return None, (
            f"cannot tell the format: records with keys {sorted(map(str, raw))} fit "
            f"{' and '.join(found)}; pass --format {found[0]} (or another)"
        )
    if unknown_keys:
        keys = list(unknown_keys.most_common(1)[0][0])
        return None, (
            f"unknown record shape with keys {keys}; known formats: {', '.join(FORMATS)}; "
            "rename the fields or pass --format (see docs/data.md)"
        )
    return None, "no records that are objects with fields; pass --format or check the file"
