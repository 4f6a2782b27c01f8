"""The generation engine behind `start`, `chat` and the benchmark: one model, one worker, many requests.

Why it looks like this:

* The base weights are loaded once. The adapter in `lora/` is attached as a named PEFT adapter
  (``"lora"``); the base model is the same module with the adapter disabled. So ``NAME`` and
  ``NAME:lora`` cost one copy of the weights.
* Exactly one thread (the worker) touches the model. Requests are queued to it; it runs a
  *continuous batch*: rows that finish (end token, stop string, max tokens, client gone) leave the batch
  at the next step and waiting requests join it (their prompt is prefilled, then their KV cache is
  left-padded and concatenated to the running one). Base and adapter rows share a batch through PEFT's
  mixed-adapter forward (``adapter_names``): the base matmuls run once for all rows, LoRA only for its
  rows. On CPU, batching 8 streams gives 4-7x the total tokens/s of one stream (docs/serving.md), and
  nobody waits for a whole batch to end.
* Each row has its own sampling settings (temperature, top_p, seed, OpenAI presence/frequency
  penalties applied exactly as OpenAI documents them), its own stop strings and its own cancel flag.
* Text is decoded incrementally from the whole generated id list, holding back a partial UTF-8
  character or a possible beginning of a stop string, so streamed text never has to be taken back.

This module holds the `Engine` (its public API and the batch loop); the parts live beside it:
`request.py` (SamplingParams, Handle, Event, EngineError), `scheduler.py` (the bounded FIFO queue),
`loading.py` (folder, tokenizer, adapter), `kv_cache.py` (joining and trimming caches),
`sampling.py` (the next token) and `detok.py` (which text may be streamed). Import them from here.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_installer.chat_format import model_chat_format
from llm_installer.serve import kv_cache
from llm_installer.serve.detok import visible_text
from llm_installer.serve.loading import ADAPTER_NAME, default_dtype, mixes_adapters
from llm_installer.serve.request import (
    SEED_MAX,
    SEED_MIN,
    Completion,
    EngineError,
    Event,
    Handle,
    SamplingParams,
)
from llm_installer.serve.sampling import sample_token, seeded_generator
from llm_installer.serve.scheduler import ANY_ADAPTER, DEFAULT_MAX_QUEUE, RequestQueue

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_MAX_QUEUE",
    "LORA_SUFFIX",
    "SEED_MAX",
    "SEED_MIN",
    "Completion",
    "Engine",
    "EngineError",
    "Event",
    "Handle",
    "SamplingParams",
]

log = logging.getLogger(__name__)

LORA_SUFFIX = ":lora"


class _Row:
    """The worker's state for one request in the running batch."""

    def __init__(self, handle: Handle, stop_ids: set[int], max_new: int) -> None:
        self.handle = handle
        self.params = handle.params
        self.stop_ids = stop_ids
        self.max_new = max_new
        self.generated: list[int] = []
        self.emitted = 0  # characters of decoded text already sent
        self.position = len(handle.prompt_ids)  # position id of the pending token
        self.pending: int | None = None  # sampled, not yet fed through the model
        self.generator = None
        self.finished: str | None = None

    def end(self, reason: str, text: str = "", error: str | None = None) -> None:
        """Finish this row: its last event carries the reason and the token counts."""
        self.finished = reason
        self.handle.emit(
            Event(
                text=text,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(self.handle.prompt_ids),
                completion_tokens=len(self.generated),
            )
        )


