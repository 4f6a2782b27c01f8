"""Commands `start` (OpenAI-compatible server + web page), `chat` (terminal) and `export`.

Only typer/rich/stdlib are imported here; the engine (torch, transformers, peft) loads inside the
commands so `llm-installer --help` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llm_installer.errors import UserError

ModelArg = Annotated[
    str, typer.Argument(help="Installed model name (see `llm-installer list`) or its folder.")
]
NoLora = Annotated[bool, typer.Option("--no-lora", help="Ignore the adapter in lora/: base model only.")]
LoraPath = Annotated[
    Path | None, typer.Option("--lora", help="Use this PEFT adapter folder instead of the model's lora/.")
]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow a model that needs its own Python code to run it (asked each time, never remembered).",
    ),
]


def _quiet() -> None:
    """Keep library chatter (weight-loading bars, deprecation warnings) off the user's terminal."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft)\b")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _load_engine(
    model: str,
    *,
    lora: Path | None,
    no_lora: bool,
    merge_adapter: bool = False,
    max_tokens: int = 512,
    max_batch: int = 16,
    max_queue: int | None = None,
):
    from llm_installer.console import err_console
    from llm_installer.serve.engine import Engine

    _quiet()
    with err_console.status(f"loading {model} ...", spinner="dots"):
        return Engine.load(
            model,
            lora=lora,
            no_lora=no_lora,
            merge_adapter=merge_adapter,
            default_max_tokens=max_tokens,
            max_batch=max_batch,
            **({"max_queue": max_queue} if max_queue else {}),
        )


