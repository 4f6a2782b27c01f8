"""Compare: base model and adapter answer the same prompt side by side, streamed token by token.

One `serve.engine.Engine` per studio (the model last asked about), loaded with its adapter: the engine
serves base and adapter requests in the same batch. A finished training of that model drops it, so the
next question loads the new adapter.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

from llm_installer.errors import UserError


class Engines:
    """Holds at most one loaded engine (memory is the limit on a small machine)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine: Any = None
        self.model: str | None = None

    def get(self, model: str) -> Any:
        from llm_installer.serve.engine import Engine
        from llm_installer.studio import paths

        folder = paths.model_folder(model)
        with self.lock:
            if self.engine is not None and self.model == model:
                return self.engine
            self.drop_locked()
            self.engine = Engine.load(str(folder.root), default_max_tokens=128, max_batch=4).start()
            self.model = model
            return self.engine

    def drop_locked(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.engine, self.model = None, None

    def forget(self, model: str) -> None:
        """A training of `model` ended: its adapter changed, reload on the next question."""
        with self.lock:
            if self.model == model:
                self.drop_locked()

    def close(self) -> None:
        with self.lock:
            self.drop_locked()


def stream_answer(
    engines: Engines, model: str, prompt: str, adapter: bool, max_tokens: int
) -> Iterator[bytes]:
    """NDJSON lines `{"text": delta}` then `{"finish_reason": ...}`; errors are one `{"error": line}`."""
    from llm_installer.serve.engine import SamplingParams

    if not prompt.strip():
        raise UserError("the prompt is empty; type a question")
    engine = engines.get(model)
    if adapter and not engine.has_adapter:
        raise UserError(f"{model} has no adapter yet: train one first")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = engine.chat_prompt_ids([{"role": "user", "content": prompt}])
    engine.check_prompt(ids, params)
    name = engine.name + (":lora" if adapter else "")
    handle = engine.submit(ids, engine.resolve(name), params)

    def events() -> Iterator[bytes]:
        try:
            for ev in handle:
                if ev.text:
                    yield (json.dumps({"text": ev.text}) + "\n").encode()
                if ev.finish_reason is not None:
                    body = {"finish_reason": ev.finish_reason, "error": ev.error}
                    yield (json.dumps(body) + "\n").encode()
        finally:
            handle.cancel()  # the page went away: free the batch slot

    return events()
