"""Hand a trained model to other runtimes: merged safetensors, an Ollama Modelfile, a vLLM command.

* ``export_merged``: the adapter folded into the base weights (``merge_and_unload``) and saved as a
  plain transformers folder with the tokenizer and the *training* chat template, so any tool that reads
  transformers folders runs the fine-tuned model without PEFT. Written to a temporary folder beside the
  target and renamed into place, so a failure leaves nothing half-written.
* ``export_ollama``: a Modelfile whose TEMPLATE is the chat template translated to Ollama's Go template
  (ChatML, Llama-3, Gemma, Phi-3 and our plain fallback layouts are known), with the model's end-of-turn
  token as the first ``PARAMETER stop``.

Every export takes the template and the end-of-turn token from the model's one ChatFormat
(`llm_installer.chat_format.model_chat_format`): the ones training rendered the data with and `chat` /
`start` stop at. The merged folder's generation_config.json lists the end-of-turn id first in
``eos_token_id``, so plain transformers (and tools reading it) stop there too.
  FROM points at the merged folder when there is one, else at the base weights plus ``ADAPTER lora/``.
* ``vllm_command``: vLLM serves the base with the LoRA adapter as a named module.
* ``smoke_test``: load the exported folder with plain transformers, generate greedily and check that
  the answer ends with one of its end tokens before the token limit (a template or stop-token mistake
  shows up here as a run-on answer).
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_installer.chat_format import ChatFormat
from llm_installer.consent import allow_remote_code
from llm_installer.errors import UserError
from llm_installer.store import ModelFolder


@dataclass
class SmokeResult:
    ok: bool
    answer: str
    new_tokens: int
    stopped_on: str | None
    message: str


def _resolve_lora(folder: ModelFolder, lora: str | Path | None) -> Path | None:
    if lora is not None:
        path = Path(lora).expanduser().resolve()
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"--lora {lora}: no adapter_config.json there; point it at a PEFT adapter folder")
        return path
    return folder.lora_dir if folder.has_adapter else None


def folder_chat_format(folder: ModelFolder, lora: str | Path | None = None) -> tuple[Any, ChatFormat]:
    """(tokenizer, ChatFormat) of an installed model with its adapter: what `chat` would use."""
    from llm_installer import loading
    from llm_installer.chat_format import model_chat_format

    info = folder.load_info()
    tokenizer = loading.load_tokenizer(folder.model_dir, trust_remote_code=allow_remote_code(info))
    return tokenizer, model_chat_format(info, tokenizer, _resolve_lora(folder, lora))


EXPORT_MARKER = "llm_installer_export.json"


def _prepare_out(out: Path, force: bool, folder: ModelFolder | None = None) -> None:
    """Refuse a destination whose contents the export would destroy.

    The export replaces `out` whole, so `--force` may only replace a previous export (it holds
    EXPORT_MARKER) or an empty folder; never the model's own folder, its weights, adapter or runs, nor a
    folder holding them."""
    if folder is not None:
        root = folder.root.resolve()
        if (
            out == root
            or root.is_relative_to(out)
            or any(out.is_relative_to(root / part) for part in ("model", "lora", "runs"))
        ):
            raise UserError(
                f"{out}: that is the model's own folder (or holds it); the export would replace it: give a new "
                "folder"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the merged model")
    if not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"{out} already exists and is not empty; choose another folder or pass --force")
    if not (out / EXPORT_MARKER).is_file():
        raise UserError(
            f"{out} holds files that are not an earlier export; --force only replaces a folder an export "
            "wrote: choose another folder"
        )


def _required_lora(folder: ModelFolder, lora: str | Path | None) -> Path:
    """The adapter to merge, or the one-line error saying there is none."""
    lora_dir = _resolve_lora(folder, lora)
    if lora_dir is None:
        raise UserError(
            f"model {folder.name} has no adapter in {folder.lora_dir}; train one first "
            "(`llm-installer train`) or pass --lora PATH (the base weights are already in model/)"
        )
    return lora_dir


def merged_model(
    folder: ModelFolder,
    *,
    lora: str | Path | None = None,
    no_lora: bool = False,
    progress: Any = None,
) -> tuple[Any, Any, ChatFormat, Path | None]:
    """(model, tokenizer, chat format, adapter dir): the float32 weights every export writes.

    The adapter is folded in with `merge_and_unload` (float32, so the merge loses nothing); with
    `no_lora` the base weights come back as they are. The tokenizer carries the *training* chat
    template and the model's generation_config lists the end-of-turn id first, so each export (merged
    safetensors, GGUF) stops where training ended a turn.
    """
    from llm_installer import loading
    from llm_installer.chat_format import model_chat_format
    from llm_installer.train.lora_setup import load_adapter

    lora_dir = None if no_lora else _required_lora(folder, lora)
    info = folder.load_info()
    step = progress or (lambda _msg: None)
    step("loading the base model (float32, so the merge loses nothing)")
    tokenizer = loading.load_tokenizer(folder.model_dir, trust_remote_code=allow_remote_code(info))
    model = loading.load_model(folder.model_dir, dtype="fp32", trust_remote_code=allow_remote_code(info))
    if lora_dir is not None:
        step("merging the adapter")
        try:
            model = load_adapter(model, lora_dir, is_trainable=False)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise UserError(f"adapter {lora_dir} does not fit model {folder.name}: {exc}") from None
        model = model.merge_and_unload()
    chat_format = model_chat_format(info, tokenizer, lora_dir)
    tokenizer.chat_template = chat_format.template
    stops = list(chat_format.stop_token_ids)  # the end-of-turn id first
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, chat_format, lora_dir


def export_merged(
    folder: ModelFolder,
    out: str | Path,
    *,
    lora: str | Path | None = None,
    force: bool = False,
    progress: Any = None,
) -> Path:
    """Merge the adapter into the base weights and save a plain transformers folder at `out`."""
    import torch

    out = Path(out).expanduser().resolve()
    _required_lora(folder, lora)
    _prepare_out(out, force, folder)
    info = folder.load_info()
    step = progress or (lambda _msg: None)
    model, tokenizer, _fmt, lora_dir = merged_model(folder, lora=lora, progress=step)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{out.name}-", dir=out.parent))
    try:
        step(f"writing safetensors to {out}")
        with torch.no_grad():
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        meta = {
            "base_model": info.model_id,
            "adapter": str(lora_dir),
            "merged_by": "llm-installer export --merge",
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----- Ollama ------------------------------------------------------------------------------------------------
_OLLAMA_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
    ),
    "phi3": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    # handlers/templates.PLAIN; <EOS> is replaced by the tokenizer's EOS, which ends its answers
    "plain": (
        '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}### User:\n{{ .Content }}\n\n'
        "{{ else }}### Assistant:\n{{ .Content }}<EOS>\n\n{{ end }}{{ end }}### Assistant:\n"
    ),
}
_TEMPLATE_STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>"],
    "plain": ["### User:"],
}


def template_family(template: str | None) -> str | None:
    """Which known chat layout a Jinja chat template uses (by its markers), or None."""
    if not template:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<start_of_turn>" in template:
        return "gemma"
    if "<|end|>" in template and "<|user|>" in template:
        return "phi3"
    if "### Assistant:" in template and "eos_token" in template:
        return "plain"
    return None


def _default_system(tokenizer: Any, template: str, family: str) -> str | None:
    """The system prompt a template adds by itself (SmolLM2 does), to carry over as Ollama's SYSTEM."""
    if family != "chatml":
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "X"}], chat_template=template, tokenize=False
        )
    except Exception:
        return None
    head = "<|im_start|>system\n"
    if head in text:
        body = text.split(head, 1)[1]
        return body.split("<|im_end|>", 1)[0] or None
    return None


