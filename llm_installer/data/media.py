"""Images and video frames for vision-language models, through the model's own processor.

The text side (template, mask) is done exactly as for text models; the processor then expands each image
placeholder into the model's image tokens and produces `pixel_values`. The labels are then computed on the
processor's own token ids: the processor reports where in its expanded text each placeholder went and
each token's character offsets there, so every trained character span of the rendered text (answer plus
end-of-turn) is mapped into the expanded text and the tokens overlapping it are trained; every token the
processor inserted (image/video tokens, and the begin/end-of-image markers and newlines some processors
put around them) and every image/video token id is masked. This does not depend on the text around an
image tokenizing as it did before the expansion (Gemma 3 wraps each image in "\\n\\n", which merges
with a neighbouring newline). A processor that cannot report offsets falls back to walking both token
sequences (tokens the processor inserted get -100).

A record that gives images or videos and gets no pixel tensors back is rejected, never trained as text.
"""

from __future__ import annotations

from typing import Any

from llm_installer.data.records import Record, RecordError
from llm_installer.data.render import IGNORE_INDEX

# Processor outputs that are not model inputs of the example (the text side is rebuilt as ids/labels).
_TEXT_KEYS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "mm_token_type_ids",
        "offset_mapping",
        "text_replacement_offsets",
    }
)


