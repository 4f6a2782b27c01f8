"""`llm-installer studio`: the browser page for the whole flow (install, data, plan, train, compare, export).

Only typer at import time; FastAPI, uvicorn and the studio load inside the command.
"""

from __future__ import annotations

from typing import Annotated

import typer


def studio(
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to bind; another machine can connect only with 0.0.0.0 (set --api-key)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8100,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLM_INSTALLER_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on /api/* (the page asks for it once).",
        ),
    ] = None,
    max_upload_mb: Annotated[
        int, typer.Option("--max-upload-mb", min=1, help="Largest file the page may upload.")
    ] = 512,
) -> None:
    """Open the studio: one page that installs, inspects data, plans, trains, compares and exports.

    Example: llm-installer studio   (then open http://127.0.0.1:8100/)
    """
    import uvicorn

    from llm_installer.console import console, warn
    from llm_installer.serve.app import bind_socket
    from llm_installer.studio.app import create_app, new_studio

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        warn(f"binding {host} without --api-key: anyone who can reach this port can train and delete models")
    sock = bind_socket(host, port)
    state = new_studio(api_key=api_key, max_upload=max_upload_mb * 1024**2)
    app = create_app(state)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"studio on http://{shown}:{sock.getsockname()[1]}/  (Ctrl-C stops)", soft_wrap=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:  # Ctrl-C reached the trainings too (one process group): they save a checkpoint
        state.jobs.shutdown()
        state.engines.close()
        sock.close()


def register(app: typer.Typer) -> None:
    app.command("studio")(studio)