def modelfile_text(
    *,
    from_path: Path,
    adapter: Path | None,
    template: str | None,
    tokenizer: Any,
    stop_token_ids: list[int],
    model_name: str,
    end_of_turn: str | None = None,
) -> tuple[str, str | None]:
    """The Modelfile for Ollama and, when the template has no known translation, a note saying so.

    `end_of_turn` (the model's ChatFormat.end_of_turn) is the first stop; the other stop ids and the
    layout's next-turn markers follow, so Ollama ends an answer exactly where training ended it.
    """
    family = template_family(template)
    lines = [
        f"# Modelfile for {model_name}, written by llm-installer export --ollama",
        f"# Create it with: ollama create {model_name} -f Modelfile",
        f"FROM {from_path}",
    ]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    note = None
    if family:
        go = _OLLAMA_TEMPLATES[family]
        if family == "plain":
            go = go.replace("<EOS>", end_of_turn or getattr(tokenizer, "eos_token", None) or "")
        lines.append(f'TEMPLATE """{go}"""')
        system = _default_system(tokenizer, template or "", family)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        note = (
            "the chat template has no known Ollama translation (known: ChatML, Llama-3, Gemma, Phi-3, "
            "plain); "
            "Ollama will use the template stored in the weights, or write TEMPLATE by hand"
        )
        lines.append(f"# NOTE: {note}")
    stops: list[str] = [end_of_turn] if end_of_turn else []
    for tid in stop_token_ids:
        tok = tokenizer.convert_ids_to_tokens(int(tid))
        if tok and tok not in stops:
            stops.append(tok)
    for s in _TEMPLATE_STOPS.get(family or "", []):
        if s not in stops:
            stops.append(s)
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    return "\n".join(lines) + "\n", note


