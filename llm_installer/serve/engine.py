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
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_installer.chat_format import model_chat_format
from llm_installer.errors import UserError

log = logging.getLogger(__name__)

LORA_SUFFIX = ":lora"
ADAPTER_NAME = "lora"
_ANY = object()  # _take: any adapter (the batch mixes base and adapter rows)


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


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
DEFAULT_MAX_QUEUE = 64  # requests waiting for a batch slot before new ones are answered 429


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
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


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


def _default_dtype() -> str:
    from llm_installer import hardware

    hw = hardware.detect()
    return hw.best_precision() if hw.cuda else ("bf16" if hw.cpu_bf16_fast else "fp32")


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
        self.max_queue = max(1, max_queue)
        self.batch_window_s = batch_window_s
        self.info = info or {}
        self.device = next(model.parameters()).device
        self.created = int(time.time())
        params = inspect.signature(self._base_module().forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        # Base and adapter rows share one batch: PEFT runs the shared base matmuls once and the LoRA
        # matmuls only for the rows that use the adapter (its `adapter_names` mixed-batch forward).
        self._mixed = bool(has_adapter and not merged and hasattr(model, "disable_adapter")) and _mixes(model)
        self._lora_layers: list[Any] = []
        if self._mixed:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to share between threads
        self._pending: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_batch_seen = 0  # largest batch decoded together so far
        self.active = 0  # rows in the running batch
        self.cancelled = 0  # requests dropped because their client went away

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
        from llm_installer import loading, store
        from llm_installer.consent import allow_remote_code

        folder = store.find_model(name_or_path)
        info = folder.load_info()
        if info.task not in ("causal_lm", "moe", "vision_language", "unknown"):
            raise UserError(
                f"model {folder.name} is a {info.task} model; chat and serving support text-generating models "
                "(causal LM, MoE, vision-language as text-only)"
            )
        if lora is not None and no_lora:
            raise UserError("--lora and --no-lora contradict each other; pass one of them")
        lora_dir: Path | None = None
        if lora is not None:
            lora_dir = Path(lora).expanduser().resolve()
            if not (lora_dir / "adapter_config.json").is_file():
                raise UserError(
                    f"--lora {lora}: no adapter_config.json there; point it at a PEFT adapter folder"
                )
        elif not no_lora and folder.has_adapter:
            lora_dir = folder.lora_dir
        if merge_adapter and lora_dir is None:
            raise UserError("--merge-adapter needs an adapter: train one first or pass --lora PATH")
        trust = allow_remote_code(info, granted=trust_remote_code)  # refuses before any code runs
        dtype = dtype or _default_dtype()
        tokenizer = loading.load_tokenizer(folder.model_dir, trust_remote_code=trust)
        task = info.task if info.task in ("moe", "vision_language") else "causal_lm"
        model = loading.load_model(folder.model_dir, task=task, dtype=dtype, trust_remote_code=trust)
        import torch

        if torch.cuda.is_available():
            model = model.to("cuda")
        if lora_dir is not None:
            from llm_installer.train.lora_setup import load_adapter

            try:
                model = load_adapter(model, lora_dir, adapter_name=ADAPTER_NAME, is_trainable=False)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise UserError(f"adapter {lora_dir} does not fit model {folder.name}: {exc}") from None
            if merge_adapter:
                model = model.merge_and_unload()
        model.eval()
        # the template and end-of-turn token training used (the adapter records them): stop exactly there
        chat_format = model_chat_format(info, tokenizer, lora_dir)
        template, stops = chat_format.template, list(chat_format.stop_token_ids)
        return cls(
            model,
            tokenizer,
            name=folder.name,
            has_adapter=lora_dir is not None,
            merged=merge_adapter,
            chat_template=template,
            stop_token_ids=stops,
            context_length=_context_length(info, model),
            default_max_tokens=default_max_tokens,
            max_batch=max_batch,
            max_queue=max_queue,
            info={
                "model_id": info.model_id,
                "family": info.family or info.model_type,
                "parameters": info.num_parameters,
                "source": info.source,
                "adapter": str(lora_dir) if lora_dir else None,
                "adapter_info": _adapter_info(lora_dir),
                "dtype": str(dtype),
                "device": str(next(model.parameters()).device),
                "chat_format": {k: v for k, v in chat_format.to_dict().items() if k != "template"},
            },
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
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="llm-installer-generate", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the worker: running and queued requests end as 'cancelled' (within one decoding step)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._cond:  # requests still queued will never run: tell their clients
            left = list(self._pending)
            self._pending.clear()
        for h in left:
            h.emit(Event(finish_reason="cancelled"))

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
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise EngineError(
                    f"The server is busy: {len(self._pending)} requests are already waiting; retry shortly.",
                    status=429,
                    code="rate_limit_exceeded",
                )
            self._pending.append(handle)
            self._cond.notify_all()
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
    def _take(self, adapter: Any, limit: int, block: bool) -> list[Handle]:
        """Take queued requests for `adapter` (or _ANY) from the head of the queue (FIFO: none starves)."""
        with self._cond:
            if block:
                while not self._pending and not self._stopping:
                    self._cond.wait(timeout=0.5)
            if self._stopping:
                return []
            taken: list[Handle] = []
            while self._pending and len(taken) < limit:
                head = self._pending[0]
                if head.cancelled.is_set():
                    self._pending.popleft()
                    head.emit(Event(finish_reason="cancelled"))
                    continue
                if (taken or not block) and adapter is not _ANY and head.adapter != adapter:
                    break
                adapter = head.adapter
                taken.append(self._pending.popleft())
            return taken

    def _worker(self) -> None:
        torch = self.torch
        while True:
            first = self._take(None, self.max_batch, block=True)
            if not first:
                if self._stopping:
                    return
                continue
            if len(first) < self.max_batch and self.batch_window_s > 0:
                time.sleep(self.batch_window_s)  # let simultaneous arrivals join the first prefill
                first += self._take(self._group(first[0]), self.max_batch - len(first), block=False)
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
        return _ANY if self._mixed else handle.adapter

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

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._base_module().config)
        except TypeError:  # older transformers
            return DynamicCache()

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
        cache = self._new_cache()
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
                    mask, cache = self._concat(mask, cache, j_mask, j_cache)
                else:
                    mask, cache = j_mask, j_cache
                    can_join = self._cache_is_joinable(cache)
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
                mask, cache = self._trim_left(mask, cache)
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
                joining = self._take(adapter, self.max_batch - len(rows), block=False)
                if taken is not None:
                    taken.extend(joining)

    # ----- cache surgery for continuous batching -------------------------------------------------------
    @staticmethod
    def _cache_is_joinable(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _trim_left(self, mask, cache):
        """Drop leading columns that are padding for every row (after long rows left the batch)."""
        torch = self.torch
        col_used = mask.any(dim=0)
        if bool(col_used[0]) or not bool(col_used.any()):
            return mask, cache
        start = int(torch.nonzero(col_used)[0])
        if start <= 0 or not self._cache_is_joinable(cache):
            return mask, cache
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys[:, :, start:, :].contiguous()
                layer.values = layer.values[:, :, start:, :].contiguous()
        return mask[:, start:], cache

    def _concat(self, mask_a, cache_a, mask_b, cache_b):
        """Join two batches: left-pad the shorter KV cache and mask, then stack along the batch."""
        torch = self.torch
        la, lb = mask_a.shape[1], mask_b.shape[1]
        width = max(la, lb)

        def pad(t, n, dim):
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
            layer_a.keys = torch.cat(
                [pad(layer_a.keys, width - la, 2), pad(layer_b.keys, width - lb, 2)], dim=0
            )
            layer_a.values = torch.cat(
                [pad(layer_a.values, width - la, 2), pad(layer_b.values, width - lb, 2)], dim=0
            )
        mask = torch.cat([pad(mask_a, width - la, 1), pad(mask_b, width - lb, 1)], dim=0)
        return mask, cache_a

    # ----- sampling and text ---------------------------------------------------------------------------
    def _sample_and_emit(self, rows: list[_Row], logits) -> None:
        for i, r in enumerate(rows):
            if r.handle.cancelled.is_set() or self._stopping:  # client gone, or the server is shutting down
                r.finished = "cancelled"
                self.cancelled += 1
                r.handle.emit(
                    Event(
                        finish_reason="cancelled",
                        prompt_tokens=len(r.handle.prompt_ids),
                        completion_tokens=len(r.generated),
                    )
                )
                continue
            try:
                token = self._sample(r, logits[i])
                r.generated.append(token)
                r.pending = token
                reason = None
                if token in r.stop_ids:
                    reason = "stop"
                    r.generated.pop()  # the end token is not part of the answer
                elif len(r.generated) >= r.max_new:
                    reason = "length"
                elif r.position + 1 >= self.context_length:
                    reason = "length"
                self._emit_text(r, reason)
            except Exception as exc:  # this row's own failure ends this row only, never the batch
                log.exception("generation failed for request %s", r.handle.id)
                r.finished = "error"
                r.handle.emit(
                    Event(
                        finish_reason="error",
                        error=f"{type(exc).__name__}: {exc}",
                        prompt_tokens=len(r.handle.prompt_ids),
                        completion_tokens=len(r.generated),
                    )
                )

    def _sample(self, r: _Row, logits) -> int:
        torch = self.torch
        p = r.params
        if p.presence_penalty or p.frequency_penalty:
            if r.generated:
                ids = torch.tensor(r.generated, device=logits.device)
                counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
                logits = (
                    logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
                )
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        # In float64 and relative to the best logit, so that any temperature in (0, 2] is finite: dividing
        # float32 logits by 1e-39 gave inf/inf = NaN and a crashed batch.
        logits = (logits.double() - logits.max().double()) / p.temperature
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs_sorted = torch.softmax(sorted_logits, dim=-1)
            drop = probs_sorted.cumsum(-1) - probs_sorted >= p.top_p
            drop[0] = False  # the top token always stays (a top_p of 1e-227 is 0 in float32: all dropped)
            sorted_logits[drop] = float("-inf")
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            return int(torch.argmax(logits))  # nothing left to sample from: the most likely token
        if r.generator is None and p.seed is not None:
            r.generator = torch.Generator(device=logits.device).manual_seed(int(p.seed))
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _emit_text(self, r: _Row, reason: str | None) -> None:
        with self._tok_lock:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        stops = r.params.stop
        if stops:
            hits = [(text.find(s, max(0, r.emitted - len(s) + 1)), s) for s in stops if s]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                text = text[: min(i for i, _ in hits)]
                reason = "stop"
        if reason is None:
            safe = len(text)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                safe = len(text.rstrip("\ufffd"))
            for s in stops:  # hold back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
            delta = text[r.emitted : safe] if safe > r.emitted else ""
            if delta:
                r.emitted = safe
                r.handle.emit(Event(text=delta))
            return
        r.finished = reason
        r.handle.emit(
            Event(
                text=text[r.emitted :] if len(text) > r.emitted else "",
                finish_reason=reason,
                prompt_tokens=len(r.handle.prompt_ids),
                completion_tokens=len(r.generated),
            )
        )
        r.emitted = len(text)


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


def _context_length(info: Any, model: Any) -> int:
    cfg = getattr(model, "config", None)
    for value in (getattr(info, "context_length", None), getattr(cfg, "max_position_embeddings", None)):
        if value:
            return int(value)
    return 2048


def _adapter_info(lora_dir: Path | None) -> dict[str, Any] | None:
    import json

    if lora_dir is None:
        return None
    path = lora_dir / "adapter_info.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keep = ("base_model", "handler", "method", "mode", "dataset", "metrics", "stop_reason", "created")
    return {k: data[k] for k in keep if k in data}


def _mixes(model: Any) -> bool:
    """Whether PEFT can run base and adapter rows in one batch (`adapter_names`) for this adapter: not with
    DoRA layers nor with fused-expert wrappers (MoE), which refuse it; those batches take one kind of row."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in model.modules():
        if isinstance(module, ParamWrapper):
            return False
        if isinstance(module, LoraLayer) and any(getattr(module, "lora_magnitude_vector", {}) or {}):
            return False
    return True


def chat_settings(info: Any, tokenizer: Any, model: Any = None) -> tuple[str | None, list[int]]:
    """(template, stop token ids) of the model's ChatFormat (see `model_chat_format`); kept for callers.

    `model` is accepted for compatibility and not used: the stop ids come from the chat format (the
    end-of-turn token first), never from a generation config that may not name the end-of-turn token.
    """
    chat_format = model_chat_format(info, tokenizer)
    return chat_format.template, list(chat_format.stop_token_ids)