def _open(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise RecordError(f"cannot read image {path}: {exc}") from None


def _refused(exc: Exception) -> RecordError:
    return RecordError(f"the model's processor refused this record: {str(exc).splitlines()[0][:200]}")


def _run_processor(processor: Any, kwargs: dict[str, Any]) -> Any:
    """The processor's output, with token offsets and placeholder replacement offsets where it can give
    them (transformers' ProcessorMixin); otherwise plain ids (slow tokenizer, custom processor)."""
    attempts = (
        {
            "add_special_tokens": False,
            "return_offsets_mapping": True,
            "return_text_replacement_offsets": True,
        },
        {"add_special_tokens": False},
        {},
    )
    refused: Exception | None = None
    for extra in attempts:
        try:
            return processor(**kwargs, **extra)
        except (TypeError, NotImplementedError):
            continue  # an option this processor/tokenizer does not take: ask with fewer
        except (ValueError, RuntimeError) as exc:
            refused = refused or exc
    raise _refused(refused or RuntimeError("it takes none of the usual arguments"))


def _media_token_ids(processor: Any) -> set[int]:
    """Ids of the tokens that stand for images/videos (placeholders, soft tokens, begin/end markers)."""
    tok = getattr(processor, "tokenizer", None)
    ids: set[Any] = set()
    for owner in (processor, tok):
        if owner is None:
            continue
        for attr in ("image_token_ids", "video_token_ids"):
            try:
                value = getattr(owner, attr, None)
            except Exception:  # a property that needs a token this tokenizer lacks
                value = None
            if isinstance(value, (list, tuple, set)):
                ids.update(value)
        for attr in ("image_token_id", "video_token_id", "boi_token_id", "eoi_token_id"):
            ids.add(getattr(owner, attr, None))
    if tok is not None:
        unk = getattr(tok, "unk_token_id", None)
        for owner in (processor, tok):
            for attr in ("image_token", "video_token", "boi_token", "eoi_token"):
                token = getattr(owner, attr, None)
                if isinstance(token, str) and token:
                    tid = tok.convert_tokens_to_ids(token)
                    if isinstance(tid, int) and tid != unk:
                        ids.add(tid)
    return {i for i in ids if isinstance(i, int) and i >= 0}


def _check_media(record: Record, out: Any) -> None:
    """Images/videos given must come back as pixel tensors, each with its place in the text."""
    keys = set(out.keys())
    if record.images and not any(k.startswith("pixel_values") and k != "pixel_values_videos" for k in keys):
        raise RecordError("the model's processor gave no pixel_values for this record's images")
    if record.videos and "pixel_values_videos" not in keys and (record.images or "pixel_values" not in keys):
        raise RecordError("the model's processor gave no pixel_values_videos for this record's video")
    replacements = out.get("text_replacement_offsets")
    if replacements:
        placed = replacements[0]
        for kind, given in (("image", len(record.images)), ("video", len(record.videos))):
            n = sum(1 for r in placed if r.get("type") == kind)
            if given and n != given:
                raise RecordError(
                    f"the model's processor placed {n} of the record's {given} {kind}(s) in the text"
                )


def _labels_by_offsets(
    ids: list[int],
    offsets: list[Any],
    replacements: list[dict[str, Any]],
    spans: list[tuple[int, int]],
    media_ids: set[int],
) -> list[int]:
    """Labels on the processor's ids: tokens overlapping a trained span (mapped into the expanded text)
    are trained; tokens inside an expanded placeholder and image/video token ids are masked."""
    repl = sorted((tuple(r["span"]), tuple(r["new_span"])) for r in replacements)

    def to_expanded(pos: int, end: bool) -> int:
        shift = 0
        for (s, e), (ns, ne) in repl:
            if pos >= e:
                shift = ne - e  # new_span already includes the shift of the replacements before it
            elif pos > s:  # inside a placeholder: its whole expansion
                return ne if end else ns
            else:
                break
        return pos + shift

    trained = [(to_expanded(s, False), to_expanded(e, True)) for s, e in spans]
    inserted = [new for _, new in repl]
    labels: list[int] = []
    for token, (ts, te) in zip(ids, offsets, strict=True):
        keep = (
            token not in media_ids
            and any(te > s and ts < e for s, e in trained)
            and not any(te > s and ts < e for s, e in inserted)
        )
        labels.append(token if keep else IGNORE_INDEX)
    return labels


def _labels_by_walk(ids: list[int], src_ids: list[int], src_labels: list[int]) -> list[int]:
    """Labels carried over by walking both sequences: tokens the processor inserted get -100."""
    labels: list[int] = []
    i = 0
    for token in ids:
        if i < len(src_ids) and token == src_ids[i]:
            labels.append(src_labels[i])
            i += 1
        else:
            labels.append(IGNORE_INDEX)  # inserted by the processor (expanded image/video tokens)
    if i != len(src_ids):
        raise RecordError(
            "the processor's tokens do not line up with the rendered text (image token missing?)"
        )
    return labels


def attach_media(
    example: dict[str, Any],
    record: Record,
    processor: Any,
    text: str,
    max_seq_length: int,
    spans: list[tuple[int, int]] | None = None,
) -> dict:
    """Run the processor on the rendered `text` with the record's images/frames; label its token ids.

    `spans` are the trained character spans of `text` (the renderer's); without them the labels of
    `example` (the text-only tokenization) are carried over token by token."""
    if record.images and getattr(processor, "image_processor", None) is None:
        raise RecordError("this model's processor takes no images")
    if record.videos and getattr(processor, "video_processor", None) is None:
        raise RecordError("this model's processor takes no video")
    images = [_open(p) for p in record.images] or None
    videos = [[_open(f) for f in frames] for frames in record.videos] or None
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    out = _run_processor(processor, kwargs)
    _check_media(record, out)
    ids = out["input_ids"][0].tolist()
    offsets = out.get("offset_mapping")
    replacements = out.get("text_replacement_offsets")
    if spans is not None and offsets is not None and replacements is not None:
        offsets = offsets[0].tolist() if hasattr(offsets[0], "tolist") else list(offsets[0])
        labels = _labels_by_offsets(ids, offsets, replacements[0], spans, _media_token_ids(processor))
        if any(x != IGNORE_INDEX for x in example["labels"]) and all(x == IGNORE_INDEX for x in labels):
            raise RecordError("no answer tokens left in the processor's tokens (image token in the answer?)")
    else:
        labels = _labels_by_walk(ids, example["input_ids"], example["labels"])
    if len(ids) > max_seq_length:
        raise RecordError(
            f"{len(ids)} tokens with the image tokens, longer than max_seq_length={max_seq_length} "
            "(raise --max-seq-length)"
        )
    result: dict[str, Any] = {"input_ids": ids, "labels": labels}
    types = out.get("token_type_ids")
    if types is not None and any(int(t) for t in types[0].tolist()):
        # Gemma 3 marks image tokens with type 1 and attends among them bidirectionally in training:
        # the per-token types travel with the ids (padded with 0 by the trainer's collator)
        result["token_type_ids"] = [int(t) for t in types[0].tolist()]
    for key, value in out.items():
        if key not in _TEXT_KEYS:
            result[key] = value
    return result