def export_ollama(
    folder: ModelFolder,
    out: str | Path,
    *,
    merged_dir: Path | None = None,
    lora: str | Path | None = None,
    force: bool = False,
    gguf_file: Path | None = None,
) -> tuple[Path, str | None]:
    """Write OUT/Modelfile: FROM the GGUF file or the merged folder if given, else the base weights +
    ADAPTER lora/ (both of the first already hold the adapter)."""
    out = Path(out).expanduser().resolve()
    modelfile = out / "Modelfile"
    if modelfile.exists() and not force:
        raise UserError(f"{modelfile} already exists; choose another folder or pass --force")
    tokenizer, chat_format = folder_chat_format(folder, lora)
    built = gguf_file or merged_dir
    adapter = None if built is not None else _resolve_lora(folder, lora)
    text, note = modelfile_text(
        from_path=built or folder.model_dir.resolve(),
        adapter=adapter,
        template=chat_format.template,
        tokenizer=tokenizer,
        stop_token_ids=list(chat_format.stop_token_ids),
        model_name=folder.name.lower(),
        end_of_turn=chat_format.end_of_turn,
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = modelfile.with_name(".Modelfile.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(modelfile)
    return modelfile, note


# ----- vLLM --------------------------------------------------------------------------------------------------
def vllm_command(
    folder: ModelFolder, *, lora: str | Path | None = None, merged_dir: Path | None = None
) -> str:
    """The command that serves this model (with its adapter as NAME-lora) on vLLM."""
    if merged_dir is not None:
        return shlex.join(["vllm", "serve", str(merged_dir), "--served-model-name", folder.name])
    cmd = ["vllm", "serve", str(folder.model_dir.resolve()), "--served-model-name", folder.name]
    lora_dir = _resolve_lora(folder, lora)
    if lora_dir is not None:
        cmd += ["--enable-lora", "--lora-modules", f"{folder.name}-lora={lora_dir}"]
        try:
            rank = int(json.loads((lora_dir / "adapter_config.json").read_text(encoding="utf-8")).get("r", 0))
        except (OSError, ValueError, TypeError):
            rank = 0
        if rank > 16:  # vLLM's default --max-lora-rank is 16
            cmd += ["--max-lora-rank", str(rank)]
    return shlex.join(cmd)


# ----- smoke test --------------------------------------------------------------------------------------------
def smoke_test(
    model_dir: Path,
    *,
    prompt: str = "What is the capital of France? Answer in one sentence.",
    max_new_tokens: int = 48,
    adapter_dir: Path | None = None,
    chat_format: ChatFormat | None = None,
    gguf_file: str | None = None,
) -> SmokeResult:
    """Generate greedily from an exported folder with plain transformers; ok when it ends on an end token.

    A merged export carries its template and stop ids (generation_config.json); for base weights plus an
    adapter (what an Ollama Modelfile without --merge points at) pass the model's `chat_format`; for
    a GGUF export pass its folder and `gguf_file` (its name), which transformers reads back.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **extra)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **extra)
    if adapter_dir is not None:
        from llm_installer.train.lora_setup import load_adapter

        model = load_adapter(model, adapter_dir)
    model.eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    template = tokenizer.chat_template
    if chat_format is not None:
        template, stop_ids = chat_format.template, list(chat_format.stop_token_ids)
    if template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], chat_template=template, add_generation_prompt=True,
            tokenize=False,
        )  # fmt: skip
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0] if stop_ids else None,
        )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    last = new[-1] if new else None
    if last in stop_ids:
        tok = tokenizer.convert_ids_to_tokens(last)
        return SmokeResult(
            True, answer, len(new), tok, f"stopped at its end token {tok} after {len(new)} tokens"
        )
    return SmokeResult(
        False,
        answer,
        len(new),
        None,
        f"did not reach an end token ({', '.join(map(str, stop_ids))}) within {max_new_tokens} "
        "tokens: check the chat template and stop tokens (or train longer)",
    )
