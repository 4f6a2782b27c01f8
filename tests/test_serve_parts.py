"""The engine's parts on their own: what streamed text may be sent now (detok) and the request queue."""

from __future__ import annotations

import pytest

from llm_installer.serve.detok import visible_text
from llm_installer.serve.engine import EngineError, Handle, SamplingParams
from llm_installer.serve.scheduler import ANY_ADAPTER, RequestQueue


def test_visible_text_holds_back_a_possible_stop_string_and_half_characters():
    # "Hello, wor" may grow into the stop string "world": "wor" waits
    assert visible_text("Hello, wor", 0, ["world"], None) == ("Hello, ", 7, None)
    # it did not: the held-back text goes out with the next piece
    assert visible_text("Hello, word", 7, ["world"], None) == ("word", 11, None)
    # half of a multi-byte character (shown as U+FFFD) waits for its other half
    assert visible_text("caf\ufffd", 0, [], None) == ("caf", 3, None)
    # a stop string ends the answer just before it, whatever the tokens said
    assert visible_text("Hello, world!", 7, ["world"], None) == ("", 7, "stop")
    # the end: everything not yet sent
    assert visible_text("Hello there", 5, [], "length") == (" there", 11, "length")


def test_request_queue_is_bounded_fifo_and_keeps_one_adapter_per_batch():
    queue = RequestQueue(max_queue=3)
    handles = [Handle([1], adapter, SamplingParams()) for adapter in (None, None, "lora")]
    for h in handles:
        queue.put(h)
    with pytest.raises(EngineError) as exc:
        queue.put(Handle([1], None, SamplingParams()))
    assert exc.value.status == 429 and exc.value.code == "rate_limit_exceeded"
    assert queue.take(None, 8, block=False) == handles[:2]  # stops at the first adapter row
    assert queue.take(ANY_ADAPTER, 8, block=False) == handles[2:]
    handles[0].cancel()
    queue.put(handles[0])
    assert queue.take(ANY_ADAPTER, 8, block=False) == [] and len(queue) == 0  # a cancelled one is dropped
    assert [e.finish_reason for e in handles[0]] == ["cancelled"]