def start(
    model: ModelArg,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to bind; other machines can connect only if you bind 0.0.0.0 (then set --api-key).",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    no_lora: NoLora = False,
    lora: LoraPath = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLM_INSTALLER_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on /v1/*.",
        ),
    ] = None,
    merge_adapter: Annotated[
        bool,
        typer.Option(
            "--merge-adapter",
            help="Fold the adapter into the weights (faster; serves only NAME:lora, "
            "the base model is no longer available).",
        ),
    ] = False,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Default answer length limit.")
    ] = 512,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Most requests decoded together.")
    ] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", min=1, help="Requests that may wait for a batch slot; more get HTTP 429."
        ),
    ] = 64,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve the model over an OpenAI-compatible API with a web chat page at /.

    Example: llm-installer start smollm2-135m-instruct --port 8000   (then open http://127.0.0.1:8000/)
    """
    from llm_installer import consent
    from llm_installer.console import console, warn
    from llm_installer.serve.app import bind_socket, serve

    consent.grant(trust_remote_code)

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        warn(f"binding {host} without --api-key: anyone who can reach this port can use the model")
    sock = bind_socket(host, port)  # fail fast on a busy port, before loading the model
    engine = _load_engine(
        model,
        lora=lora,
        no_lora=no_lora,
        merge_adapter=merge_adapter,
        max_tokens=max_tokens,
        max_batch=max_batch,
        max_queue=max_queue,
    )
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"serving [bold]{', '.join(engine.model_names)}[/bold] on http://{shown}:{port}/  "
        f"(OpenAI base URL http://{shown}:{port}/v1; Ctrl-C stops)",
        soft_wrap=True,
    )
    serve(engine, sock=sock, api_key=api_key)


def chat(
    model: ModelArg,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Answer this one message and exit (prints only the answer)."),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    no_lora: NoLora = False,
    lora: LoraPath = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Answer length limit.")
    ] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, max=2.0, help="0 = greedy (repeatable).")
    ] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", min=0.01, max=1.0, help="Nucleus sampling.")] = 0.95,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed for repeatable answers.")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Chat with the model in the terminal (/reset, /system TEXT, /base, /lora, /exit).

    Example: llm-installer chat smollm2-135m-instruct --prompt "What is the capital of France?"
    """
    from llm_installer import consent
    from llm_installer.serve.chat import ChatSession, run_interactive
    from llm_installer.serve.engine import SamplingParams

    consent.grant(trust_remote_code)
    engine = _load_engine(model, lora=lora, no_lora=no_lora, max_tokens=max_tokens or 512, max_batch=1)
    engine.start()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    session = ChatSession(engine, use_adapter=engine.has_adapter, params=params, system=system)
    try:
        if prompt is not None:
            if not prompt.strip():
                raise UserError("--prompt is empty; give the message to answer")
            try:
                answer = session.ask(prompt)
            except ValueError as exc:
                raise UserError(f"--prompt: {exc}") from None
            sys.stdout.write(answer.strip() + "\n")
            sys.stdout.flush()
        else:
            run_interactive(session)
    finally:
        engine.stop()


def export(
    model: ModelArg,
    merge: Annotated[
        Path | None, typer.Option("--merge", help="Write merged safetensors weights to this folder.")
    ] = None,
    ollama: Annotated[
        Path | None, typer.Option("--ollama", help="Write an Ollama Modelfile into this folder.")
    ] = None,
    vllm: Annotated[
        Path | None,
        typer.Option("--vllm", help="Write a vLLM launch script (serve-vllm.sh) into this folder."),
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="Write the merged model as one GGUF file (llama.cpp, Ollama) here."),
    ] = None,
    quant: Annotated[
        str,
        typer.Option("--quant", help="GGUF weight type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0."),
    ] = "f16",
    no_lora: Annotated[
        bool, typer.Option("--no-lora", help="GGUF: export the base weights, without the adapter.")
    ] = False,
    lora: LoraPath = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing export.")] = False,
    smoke: Annotated[
        bool, typer.Option("--smoke/--no-smoke", help="Generate from the export and check it stops.")
    ] = True,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Export for other runtimes: merged weights, a GGUF file, an Ollama Modelfile, the vLLM command.

    Examples:

      llm-installer export smollm2-135m-instruct --merge ./merged --ollama ./ollama

      llm-installer export smollm2-135m-instruct --gguf ./smol.gguf --quant q8_0 --ollama ./ollama

      llm-installer export smollm2-135m-instruct --vllm ./vllm   (then ./vllm/serve-vllm.sh)
    """
    from llm_installer import consent, store
    from llm_installer import export as ex
    from llm_installer.console import console, err_console

    _quiet()
    consent.grant(trust_remote_code)
    folder = store.find_model(model)
    merged_dir = None
    smoke_target: tuple[Path, Path | None] | None = None
    if merge is not None:
        with err_console.status("merging ...", spinner="dots") as status:
            merged_dir = ex.export_merged(
                folder, merge, lora=lora, force=force, progress=lambda msg: status.update(msg)
            )
        console.print(
            f"merged weights: [bold]{merged_dir}[/bold] (plain transformers folder)", soft_wrap=True
        )
        smoke_target = (merged_dir, None)
    gguf_file = _export_gguf(folder, gguf, quant=quant, lora=lora, no_lora=no_lora, force=force)
    if ollama is not None:
        _export_ollama(folder, ollama, merged_dir=merged_dir, lora=lora, force=force, gguf_file=gguf_file)
        if smoke_target is None:
            adapter = None if merged_dir else ex._resolve_lora(folder, lora)
            smoke_target = (folder.model_dir, adapter)
    console.print("vLLM: " + ex.vllm_command(folder, lora=lora, merged_dir=merged_dir), soft_wrap=True)
    if vllm is not None:
        script = ex.export_vllm(folder, vllm, lora=lora, merged_dir=merged_dir, force=force)
        console.print(f"vLLM launch script: [bold]{script}[/bold]", soft_wrap=True)
    if merge is None and ollama is None and gguf is None:
        if vllm is None:
            err_console.print(
                "[dim](pass --merge OUT, --gguf OUT.gguf, --ollama OUT and/or --vllm OUT to write files)[/dim]"
            )
        return
    if smoke and gguf_file is not None and merged_dir is None:
        smoke_target = (gguf_file, None)
    if smoke and smoke_target is not None:
        _smoke(folder, lora, *smoke_target)


def _export_ollama(folder, out: Path, **kwargs) -> None:
    """Write the Modelfile (FROM the GGUF, the merged folder, or base + ADAPTER) and say how to create it."""
    from llm_installer import export as ex
    from llm_installer.console import console, err_console

    modelfile, note = ex.export_ollama(folder, out, **kwargs)
    console.print(
        f"Ollama Modelfile: [bold]{modelfile}[/bold]  (ollama create {folder.name.lower()} -f {modelfile})",
        soft_wrap=True,
    )
    if note:
        err_console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)


def _export_gguf(folder, out: Path | None, **kwargs) -> Path | None:
    """Write the GGUF file when --gguf was given, with a progress line, and say what was written."""
    if out is None:
        return None
    from llm_installer.console import console, err_console
    from llm_installer.gguf_export import export_gguf

    with err_console.status("GGUF: loading ...", spinner="dots") as status:
        result = export_gguf(folder, out, progress=lambda msg: status.update(msg), **kwargs)
    what = f"merged with {result.adapter}" if result.adapter else "base weights, no adapter"
    console.print(
        f"GGUF ({result.quant}, {what}, llama.cpp arch {result.arch}, {result.tensors} tensors, "
        f"{result.size / 2**20:.1f} MiB): [bold]{result.path}[/bold]",
        soft_wrap=True,
    )
    return result.path


def _smoke(folder, lora: Path | None, target: Path, adapter: Path | None) -> None:
    """Generate greedily from the export (a folder, or a .gguf file that transformers reads back) and
    check the answer stops at its end token; exit code 1 when it does not."""
    from llm_installer import export as ex
    from llm_installer.console import console, err_console
    from llm_installer.errors import CheckFailed

    with err_console.status("smoke test: generating from the export ...", spinner="dots"):
        if target.suffix == ".gguf":
            result = ex.smoke_test(target.parent, gguf_file=target.name)
        else:
            # base weights + adapter carry no template of their own: test with the model's chat format
            fmt = ex.folder_chat_format(folder, lora)[1] if adapter is not None else None
            result = ex.smoke_test(target, adapter_dir=adapter, chat_format=fmt)
    if not result.ok:
        raise CheckFailed(
            f"smoke test failed: the export {result.message}; answer was {result.answer[:80]!r}"
        )
    console.print(f"smoke test ok: {result.message}; answer: {result.answer[:120]!r}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("start")(start)
    app.command("chat")(chat)
    app.command("export")(export)
