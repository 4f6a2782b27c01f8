"""Streaming text without taking any back: which part of a row's decoded text may be sent now.

The engine decodes the whole generated id list at each step (so multi-token characters come out right)
and asks `visible_text` for the new part. It holds back a trailing half of a multi-byte character (the
tokenizer shows it as U+FFFD) and a tail that may still grow into a stop string, and cuts the text at
the first stop string found.
"""

from __future__ import annotations


def visible_text(
    text: str, emitted: int, stops: list[str], reason: str | None
) -> tuple[str, int, str | None]:
    """(text to send now, characters sent after it, finish reason) for a row whose whole decoded answer
    is `text`, `emitted` characters of which were sent; `reason` is the finish reason the tokens gave
    ("stop" at an end token, "length"), None while generating. A stop string found ends it with "stop"."""
    if stops:
        hits = [(text.find(s, max(0, emitted - len(s) + 1)), s) for s in stops if s]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            text = text[: min(i for i, _ in hits)]
            reason = "stop"
    if reason is not None:
        return (text[emitted:] if len(text) > emitted else ""), len(text), reason
    safe = len(text)
    if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
        safe = len(text.rstrip("\ufffd"))
    for s in stops:  # hold back a tail that may grow into a stop string
        for k in range(min(len(s) - 1, safe), 0, -1):
            if text[:safe].endswith(s[:k]):
                safe -= k
                break
    if safe > emitted:
        return text[emitted:safe], safe, None
    return "", emitted, None
