"""What a caller hands the engine and what it hands back: the sampling settings of one request (checked
before it joins a batch), its handle, and the events the worker sends it. No torch here: the HTTP layer
and the terminal chat use these without loading a model."""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llm_installer.errors import UserError

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class EngineError(UserError):
    """A request the engine cannot serve (bad parameters, prompt too long, unknown model)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI names and meanings)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # for benchmarks: generate exactly max_tokens

    def check(self) -> None:
        """Refuse what the sampler cannot honour, before the request joins a batch (EngineError 400).

        One rule for every entry (HTTP API, terminal chat, Python callers): a request that passes this
        can only fail in the worker through a bug, and even then it ends its own row, never the batch.
        The ranges are OpenAI's; `seed` must fit the 64-bit generator (torch refuses larger ones).
        """
        for name, lo, hi, open_lo in (
            ("temperature", 0.0, 2.0, False),
            ("top_p", 0.0, 1.0, True),
            ("presence_penalty", -2.0, 2.0, False),
            ("frequency_penalty", -2.0, 2.0, False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < lo or value > hi or (open_lo and value <= lo):
                bound = f"greater than {lo:g}" if open_lo else f"at least {lo:g}"
                raise EngineError(
                    f"Invalid value for '{name}': expected a number {bound} and at most {hi:g}, got {value!r}.",
                    param=name,
                    code="invalid_value",
                )
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise EngineError(
                f"Invalid value for 'max_tokens': expected an integer of at least 1, got {self.max_tokens!r}.",
                param="max_tokens",
                code="invalid_value",
            )
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise EngineError(
                f"Invalid value for 'seed': expected a 64-bit integer ({SEED_MIN} to {SEED_MAX}), got {self.seed!r}.",
                param="seed",
                code="invalid_value",
            )
        if not all(isinstance(s, str) for s in self.stop):
            raise EngineError(
                "Invalid value for 'stop': expected strings.", param="stop", code="invalid_value"
            )


@dataclass
class Event:
    """What the worker tells a request: a text delta, or the end (finish_reason and token counts)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Handle:
    """One submitted request: iterate it for events (sync) or pass a sink (async servers); cancel() stops it."""

    _ids = itertools.count(1)

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        sink: Callable[[Event], None] | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self._queue: queue.Queue[Event] | None = None if sink else queue.Queue()
        self._sink = sink or self._queue.put  # type: ignore[union-attr]
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.created = time.time()

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except Exception:  # a sink on a closed event loop: the client is gone
            self.cancelled.set()
        if event.finish_reason is not None:
            self.done.set()

    def cancel(self) -> None:
        """Ask the worker to drop this request at its next step (a client that went away)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise RuntimeError("this handle delivers events to its sink")
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class Completion:
    """The whole answer of `Engine.generate` (the blocking entry point)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
