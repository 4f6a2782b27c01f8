"""The queue between request threads and the one generation worker: bounded (a full queue answers 429
at once instead of letting every client wait longer), first in first out (no request starves), and
able to hand the worker only requests that may share its running batch."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from llm_installer.serve.request import EngineError, Event, Handle

ANY_ADAPTER = object()  # `take`: any adapter (the batch mixes base and adapter rows)
DEFAULT_MAX_QUEUE = 64  # requests waiting for a batch slot before new ones are answered 429


class RequestQueue:
    """Waiting requests, guarded by one condition; `stopping` tells the worker to finish."""

    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        self.max_queue = max(1, max_queue)
        self._pending: deque[Handle] = deque()
        self._cond = threading.Condition()
        self.stopping = False

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, handle: Handle) -> None:
        """Queue `handle`, or raise EngineError 429 when `max_queue` requests already wait."""
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise EngineError(
                    f"The server is busy: {len(self._pending)} requests are already waiting; retry shortly.",
                    status=429,
                    code="rate_limit_exceeded",
                )
            self._pending.append(handle)
            self._cond.notify_all()

    def take(self, adapter: Any, limit: int, block: bool) -> list[Handle]:
        """Take up to `limit` queued requests for `adapter` (or ANY_ADAPTER) from the head of the queue;
        cancelled ones are answered and dropped on the way. `block` waits for the first one."""
        with self._cond:
            if block:
                while not self._pending and not self.stopping:
                    self._cond.wait(timeout=0.5)
            if self.stopping:
                return []
            taken: list[Handle] = []
            while self._pending and len(taken) < limit:
                head = self._pending[0]
                if head.cancelled.is_set():
                    self._pending.popleft()
                    head.emit(Event(finish_reason="cancelled"))
                    continue
                if (taken or not block) and adapter is not ANY_ADAPTER and head.adapter != adapter:
                    break
                adapter = head.adapter
                taken.append(self._pending.popleft())
            return taken

    def set_stopping(self, stopping: bool) -> None:
        """Tell the worker to stop (True) or that it may run again (False)."""
        with self._cond:
            self.stopping = stopping
            self._cond.notify_all()

    def cancel_all(self) -> None:
        """Answer every request still waiting as 'cancelled': after a stop they will never run."""
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
        for h in left:
            h.emit(Event(finish_reason="cancelled"))