class Engine:
    """Loads a model folder (base + optional adapter) and serves generation requests from one worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        has_adapter: bool,
        merged: bool = False,
        chat_template: str | None = None,
        stop_token_ids: list[int] | None = None,
        context_length: int | None = None,
        default_max_tokens: int = 512,
        max_batch: int = 16,
        batch_window_s: float = 0.005,
        info: dict[str, Any] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.has_adapter = has_adapter
        self.merged = merged
        self.chat_template = chat_template
        self.stop_token_ids = sorted(set(stop_token_ids or []))
        self.context_length = int(context_length or 2048)
        self.default_max_tokens = default_max_tokens
        self.max_batch = max(1, max_batch)
        self._requests = RequestQueue(max_queue)
        self.batch_window_s = batch_window_s
        self.info = info or {}
        self.device = next(model.parameters()).device
        self.created = int(time.time())
        params = inspect.signature(self._base_module().forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        # Base and adapter rows share one batch: PEFT runs the shared base matmuls once and the LoRA
        # matmuls only for the rows that use the adapter (its `adapter_names` mixed-batch forward).
        self._mixed = bool(
            has_adapter and not merged and hasattr(model, "disable_adapter")
        ) and mixes_adapters(model)
        self._lora_layers: list[Any] = []
        if self._mixed:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to share between threads
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_batch_seen = 0  # largest batch decoded together so far
        self.active = 0  # rows in the running batch
        self.cancelled = 0  # requests dropped because their client went away

    @property
    def queued(self) -> int:
        """Requests waiting to join the running batch (shown by /health)."""
        return len(self._requests)

    @property
    def max_queue(self) -> int:
        """How many requests may wait before new ones are answered 429 (settable)."""
        return self._requests.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self._requests.max_queue = max(1, value)

    # ----- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        lora: str | Path | None = None,
        no_lora: bool = False,
        merge_adapter: bool = False,
        dtype: str | None = None,
        default_max_tokens: int = 512,
        max_batch: int = 16,
        max_queue: int = DEFAULT_MAX_QUEUE,
        trust_remote_code: bool | None = None,
    ) -> Engine:
        """Load an installed model (name or folder) with its adapter (lora/ unless overridden).

        `trust_remote_code`: the caller's consent to run the model's own code (None: this process's
        --trust-remote-code); never taken from the folder (llm_installer/consent.py).
        """
        from llm_installer import store
        from llm_installer.consent import allow_remote_code
        from llm_installer.serve import loading

        folder = store.find_model(name_or_path)
        info = folder.load_info()
        loading.check_servable(folder, info)
        lora_dir = loading.adapter_dir(folder, lora, no_lora, merge_adapter)
        trust = allow_remote_code(info, granted=trust_remote_code)  # refuses before any code runs
        dtype = dtype or default_dtype()
        model, tokenizer = loading.load_model(folder, info, dtype=dtype, trust=trust)
        if lora_dir is not None:
            model = loading.attach_adapter(model, folder, lora_dir, merge_adapter)
        model.eval()
        # the template and end-of-turn token training used (the adapter records them): stop exactly there
        chat_format = model_chat_format(info, tokenizer, lora_dir)
        return cls(
            model,
            tokenizer,
            name=folder.name,
            has_adapter=lora_dir is not None,
            merged=merge_adapter,
            chat_template=chat_format.template,
            stop_token_ids=list(chat_format.stop_token_ids),
            context_length=loading.context_length(info, model),
            default_max_tokens=default_max_tokens,
            max_batch=max_batch,
            max_queue=max_queue,
            info=loading.describe(info, model, lora_dir, dtype, chat_format),
        )

    def _base_module(self):
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    # ----- model names ---------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """The names clients may ask for: NAME (base) and NAME:lora (adapter), as loaded."""
        if self.merged:
            return [self.name + LORA_SUFFIX]
        names = [self.name]
        if self.has_adapter:
            names.append(self.name + LORA_SUFFIX)
        return names

    def resolve(self, model_name: str | None) -> str | None:
        """Model name -> adapter to use (None = base). Unknown names raise EngineError 404."""
        if not model_name:
            return ADAPTER_NAME if self.has_adapter and not self.merged else None
        aliases = {self.name, str(self.info.get("model_id") or self.name)}
        base, _, suffix = model_name.partition(":")
        if base in aliases and model_name.count(":") <= 1:
            if suffix == "" and not self.merged:
                return None
            if suffix == "lora" and self.has_adapter:
                return None if self.merged else ADAPTER_NAME
        raise EngineError(
            f"The model '{model_name}' does not exist; this server has {', '.join(self.model_names)}",
            status=404,
            param="model",
            code="model_not_found",
        )

    # ----- prompts -------------------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render a conversation with the training chat template and tokenize it (generation prompt on)."""
        msgs = [{"role": m["role"], "content": _content_text(m.get("content"))} for m in messages]
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if template:
            try:
                with self._tok_lock:
                    text = self.tokenizer.apply_chat_template(
                        msgs, chat_template=template, add_generation_prompt=True, tokenize=False
                    )
            except Exception as exc:  # jinja TemplateError raised by the template itself (e.g. role order)
                raise EngineError(
                    f"the chat template rejected these messages: {exc}", param="messages"
                ) from None
        else:  # a base model without a template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt_ids(self, prompt: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams, param: str = "messages") -> None:
        """Refuse prompts that leave no room to generate (OpenAI answers 400 context_length_exceeded)."""
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty", param=param)
        room = self.context_length - n
        want = params.max_tokens or 1
        if room < 1 or (params.max_tokens is not None and want > room):
            raise EngineError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{n + want} tokens ({n} in the messages, {want} in the completion). Please reduce the length "
                "of the messages or completion.",
                param=param,
                code="context_length_exceeded",
            )

    # ----- requests ------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._requests.set_stopping(False)
            self._thread = threading.Thread(target=self._worker, name="llm-installer-generate", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the worker: running and queued requests end as 'cancelled' (within one decoding step)."""
        self._requests.set_stopping(True)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._requests.cancel_all()  # requests still queued will never run: tell their clients

    def submit(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        sink: Callable[[Event], None] | None = None,
    ) -> Handle:
        """Queue a request for the worker; returns at once.

        Raises EngineError 400 for settings the sampler cannot honour (`SamplingParams.check`) and 429 when
        `max_queue` requests already wait: a bounded queue answers "busy" at once instead of letting every
        client wait longer and longer.
        """
        params.check()
        if self._thread is None:
            self.start()
        handle = Handle(list(prompt_ids), adapter, params, sink)
        self._requests.put(handle)
        return handle

    def generate(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> Completion:
        """Blocking convenience: the whole completion."""
        parts: list[str] = []
        for ev in self.submit(prompt_ids, adapter, params):
            if ev.error:
                raise RuntimeError(ev.error)
            parts.append(ev.text)
            if ev.finish_reason:
                return Completion("".join(parts), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
        raise RuntimeError("generation ended without a finish event")  # pragma: no cover

    # ----- the worker ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        torch = self.torch
        while True:
            first = self._requests.take(None, self.max_batch, block=True)
            if not first:
                if self._requests.stopping:
                    return
                continue
            if len(first) < self.max_batch and self.batch_window_s > 0:
                time.sleep(self.batch_window_s)  # let simultaneous arrivals join the first prefill
                first += self._requests.take(self._group(first[0]), self.max_batch - len(first), block=False)
            rows: list[_Row] = []
            taken = list(first)  # every request this batch took, joiners included: each gets an answer
            try:
                with torch.inference_mode():
                    self._run_batch(first, rows, taken)
            except (
                Exception
            ) as exc:  # a bug or OOM in a forward pass: fail the requests in flight, keep serving
                log.exception("generation failed")
                for h in taken:
                    if not h.done.is_set():
                        h.emit(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def _group(self, handle: Handle) -> Any:
        """Which queued requests may share a batch with `handle`."""
        return ANY_ADAPTER if self._mixed else handle.adapter

    def _set_adapter_enabled(self, on: bool) -> None:
        """Switch the LoRA layers on/off only when the batch's needs change.

        PEFT's `disable_adapter()` context walks every module twice (about 55 ms per call for SmolLM2,
        more than half a decoding step on CPU); flipping the flag `BaseTunerLayer.disable_adapters`
        reads costs microseconds. Nothing else touches these layers: this thread owns the model.
        """
        if not self._lora_layers or self._lora_layers[0].disable_adapters == (not on):
            return  # (read from the layer itself, in case someone used PEFT's own switch meanwhile)
        for layer in self._lora_layers:
            layer._disable_adapters = not on

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str | None]):
        """One forward pass; each row with its adapter (None = base). Returns the last position's logits."""

        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self._mixed:
            kinds = set(adapters)
            self._set_adapter_enabled(kinds != {None})
            if len(kinds) > 1:
                kwargs["adapter_names"] = [a or "__base__" for a in adapters]
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float()

    def _prefill(self, handles: list[Handle]):
        """Run the prompts of `handles` (left-padded) -> (rows, cache, mask, logits)."""
        torch = self.torch
        width = max(len(h.prompt_ids) for h in handles)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.stop_token_ids[0] if self.stop_token_ids else 0
        ids = torch.full((len(handles), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(handles), width), dtype=torch.long)
        rows = []
        for i, h in enumerate(handles):
            n = len(h.prompt_ids)
            ids[i, width - n :] = torch.tensor(h.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
            room = self.context_length - n
            max_new = min(h.params.max_tokens or self.default_max_tokens, room)
            rows.append(_Row(h, set() if h.params.ignore_eos else set(self.stop_token_ids), max(1, max_new)))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = kv_cache.new_cache(self._base_module().config)
        logits = self._forward(ids, mask, positions, cache, [h.adapter for h in handles])
        return rows, cache, mask, logits

    def _run_batch(self, first: list[Handle], rows: list[_Row], taken: list[Handle] | None = None) -> None:
        """Prefill `first`, then decode step by step; finished rows leave, queued same-adapter requests join."""
        torch = self.torch
        adapter = self._group(first[0])
        cache = mask = None
        joining = first
        can_join = True
        while True:
            if joining:
                j_rows, j_cache, j_mask, j_logits = self._prefill(joining)
                self._sample_and_emit(j_rows, j_logits)
                if rows:
                    mask, cache = kv_cache.concat(mask, cache, j_mask, j_cache)
                else:
                    mask, cache = j_mask, j_cache
                    can_join = kv_cache.is_joinable(cache)
                rows.extend(j_rows)
            keep = [i for i, r in enumerate(rows) if r.finished is None]
            self.active = len(keep)
            if not keep:
                rows.clear()
                return
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask = mask[idx]
                rows[:] = [rows[i] for i in keep]
                mask, cache = kv_cache.trim_left(mask, cache)
            self.max_batch_seen = max(self.max_batch_seen, len(rows))
            ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
            pos = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            logits = self._forward(ids, mask, pos, cache, [r.handle.adapter for r in rows])
            self.steps += 1
            for r in rows:
                r.position += 1
            self._sample_and_emit(rows, logits)
            joining = []
            if can_join and len(rows) < self.max_batch:
                joining = self._requests.take(adapter, self.max_batch - len(rows), block=False)
                if taken is not None:
                    taken.extend(joining)

    # ----- sampling and text ---------------------------------------------------------------------------
    def _sample_and_emit(self, rows: list[_Row], logits) -> None:
        """Sample each row's next token and send its new text; a row's own failure ends that row only."""
        for i, r in enumerate(rows):
            if r.handle.cancelled.is_set() or self._requests.stopping:  # client gone, or shutting down
                self.cancelled += 1
                r.end("cancelled")
                continue
            try:
                token = self._sample(r, logits[i])
                r.generated.append(token)
                r.pending = token
                reason = None
                if token in r.stop_ids:
                    reason = "stop"
                    r.generated.pop()  # the end token is not part of the answer
                elif len(r.generated) >= r.max_new or r.position + 1 >= self.context_length:
                    reason = "length"
                self._emit_text(r, reason)
            except Exception as exc:  # this row's own failure ends this row only, never the batch
                log.exception("generation failed for request %s", r.handle.id)
                r.end("error", error=f"{type(exc).__name__}: {exc}")

    def _sample(self, r: _Row, logits) -> int:
        if r.generator is None and r.params.seed is not None and r.params.temperature > 0:
            r.generator = seeded_generator(r.params.seed, logits.device)
        return sample_token(logits, r.params, r.generated, r.generator)

    def _emit_text(self, r: _Row, reason: str | None) -> None:
        with self._tok_lock:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        delta, emitted, reason = visible_text(text, r.emitted, r.params.stop, reason)
        if reason is None:
            r.emitted = emitted
            if delta:
                r.handle.emit(Event(text=delta))
            return
        r.end(reason, text=delta)
        r.emitted = emitted


# ----- helpers ---------------------------------------------------------------------------------------------
def _content_text(content: Any) -> str:
    """OpenAI message content: a string or a list of parts; text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise EngineError("only text content parts are supported by this model", param="messages")
    return "".join(parts)
